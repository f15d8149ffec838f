"""Capture leaves a model's cache consistent with its key (issue 21: torch.export puts back the tensor attributes a
forward assigned but keeps the attributes it added, so an RT-DETR-like anchor cache was left with its key set
beside a stale, empty cache, and the model no longer ran, nor did export's next attempt)."""

import pytest
import torch
from torch import nn

import fxreparam
from fxreparam.capture import _export_restoring, capture


class _KeyedCache(nn.Module):
    """A forward that caches a grid under a key (RT-DETR's decoder: ``shapes`` over ``anchors``/``valid_mask``); the
    cache starts as an instance attribute, as ultralytics' ``_apply`` (``model.to(...)``) leaves it."""

    shapes: list = []  # noqa: RUF012  (the class-level default key, as ultralytics declares it)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 128, 3, padding=1)
        self.grid = torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shapes = [list(x.shape[2:])]
        if self.shapes != shapes:
            h, w = shapes[0]
            self.grid = torch.arange(h * w).type_as(x).view(1, 1, h, w)
            self.shapes = shapes
        return self.conv(x) * self.grid


def _state(model: nn.Module) -> dict:
    return {k: v for k, v in vars(model).items() if not k.startswith("_") and k != "training"}


@pytest.mark.parametrize("method", ["auto", "export"])
def test_capture_leaves_a_keyed_cache_as_it_was(method):
    model, x = _KeyedCache().eval(), torch.randn(1, 3, 5, 6)
    before = _state(model)
    captured = capture(model, (x,), method=method)
    assert _state(model).keys() == before.keys() and all(_state(model)[k] is v for k, v in before.items())
    with torch.no_grad():
        assert torch.allclose(model(x), captured.gm(x), atol=1e-5)  # the model still runs, and the graph computes it


def test_capture_without_its_own_check_leaves_a_keyed_cache_as_it_was():
    model, x = _KeyedCache().eval(), torch.randn(1, 3, 5, 6)
    capture(model, (x,), method="export", check=False)  # as optimize captures (it verifies anyway)
    assert "shapes" not in vars(model) and vars(model)["grid"].numel() == 0
    with torch.no_grad():
        model(x)


def test_export_leaves_no_cache_key_beside_the_cache_it_put_back():
    # torch.export restores the attributes a module had (the grid) but keeps those the forward added (the key).
    model, x = _KeyedCache().eval(), torch.randn(1, 3, 5, 6)
    _export_restoring(model, (x,), {}, False, False, None)
    assert "shapes" not in vars(model) and vars(model)["grid"].numel() == 0
    with torch.no_grad():
        model(x)


def test_optimize_a_keyed_cache_model_before_its_first_forward():
    model, x = _KeyedCache().eval(), torch.randn(1, 3, 5, 6)
    folded = fxreparam.optimize(model, x)
    with torch.no_grad():
        assert torch.allclose(model(x), folded(x), atol=1e-5)


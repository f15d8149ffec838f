"""``dynamic_shapes`` as torch.export takes it: the capture, the folded module and every artifact keep those dims."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from torch.export import Dim

import fxreparam
from fxreparam.capture import ShapeError, capture
from fxreparam.testing import randomize_batch_norms

SPATIAL = ({0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},)


def conv_bn() -> nn.Module:
    """A conv-BN-ReLU that runs at any batch and spatial size."""
    return randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())).eval()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_capture_keeps_batch_and_spatial_dims_dynamic_as_asked():
    model = conv_bn()
    captured = capture(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=SPATIAL)
    assert set(captured.dynamic_dims[0]) == {0, 2, 3} and not captured.doubled
    with torch.no_grad():
        for shape in [(3, 3, 8, 8), (1, 3, 12, 9), (5, 3, 5, 16)]:
            x = torch.randn(shape)
            assert close(captured.gm(x), model(x)), shape


def test_named_dims_keep_their_range_and_a_batch_one_example_is_taken_as_given():
    model = conv_bn()
    spec = {"input": {2: Dim("h", min=4, max=32)}}
    captured = capture(model, (torch.randn(1, 3, 8, 8),), dynamic_shapes=spec)
    assert captured.dynamic_dims[0] == {2: (4, 32)}  # the batch of 1 is pinned, as export pins it
    with torch.no_grad():
        x = torch.randn(1, 3, 20, 8)
        assert close(captured.gm(x), model(x))
        with pytest.raises(ShapeError):
            captured.gm(torch.randn(1, 3, 40, 8))
        with pytest.raises(ShapeError):
            captured.gm(torch.randn(1, 3, 8, 9))


def test_dynamic_shapes_the_model_pins_are_a_capture_error_naming_them():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)).eval()
    with pytest.raises(fxreparam.CaptureError, match="dynamic_shapes"):
        capture(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({2: Dim("h")},))


def test_folded_module_and_saved_program_run_at_another_spatial_size(tmp_path):
    from fxreparam.finalize import finalize
    from fxreparam.pipeline import run_passes
    from fxreparam.registry import list_passes

    model = conv_bn()
    captured = capture(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=SPATIAL)
    run_passes(captured.gm, list_passes())
    folded = finalize(captured.gm)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())  # the BN folded with H, W symbolic
    loaded = fxreparam.load(fxreparam.save(folded, tmp_path / "folded.pt2", torch.randn(1, 3, 8, 8)))
    with torch.no_grad():
        for shape in [(1, 3, 11, 7), (4, 3, 16, 16)]:
            x = torch.randn(shape)
            assert close(folded(x), model(x)) and close(loaded(x), model(x)), shape


def test_optimize_forwards_dynamic_shapes_where_it_takes_them(tmp_path):
    if "dynamic_shapes" not in inspect.signature(fxreparam.optimize).parameters:
        pytest.skip("optimize(..., dynamic_shapes=) is not in api.py yet (another change adds it)")
    model = conv_bn()
    folded = fxreparam.optimize(model, torch.randn(2, 3, 8, 8), dynamic_shapes=SPATIAL)
    loaded = fxreparam.load(fxreparam.save(folded, tmp_path / "folded.pt2", torch.randn(2, 3, 8, 8)))
    with torch.no_grad():
        x = torch.randn(3, 3, 13, 6)
        assert close(folded(x), model(x)) and close(loaded(x), model(x))

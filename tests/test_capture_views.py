"""Capture functionalizes writes into views of tensors the forward made without re-tracing the program (issue 25)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import ExportedProgram

import fxreparam
from fxreparam.capture import capture


class _EdgeMask(nn.Module):
    """A depthwise conv whose kernel the forward builds by writing into views of a zeros tensor (ECBSR's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4, 1, 1, 1))
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(4, 1, 3, 3)
        mask[:, 0, 0, 1] = 1.0
        mask[:, 0, 1, 0] = 2.0
        mask[:, 0, 2, 1].fill_(-1.0)
        mask[:, :, 1:2, 1:2] += 0.5
        return self.conv(x) + F.conv2d(x, self.scale * mask, padding=1, groups=4)


class _StaleViews(nn.Module):
    """Views made before a write and read after it, a write through a diagonal, chained in-place calls."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.zeros(4, 6, 5)
        row = m[1]
        m[1, 2:4, :] = 3.0
        m[:, 0].add_(x.sum())
        torch.diagonal(m[2], 0, 0, 1).mul_(0.0).add_(7.0)
        m.relu_()
        return row * 2 + x[0], m


class _WritesBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen[0] = 1.0
        return x + self.seen.sum()


class _WritesThroughAReshape(nn.Module):
    """A write through ``view`` then ``select``: no scatter undoes a reshape, so capture re-traces for real."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.zeros(2, 6)
        m.view(3, 4)[1, 2] = 5.0
        return x * m


def _mutations(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes
            if n.op == "call_function" and getattr(getattr(n.target, "_schema", None), "is_mutable", False)]


@pytest.mark.parametrize(("model", "x"), [(_EdgeMask(), torch.randn(1, 4, 8, 8)), (_StaleViews(), torch.randn(5))])
def test_writes_into_views_are_functionalized_without_retracing(model, x, monkeypatch):
    def no_retrace(self, *args, **kwargs):
        raise AssertionError("run_decompositions re-traced the program")

    monkeypatch.setattr(ExportedProgram, "run_decompositions", no_retrace)
    gm = capture(model.eval(), (x,)).gm
    assert _mutations(gm) == []
    with torch.no_grad():
        for got, want in zip(torch.utils._pytree.tree_leaves(gm(x)), torch.utils._pytree.tree_leaves(model(x))):
            assert torch.equal(got, want)


def test_a_write_into_a_buffer_is_still_functionalized_for_real():
    model = _WritesBuffer().eval()
    gm = capture(model, (torch.randn(2, 3),)).gm
    assert _mutations(gm) == ["aten.copy_.default"]  # run_decompositions' write-back into the buffer, kept
    assert float(model.seen.sum()) == 0.0  # capture left the model's state as it was


def test_a_model_with_masks_written_in_forward_folds_exactly():
    model = _EdgeMask().eval()
    x = torch.randn(2, 4, 8, 8)
    folded = fxreparam.optimize(model, x)
    assert fxreparam.report(folded).after.conv == 1  # the masked depthwise branch merges into the 3x3
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_a_write_through_a_reshape_falls_back_to_run_decompositions(monkeypatch):
    calls = []
    retrace = ExportedProgram.run_decompositions

    def counted(self, *args, **kwargs):
        calls.append(1)
        return retrace(self, *args, **kwargs)

    monkeypatch.setattr(ExportedProgram, "run_decompositions", counted)
    model, x = _WritesThroughAReshape().eval(), torch.randn(2, 6)
    gm = capture(model, (x,)).gm
    assert calls and _mutations(gm) == []
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))

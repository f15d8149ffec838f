"""The passes never give a wrong answer with ``verify=False``: each case folds exactly or is refused with a reason,
with example inputs and without (issue 24)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxreparam


def _check(model: nn.Module, x: torch.Tensor, with_inputs: bool, **kwargs) -> fxreparam.Report:
    """Optimize ``model`` without verification and check the result against it: the same shape, the same values."""
    model.eval()
    folded = fxreparam.optimize(model, (x,) if with_inputs else None, verify=False, **kwargs)
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    return fxreparam.report(folded)


class ScaleThenConvs(nn.Module):
    """A per-channel scale of rank 3 between two Conv1d (fuzzer seed 303's class): on an unbatched ``[C, L]``
    input the scale makes the tensor ``[1, C, L]``, and the model's output is batched."""

    def __init__(self, shape=(1, 4, 1)):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.Conv1d(4, 5, 1)
        self.register_buffer("g", torch.randn(shape))

    def forward(self, x):
        return self.b(self.bn(self.a(x) * self.g))


@pytest.mark.parametrize("with_inputs", [True, False])
def test_a_fold_keeps_the_rank_a_broadcast_made(with_inputs):
    rep = _check(ScaleThenConvs(), torch.randn(3, 9), with_inputs)
    assert any("broadcast" in r.reason for r in rep.refusals)


def test_a_scale_of_the_tensor_rank_still_folds_batched():
    rep = _check(ScaleThenConvs(), torch.randn(2, 3, 9), True)
    assert rep.rewrites["conv_bn"] + rep.rewrites["bn_conv"] >= 1

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


class PaddedRepBlock(nn.Module):
    """A RepVGG block whose 3x3 conv pads with a non-zero mode: ``torch.export`` splits that conv into a pad and a
    conv with padding 0."""

    def __init__(self, mode: str, dims: int = 2):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.kxk, self.point = conv(4, 4, 3, padding=1, padding_mode=mode), conv(4, 4, 1)

    def forward(self, x):
        return self.kxk(x) + self.point(x) + x


@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
@pytest.mark.parametrize(("mode", "dims"), [("reflect", 2), ("replicate", 1), ("circular", 3)])
def test_a_conv_with_a_padding_mode_merges_under_every_capture(mode, dims, capture):
    rep = _check(PaddedRepBlock(mode, dims), torch.randn(2, 4, *(5,) * dims), True, capture=capture)
    assert (rep.after.conv, rep.after.add_sub) == (1, 0)


class PadsByHand(nn.Module):
    """``F.pad`` written by hand before an unpadded 3x3 conv, summed with a 1x1 branch of the same input; with
    ``shared`` the padded tensor is read again."""

    def __init__(self, pads: list[int], shared: bool = False):
        super().__init__()
        self.kxk, self.point, self.pads, self.shared = nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1), pads, shared

    def forward(self, x):
        padded = torch.nn.functional.pad(x, self.pads, mode="reflect")
        out = self.kxk(padded) + self.point(x)
        return out + padded[:, :, 1:-1, 1:-1] if self.shared else out


@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
def test_a_hand_written_symmetric_mode_pad_is_read_as_the_conv_padding(capture):
    rep = _check(PadsByHand([1, 1, 1, 1]), torch.randn(2, 4, 6, 6), True, capture=capture)
    assert rep.after.conv == 1


@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
@pytest.mark.parametrize(("pads", "shared"), [([1, 1, 1, 1], True), ([2, 0, 1, 1], False)])
def test_a_mode_pad_read_elsewhere_or_one_sided_stays_a_pad(pads, shared, capture):
    rep = _check(PadsByHand(pads, shared), torch.randn(2, 4, 6, 6), True, capture=capture)
    assert rep.after.conv == 2

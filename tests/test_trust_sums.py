"""Sums, crops and concatenations never give a wrong answer (issue 24): each case is exact or refused with its
reason, alone (``run_pass``) and through ``optimize(verify=False)``."""

import pytest
import torch
from torch import nn

import fxreparam
from fxreparam.testing import run_pass

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _crop(x: torch.Tensor, dims: int, c: int = 1) -> torch.Tensor:
    return x[(slice(None), slice(None), *[slice(c, -c)] * dims)]


class CropThenPad(nn.Module):
    """A 3x3 conv with padding 1 on ``x`` cropped by 1, beside a 3x3 with padding 0 on ``x``: same output size,
    but the first reads zeros at the borders where ``x`` has values."""

    def __init__(self, dims: int = 2, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dims = dims
        self.a = _CONV[dims](3, 4, 3, padding=1, dtype=dtype)
        self.b = _CONV[dims](3, 4, 3, padding=0, dtype=dtype)

    def forward(self, x):
        return self.a(_crop(x, self.dims)) + self.b(x)


class PoolOfCrop(nn.Module):
    """An exact average pool (padding 1, counting the pad) of a cropped ``x`` beside a 3x3 conv of ``x``."""

    def __init__(self):
        super().__init__()
        self.pool, self.conv = nn.AvgPool2d(3, 1, padding=1), nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.pool(_crop(x, 2)) + self.conv(x)


class CroppedACNetPair(nn.Module):
    """ACNet-style 1x3 on a crop of both dims, padding the cropped width again, beside a 3x3 without padding."""

    def __init__(self):
        super().__init__()
        self.square, self.hor = nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, (1, 3), padding=(0, 1))

    def forward(self, x):
        return self.square(x) + self.hor(_crop(x, 2))


class ConcatOfCrop(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.cat([self.a(_crop(x, 2)), self.b(x)], 1)


_CROPS = {
    "conv2d": (lambda: CropThenPad(2), (2, 3, 8, 8), "branch_sum"),
    "conv1d": (lambda: CropThenPad(1), (2, 3, 9), "branch_sum"),
    "conv3d": (lambda: CropThenPad(3), (1, 3, 6, 6, 6), "branch_sum"),
    "float16": (lambda: CropThenPad(2, torch.float16), (2, 3, 8, 8), "branch_sum"),
    "avg_pool": (PoolOfCrop, (2, 4, 8, 8), "branch_sum"),
    "acnet_pair": (CroppedACNetPair, (2, 4, 8, 8), "branch_sum"),
    "concat": (ConcatOfCrop, (2, 3, 8, 8), "concat_convs"),
}


def _input(shape: tuple[int, ...], model: nn.Module) -> torch.Tensor:
    dtype = next(model.parameters()).dtype if any(True for _ in model.parameters()) else torch.float32
    return torch.randn(shape).to(dtype)


def _folded_error(model: nn.Module, x: torch.Tensor, **options) -> tuple[float, str]:
    """Relative error of ``optimize(model, x, verify=False, **options)`` on ``x``, and its refusals' reasons."""
    folded = fxreparam.optimize(model, x, verify=False, **options)
    with torch.no_grad():
        want, got = model(x).double(), folded(x).double()
    reasons = " | ".join(r.reason for r in fxreparam.report(folded).refusals)
    return float((got - want).abs().max() / want.abs().max()), reasons


@pytest.mark.parametrize("alone", [True, False], ids=["pass_alone", "all_passes"])
@pytest.mark.parametrize("case", list(_CROPS))
def test_crop_then_pad_on_one_border_is_refused(case, alone):
    """Crop-then-pad on one border was read as padding ``p - c`` and merged: relative errors 0.26-0.59."""
    make, shape, name = _CROPS[case]
    model = make().eval()
    error, reasons = _folded_error(model, _input(shape, model), **({"passes": [name]} if alone else {}))
    assert error < (1e-2 if case == "float16" else 1e-5) and "no padding of" in reasons


class ConcatAcrossAWrite(nn.Module):
    """Two convs of ``x`` concatenated, ``x`` written in place between the two reads (kept by symbolic_trace)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        x = x * 1
        y = self.a(x)
        x.mul_(2)
        return torch.cat([y, self.b(x)], 1)


class SumAcrossAWrite(ConcatAcrossAWrite):
    def forward(self, x):
        x = x * 1
        y = self.a(x)
        x.mul_(2)
        return y + self.b(x)


@pytest.mark.parametrize("model, name", [(ConcatAcrossAWrite, "concat_convs"), (SumAcrossAWrite, "branch_sum")])
def test_reads_on_either_side_of_an_in_place_write_are_not_merged(model, name):
    """concat_convs merged the two reads into one before the write: relative error 0.39-0.51."""
    x = torch.randn(2, 3, 6, 6)
    run = run_pass(name, model(), x, capture="symbolic_trace")  # export: the write is data flow, nothing to refuse
    assert (run.rewrites, run.error) == (0, 0) and "at different points" in run.reasons
    error, reasons = _folded_error(model().eval(), x, capture="symbolic_trace")
    assert error == 0 and "at different points" in reasons


class ConcatTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([y, y], 1)


def test_a_conv_concatenated_twice_is_computed_once():
    """cat([y, y]) was stacked as [W; W]: twice the MACs and weights of the conv it replaced."""
    x = torch.randn(2, 3, 6, 6)
    folded = fxreparam.optimize(ConcatTwice().eval(), x, verify=False)
    rep = fxreparam.report(folded)
    assert (rep.after.parameters, rep.after.macs) == (rep.before.parameters, rep.before.macs)
    assert [r.kind for r in rep.refusals if r.pass_name == "concat_convs"] == ["declined"]


class BroadcastHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 1), nn.Linear(8, 1), nn.Linear(8, 4)

    def forward(self, x):
        return self.a(x) + self.b(x) - self.c(x)


class BroadcastConvs(nn.Module):
    """A one-channel conv and a BN of a one-channel ``x`` summed with a four-channel conv: channels broadcast."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(1)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.bn(x)


@pytest.mark.parametrize("model, shape, kind", [(BroadcastHeads, (5, 8), "linear"),
                                                (BroadcastConvs, (2, 1, 6, 6), "conv")])
def test_summed_layers_whose_widths_broadcast_fold_as_the_broadcast_sum(model, shape, kind):
    """Linear(8, 1) + Linear(8, 1) + Linear(8, 4) crashed branch_sum (shape [1, 8] against [4, 8])."""
    x = torch.randn(shape)
    run = run_pass("branch_sum", model(), x)
    assert (run.rewrites, run.count(kind), run.count("add_sub"), run.error < 1e-6) == (1, 1, 0, True)
    folded = fxreparam.optimize(model().eval(), x, verify=False)
    assert fxreparam.report(folded).after.add_sub == 0
    error, _ = _folded_error(model().eval(), x)
    assert error < 1e-5


class DilatedRepVGG(nn.Module):
    """RepVGG on a dilated 3x3 (a DeepLab-style block): the 1x1 and the BN are the centre tap of its grid."""

    def __init__(self, dilation: int = 2):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=dilation, dilation=dilation), nn.BatchNorm2d(4))
        self.b, self.bn = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.bn(x)


class DilatedACNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.square = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.hor = nn.Conv2d(4, 4, (1, 3), padding=(0, 2), dilation=2)
        self.ver = nn.Conv2d(4, 4, (3, 1), padding=(2, 0), dilation=2)

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)


class DilatedResidual(nn.Module):
    """A TCN / WaveNet residual: ``x + conv1d(x)`` at dilation 4."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=4, dilation=4)

    def forward(self, x):
        return x + self.conv(x)


@pytest.mark.parametrize("model, shape", [(DilatedRepVGG, (2, 4, 9, 9)), (DilatedACNet, (2, 4, 9, 9)),
                                          (DilatedResidual, (2, 4, 20))])
def test_branches_on_a_dilated_conv_fold_into_one_dilated_conv(model, shape):
    """Every branch was spread to dilation 1 when a 1x1 or identity was present, then declined as costlier
    ("would store 404 weights where the layers it replaces store 176")."""
    model = model().eval()
    x = torch.randn(shape)
    folded = fxreparam.optimize(model, x, verify=False)
    (conv,) = [m for m in folded.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    dilation = max(m.dilation for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d)))
    after = fxreparam.report(folded).after
    assert (conv.kernel_size, conv.dilation, after.add_sub, after.batch_norm) == ((3,) * len(dilation), dilation, 0, 0)
    error, _ = _folded_error(model, x)
    assert error < 1e-5


class TwoDilations(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 5, padding=4, dilation=2, groups=4)
        self.b = nn.Conv2d(4, 4, 3, padding=4, dilation=4, groups=4)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_different_dilations_merge_on_their_common_grid():
    """A 5x5 at dilation 2 and a 3x3 at dilation 4 share the dilation-2 grid: one 5x5 there (not a 9x9 at
    dilation 1, which was declined as costlier)."""
    run = run_pass("branch_sum", TwoDilations(), torch.randn(1, 4, 20, 20))
    (conv,) = run.layers(nn.Conv2d)
    assert (conv.kernel_size, conv.dilation, run.error < 1e-6) == ((5, 5), (2, 2), True)


class ResidualOfCrop(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=2)

    def forward(self, x):
        return x + self.conv(_crop(x, 2))


def test_a_residual_around_a_crop_then_pad_is_refused():
    """``x + conv_p2(crop_1(x))`` was folded into one conv with padding 1 on ``x``."""
    error, reasons = _folded_error(ResidualOfCrop().eval(), torch.randn(2, 4, 8, 8))
    assert error < 1e-5 and "no padding of" in reasons


class CropRefusedBesideADecline(nn.Module):
    """A crop-then-pad branch beside a 1x3 and a 3x1 whose merge alone would grow the kernel (declined)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.hor, self.ver = nn.Conv2d(4, 4, (1, 3)), nn.Conv2d(4, 4, (3, 1))

    def forward(self, x):
        return self.a(_crop(x, 2)) + self.hor(x[:, :, 1:-1, :]) + self.ver(x[:, :, :, 1:-1])


def test_a_sum_reports_every_reason_and_is_refused_where_one_is_exactness():
    """The report keeps one refusal per node: a cost decline at the same sum hid the crop's refusal."""
    model = CropRefusedBesideADecline().eval()
    folded = fxreparam.optimize(model, torch.randn(2, 4, 8, 8), passes=["branch_sum"], verify=False)
    (refusal,) = fxreparam.report(folded).refusals
    assert "no padding of" in refusal.reason and "weights" in refusal.reason and refusal.kind == "refused"

"""Multi-branch folding: the seed architectures, written here independently of examples/, fold into
single convs; every refusal condition of REPARAM §3-7 is refused and reported."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import count_kind, fold
from torch import nn

import fxreparam


def conv_bn(cin, cout, k, stride=1, padding=0, groups=1, dilation=1, padding_mode="zeros"):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False,
                                   padding_mode=padding_mode), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    """3x3-BN + 1x1-BN (+ BN identity when shapes allow), then ReLU (Ding et al., 2021)."""

    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, stride, 1, groups)
        self.pointwise = conv_bn(cin, cout, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x):
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return F.relu(out)


class ACBlock(nn.Module):
    """ACNet: square KxK plus horizontal 1xK and vertical Kx1 kernels (Ding et al., 2019)."""

    def __init__(self, cin, cout, k=3, stride=1):
        super().__init__()
        self.square = conv_bn(cin, cout, k, stride, k // 2)
        self.hor = conv_bn(cin, cout, (1, k), stride, (0, k // 2))
        self.ver = conv_bn(cin, cout, (k, 1), stride, (k // 2, 0))

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)


class PadWithShift(nn.Module):
    """BN, then pad with the BN's own shift (the image of zero), as DBB's BNAndPad does."""

    def __init__(self, channels, pad):
        super().__init__()
        self.bn, self.pad = nn.BatchNorm2d(channels), pad

    def forward(self, x):
        y = F.pad(self.bn(x), [self.pad] * 4)
        bn = self.bn
        shift = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)
        p = self.pad
        y[:, :, :p, :] = shift
        y[:, :, -p:, :] = shift
        y[:, :, :, :p] = shift
        y[:, :, :, -p:] = shift
        return y


class DiverseBranchBlock(nn.Module):
    """DBB: KxK-BN + 1x1-BN + 1x1-BN-AVG-BN + 1x1-BN-KxK-BN (Ding et al., 2021)."""

    def __init__(self, cin, cout, k=3, groups=1):
        super().__init__()
        p = k // 2
        self.origin = conv_bn(cin, cout, k, 1, p, groups)
        self.one = conv_bn(cin, cout, 1, 1, 0, groups)
        self.avg = nn.Sequential(nn.Conv2d(cin, cout, 1, groups=groups, bias=False), PadWithShift(cout, p),
                                 nn.AvgPool2d(k, 1, 0), nn.BatchNorm2d(cout))
        self.one_kxk = nn.Sequential(nn.Conv2d(cin, cin, 1, groups=groups, bias=False), PadWithShift(cin, p),
                                     nn.Conv2d(cin, cout, k, 1, 0, groups=groups, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return self.origin(x) + self.one(x) + self.avg(x) + self.one_kxk(x)


class MobileOneBlock(nn.Module):
    """MobileOne: k over-parameterized conv-BN branches + a 1x1 scale branch + a BN skip."""

    def __init__(self, channels, k=3, branches=3, depthwise=True):
        super().__init__()
        g = channels if depthwise else 1
        self.convs = nn.ModuleList(conv_bn(channels, channels, k, 1, k // 2, g) for _ in range(branches))
        self.scale = conv_bn(channels, channels, 1, 1, 0, g)
        self.skip = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = self.skip(x) + self.scale(x)
        for conv in self.convs:
            out += conv(x)
        return F.relu(out)


class ResRepBlock(nn.Module):
    """ResRep: conv-BN followed by a 1x1 compactor."""

    def __init__(self, cin, cout):
        super().__init__()
        self.body = conv_bn(cin, cout, 3, 1, 1)
        self.compactor = nn.Conv2d(cout, cout, 1, bias=False)

    def forward(self, x):
        return self.compactor(self.body(x))


@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
def test_repvgg_stage_becomes_plain_convs(capture):
    model = nn.Sequential(RepVGGBlock(3, 8, 2), RepVGGBlock(8, 8), RepVGGBlock(8, 8, groups=2))
    folded = fold(model, torch.randn(2, 3, 16, 16), capture=capture)
    rep = fxreparam.report(folded)
    assert rep.after.conv == 3 and rep.after.batch_norm == 0 and rep.after.add_sub == 0
    assert count_kind(folded, nn.Conv2d) == 3


def test_acnet_asymmetric_kernels_merge():
    folded = fold(nn.Sequential(ACBlock(4, 6), ACBlock(6, 6, 5, 2)), torch.randn(2, 4, 15, 15))
    rep = fxreparam.report(folded)
    assert rep.after.conv == 2 and rep.after.add_sub == 0
    assert [m.kernel_size for m in folded.modules() if isinstance(m, nn.Conv2d)] == [(3, 3), (5, 5)]


@pytest.mark.parametrize(("k", "groups"), [(3, 1), (5, 2)])
def test_dbb_all_four_branches_become_one_conv(k, groups):
    folded = fold(DiverseBranchBlock(4, 8, k, groups), torch.randn(2, 4, 12, 12))
    rep = fxreparam.report(folded)
    assert rep.after.conv == 1 and rep.after.batch_norm == 0 and rep.after.add_sub == 0
    assert rep.after.other == 0  # the pads and their border writes are gone too


def test_dbb_pad_with_a_wrong_border_is_refused():
    class WrongBorder(PadWithShift):
        def forward(self, x):
            y = F.pad(self.bn(x), [1] * 4)
            y[:, :, :1, :] = 0.5
            return y

    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw, self.pad, self.kxk = nn.Conv2d(4, 4, 1, bias=False), WrongBorder(4, 1), nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.kxk(self.pad(self.pw(x)))

    folded = fold(Branch(), torch.randn(2, 4, 8, 8))
    assert fxreparam.report(folded).after.conv == 2


@pytest.mark.parametrize("depthwise", [True, False])
def test_mobileone_in_place_sums_fold(depthwise):
    folded = fold(nn.Sequential(MobileOneBlock(8, depthwise=depthwise), MobileOneBlock(8, 1, 2, depthwise)),
                  torch.randn(2, 8, 10, 10))
    rep = fxreparam.report(folded)
    assert rep.after.conv == 2 and rep.after.batch_norm == 0 and rep.after.add_sub == 0


def test_resrep_compactor_collapses():
    folded = fold(nn.Sequential(ResRepBlock(3, 8), nn.ReLU(), ResRepBlock(8, 6)), torch.randn(2, 3, 9, 9))
    rep = fxreparam.report(folded)
    assert rep.after.conv == 2 and rep.rewrites["sequential"] == 2


def test_layer_scale_and_subtraction_fold():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(6, 6, 3, 1, 1), conv_bn(6, 6, 1)
            self.gamma = nn.Parameter(torch.randn(1, 6, 1, 1))

        def forward(self, x):
            return x - 2.0 * self.a(x) + self.gamma * self.b(x)

    folded = fold(Scaled(), torch.randn(2, 6, 8, 8))
    rep = fxreparam.report(folded)
    assert rep.after.conv == 1 and rep.after.add_sub == 0 and rep.after.mul_div == 0


def test_bn_after_the_sum_folds():
    class SumThenBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.a(x) + self.b(x))

    rep = fxreparam.report(fold(SumThenBN(), torch.randn(2, 4, 8, 8)))
    assert rep.after.conv == 1 and rep.after.batch_norm == 0


def test_nested_dbb_inside_a_residual_block():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.dbb = DiverseBranchBlock(6, 6)

        def forward(self, x):
            return x + self.dbb(x)

    rep = fxreparam.report(fold(Residual(), torch.randn(2, 6, 8, 8)))
    assert rep.after.conv == 1 and rep.after.add_sub == 0


class TwoBranches(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.parametrize(("a", "b", "size", "capture", "reason"), [
    (nn.Conv2d(4, 4, 1, 1, 0), nn.Conv2d(4, 4, 1, 2, 0), 1, "export", "strides differ"),
    (nn.Conv2d(4, 4, 3, 1, 2, dilation=2), nn.Conv2d(4, 4, 3, 1, 1), 9, "export", "weights"),  # a 5x5 at dilation 1
    (nn.Conv2d(4, 4, 3, 1, 1, padding_mode="reflect"), nn.Conv2d(4, 4, 3, 1, 1), 9, "symbolic_trace",
     "padding modes differ"),
    (nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 2, 2, 0), 8, "export", "do not share a center"),
])
def test_misaligned_branches_are_refused_with_the_reason(a, b, size, capture, reason):
    rep = fxreparam.report(fold(TwoBranches(a, b), torch.randn(2, 4, size, size), capture=capture))
    assert rep.after.conv == 2 and rep.after.add_sub == 1
    assert any(reason in r.reason for r in rep.refusals), [r.reason for r in rep.refusals]


def test_even_kernels_with_the_same_offset_merge():
    # 4x4 p=1 and 2x2 p=0 read the same grid; the 2x2 centre-pads into the 4x4 exactly.
    rep = fxreparam.report(fold(TwoBranches(nn.Conv2d(4, 4, 4, 1, 1), nn.Conv2d(4, 4, 2, 1, 0)),
                                torch.randn(2, 4, 8, 8)))
    assert rep.after.conv == 1


def test_branch_with_a_second_consumer_is_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, 1, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.b(x)
            return self.a(x) + y, y

    rep = fxreparam.report(fold(Shared(), torch.randn(2, 4, 8, 8)))
    assert rep.after.conv == 2
    assert any("another consumer" in r.reason for r in rep.refusals)


def test_avg_pool_without_count_include_pad_is_refused():
    model = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.BatchNorm2d(4))
    rep = fxreparam.report(fold(model, torch.randn(2, 4, 8, 8)))
    assert rep.after.batch_norm == 1
    assert any("count_include_pad=False" in r.reason for r in rep.refusals)


def test_identity_needs_stride_one_and_equal_channels():
    class Strided(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, 2, 1)

        def forward(self, x):
            return x[:, :, ::2, ::2] + self.conv(x)

    rep = fxreparam.report(fold(Strided(), torch.randn(2, 4, 8, 8)))
    assert rep.after.conv == 1 and rep.after.add_sub == 1


@pytest.mark.parametrize("groups", [2, 8])
def test_grouped_and_depthwise_dbb_keep_their_group_structure(groups):
    """REPARAM §9: a grouped or depthwise DBB block folds to a conv with its groups, never a denser one."""
    folded = fold(DiverseBranchBlock(8, 8, 3, groups), torch.randn(2, 8, 10, 10))
    (conv,) = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert conv.groups == groups
    assert conv.weight.numel() + conv.bias.numel() == 8 * (8 // groups) * 9 + 8  # the hand-written deploy form

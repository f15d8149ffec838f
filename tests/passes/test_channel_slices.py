"""``channel_slices`` alone: identity, per-channel affine and conv parts on channel slices of one tensor, concatenated
or summed, as one layer (REPARAM §15), or refused with the reason."""

import pytest
import torch
from torch import nn

from fxreparam.testing import run_pass

CAPTURES = ("export", "symbolic_trace")


def cats(run) -> int:
    return sum(n.op == "call_function" and "cat" in str(n.target) for n in run.gm.graph.nodes)


class PassBN(nn.Module):
    """A conv, then the identity on its first ``r`` channels and a BN on the rest."""

    def __init__(self, r: int = 3):
        super().__init__()
        self.conv, self.bn, self.r = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8 - r), r

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([y[:, :self.r], self.bn(y[:, self.r:])], dim=1)


@pytest.mark.parametrize("capture", CAPTURES)
def test_identity_and_bn_halves_fold_into_the_conv_before(capture):
    run = run_pass("channel_slices", PassBN(), torch.randn(2, 4, 8, 8), capture=capture)
    assert (run.rewrites, run.count("batch_norm"), run.count("conv"), cats(run)) == (1, 0, 1, 0)
    assert run.error < 1e-6


class Three(nn.Module):
    """A BN, the identity and a constant scale on three consecutive slices (``narrow`` for one of them)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 9, 3, padding=1), nn.BatchNorm2d(2)
        self.register_buffer("scale", torch.rand(3, 1, 1) + 0.5)

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([self.bn(y[:, :2]), y.narrow(1, 2, 4), y[:, 6:] * self.scale], dim=1)


@pytest.mark.parametrize("capture", CAPTURES)
def test_three_parts_fold_into_the_conv_before(capture):
    run = run_pass("channel_slices", Three(), torch.randn(2, 3, 8, 8), capture=capture)
    assert (run.rewrites, run.count("batch_norm"), run.count("mul_div"), cats(run)) == (1, 0, 0, 0)
    assert run.error < 1e-6


class Slices(nn.Module):
    """A conv, then a cat of the identity on ``first`` and a BN on ``second`` (slices as given)."""

    def __init__(self, first: slice, second: slice, bn_channels: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(bn_channels)
        self.first, self.second = first, second

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([y[:, self.first], self.bn(y[:, self.second])], dim=1)


@pytest.mark.parametrize(("first", "second", "c"), [(slice(3, None), slice(None, 3), 3),  # out of order
                                                    (slice(None, 5), slice(3, None), 5)])  # overlapping
def test_unordered_or_overlapping_slices_are_refused(first, second, c):
    run = run_pass("channel_slices", Slices(first, second, c), torch.randn(2, 4, 8, 8))
    assert run.rewrites == 0 and "do not cover" in run.reasons and run.error == 0
    assert not any(r.declined for r in run.refusals)  # refused for exactness, not for cost


class ReadElsewhere(nn.Module):
    def __init__(self, what: str):
        super().__init__()
        self.conv, self.bn, self.what = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(5), what

    def forward(self, x):
        y = self.conv(x)
        head, tail = y[:, :3], self.bn(y[:, 3:])
        return torch.cat([head, tail], dim=1), (head if self.what == "slice" else tail).sum()


@pytest.mark.parametrize("what", ["slice", "bn"])
def test_a_part_read_elsewhere_is_refused(what):
    run = run_pass("channel_slices", ReadElsewhere(what), torch.randn(2, 4, 8, 8))
    assert run.rewrites == 0 and "read elsewhere" in run.reasons and run.count("batch_norm") == 1


class ProducerReadElsewhere(PassBN):
    def forward(self, x):
        y = self.conv(x)
        return torch.cat([y[:, :self.r], self.bn(y[:, self.r:])], dim=1), y.sum()


def test_a_producer_read_elsewhere_is_declined_as_costlier():
    run = run_pass("channel_slices", ProducerReadElsewhere(), torch.randn(2, 4, 8, 8))
    (refusal,) = run.refusals
    assert (run.rewrites, run.count("batch_norm"), refusal.declined) == (0, 1, True)
    assert "read elsewhere" in refusal.reason


class BeforeConv(nn.Module):
    """A ReLU's output, the identity on some channels and a BN on the others, read by a conv."""

    def __init__(self, padding: int = 0):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(5), nn.Conv2d(8, 4, 3, padding=padding)

    def forward(self, x):
        y = torch.relu(x)
        return self.conv(torch.cat([y[:, :3], self.bn(y[:, 3:])], dim=1))


@pytest.mark.parametrize("capture", CAPTURES)
def test_identity_and_bn_halves_fold_into_the_conv_after(capture):
    run = run_pass("channel_slices", BeforeConv(), torch.randn(2, 8, 8, 8), capture=capture)
    assert (run.rewrites, run.count("batch_norm"), run.count("conv"), cats(run)) == (1, 0, 1, 0)
    assert run.error < 1e-6


def test_a_shift_before_a_zero_padded_conv_is_refused():
    run = run_pass("channel_slices", BeforeConv(padding=1), torch.randn(2, 8, 8, 8))
    assert (run.rewrites, run.count("batch_norm"), run.error) == (0, 1, 0) and "zero-pads" in run.reasons


class ConvAndIdentity(nn.Module):
    """A conv on the first ``r`` channels of the input, the identity on the rest."""

    def __init__(self, channels: int = 8, r: int = 4):
        super().__init__()
        self.conv, self.r = nn.Conv2d(r, r, 3, padding=1), r

    def forward(self, x):
        return torch.cat([self.conv(x[:, :self.r]), x[:, self.r:]], dim=1)


def test_conv_on_a_slice_with_identity_on_the_rest_is_declined_by_cost():
    run = run_pass("channel_slices", ConvAndIdentity(), torch.randn(2, 8, 8, 8))
    assert run.rewrites == 0 and run.count("conv") == 1 and cats(run) == 1
    (refusal,) = run.refusals
    assert refusal.declined and "would store" in refusal.reason


class TwoConvs(nn.Module):
    """Convs on the two halves of the input's channels: a grouped conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.a(x[:, :4]), self.b(x[:, 4:])], dim=1)


@pytest.mark.parametrize("capture", CAPTURES)
def test_convs_on_the_halves_fold_into_one_grouped_conv(capture):
    run = run_pass("channel_slices", TwoConvs(), torch.randn(2, 8, 8, 8), capture=capture)
    (conv,) = run.layers(nn.Conv2d)
    assert (run.rewrites, run.count("conv"), cats(run), conv.groups) == (1, 1, 0, 2)
    assert conv.weight.numel() == 2 * 6 * 4 * 9 and run.error < 1e-6


class Unbatched(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1)
        self.register_buffer("scale", torch.rand(4, 1) + 0.5)

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([y[:2], y[2:] * self.scale + 1.0], dim=0)  # a chain of two affine maps


def test_unbatched_input_slices_dim_0_and_folds():
    run = run_pass("channel_slices", Unbatched(), torch.randn(3, 16))
    assert (run.rewrites, run.count("mul_div"), run.count("add_sub"), cats(run)) == (1, 0, 0, 0)
    assert run.error < 1e-6


class RMBlock(nn.Module):
    """RMNet's block: ``x[:, :r]`` kept, the rest computed by two conv-BN branches and a BN on ``x[:, r:]``."""

    def __init__(self, planes: int = 8, r: int = 4, stride: int = 1):
        super().__init__()
        self.r = r
        self.conv3 = nn.Conv2d(planes, planes - r, 3, stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes - r)
        self.bn0 = nn.BatchNorm2d(planes - r)

    def forward(self, x):
        out = self.bn3(self.conv3(x))
        out = out + self.bn0(x[:, self.r:])
        return torch.relu(torch.cat([x[:, :self.r], out], dim=1))


@pytest.mark.parametrize("capture", CAPTURES)
def test_bn_of_a_slice_summed_with_a_conv_joins_the_conv_and_the_cat_is_declined(capture):
    run = run_pass("channel_slices", RMBlock(), torch.randn(2, 8, 8, 8), capture=capture)
    assert (run.rewrites, run.count("batch_norm"), run.count("add_sub"), run.count("conv")) == (1, 0, 0, 1)
    assert run.error < 1e-6
    (refusal,) = run.refusals  # the identity block would make the conv store the kept channels' Dirac rows
    assert refusal.declined and "block kernel" in refusal.reason


def test_bn_of_a_slice_summed_with_a_grouped_conv_is_declined():
    model = RMBlock()
    model.conv3 = nn.Conv2d(8, 4, 3, padding=1, groups=2, bias=False)  # the Dirac rows would make it dense
    run = run_pass("channel_slices", model, torch.randn(2, 8, 8, 8))
    assert (run.rewrites, run.count("batch_norm"), run.error) == (0, 2, 0)
    assert any(r.declined and "would store" in r.reason for r in run.refusals)


class PartialResidual(nn.Module):
    """``conv(x) + x[:, a:b]``: a residual on some of the input's channels (a partial identity)."""

    def __init__(self, start: int = 2):
        super().__init__()
        self.conv, self.start = nn.Conv2d(8, 4, 3, padding=1), start

    def forward(self, x):
        return self.conv(x) - 0.5 * x[:, self.start:self.start + 4] if self.start else self.conv(x) + x[:, :4]


@pytest.mark.parametrize("start", [0, 2])
def test_a_summed_slice_of_the_input_joins_the_conv_as_a_dirac_selection(start):
    run = run_pass("channel_slices", PartialResidual(start), torch.randn(2, 8, 8, 8))
    assert (run.rewrites, run.count("conv"), run.count("add_sub"), run.count("mul_div")) == (1, 1, 0, 0)
    assert run.error < 1e-6

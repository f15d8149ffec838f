"""``bn_conv``: an affine map before a conv or linear layer goes into its kernel, where exact (REPARAM §2).

First the pass alone on small graphs (``run_pass``), then end to end through ``optimize``.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import fold
from torch import nn

import fxreparam
from fxreparam.testing import run_pass


@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
def test_bn_before_unpadded_conv_folds(capture):
    """In both forms the pass meets: aten ops (export) and module calls (symbolic_trace)."""
    run = run_pass("bn_conv", nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)), torch.randn(2, 3, 6, 6),
                   capture=capture)
    assert (run.rewrites, run.count("batch_norm"), run.error < 1e-6) == (1, 0, True)


def test_bn_before_grouped_conv_folds_per_group():
    run = run_pass("bn_conv", nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1, groups=2)), torch.randn(1, 4, 3, 3))
    assert (run.rewrites, run.error < 1e-6) == (1, True)


def test_bn_before_zero_padded_conv_is_refused():
    run = run_pass("bn_conv", nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)), torch.randn(1, 3, 5, 5))
    assert run.rewrites == 0 and "zero-pads" in run.reasons


def test_bn1d_before_linear_folds():
    run = run_pass("bn_conv", nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 2)), torch.randn(3, 5))
    assert (run.rewrites, run.error < 1e-6) == (1, True)


def test_bn_before_transposed_conv_is_refused():
    run = run_pass("bn_conv", nn.Sequential(nn.BatchNorm2d(2), nn.ConvTranspose2d(2, 2, 3)), torch.randn(1, 2, 4, 4))
    assert run.rewrites == 0 and "transposed" in run.reasons


class _PoolHead(nn.Module):
    """BN, then an average over positions and a flatten, then a classifier: the BN folds into the classifier."""

    def __init__(self, reduce):
        super().__init__()
        self.bn, self.reduce, self.fc = nn.BatchNorm2d(4), reduce, nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.reduce(self.bn(x)))


@pytest.mark.parametrize("reduce", [
    lambda x: x.mean((2, 3)),
    lambda x: torch.mean(x, dim=(-1, -2), keepdim=True).flatten(1),
    nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    lambda x: F.adaptive_avg_pool2d(x, 1).view(x.shape[0], -1),
], ids=["mean", "mean-keepdim-flatten", "adaptive-pool-module", "adaptive-pool-view"])
def test_bn_folds_across_a_global_average_into_the_classifier(reduce):
    run = run_pass("bn_conv", _PoolHead(reduce), torch.randn(2, 4, 5, 5))
    assert (run.rewrites, run.count("batch_norm"), run.error < 1e-6) == (1, 0, True)


@pytest.mark.parametrize("reduce", [
    lambda x: x.mean(1).flatten(1)[:, :4],           # averages over the channels: mixes them
    lambda x: F.adaptive_avg_pool2d(x, 2).flatten(1)[:, :4],  # the flatten merges each channel's 4 positions
    lambda x: F.avg_pool2d(x, 5, padding=1).flatten(1),       # zero padding counted in the average
], ids=["channel-mean", "flatten-of-positions", "padded-average"])
def test_bn_stays_where_the_op_between_does_not_keep_channels_whole(reduce):
    run = run_pass("bn_conv", _PoolHead(reduce), torch.randn(2, 4, 5, 5))
    assert run.rewrites == 0 and run.error < 1e-6


class _ScaleUpARank(nn.Module):
    """``conv(x) * g`` with ``g`` of rank 3 on an unbatched ``[C, L]`` input: the product is ``[1, C, L]``."""

    def __init__(self, shape=(1, 4, 1)):
        super().__init__()
        self.a, self.b = nn.Conv1d(3, 4, 3), nn.Conv1d(4, 5, 1)
        self.register_buffer("g", torch.randn(shape))

    def forward(self, x):
        return self.b(self.a(x) * self.g)


def test_scale_that_broadcasts_the_rank_up_is_refused():
    run = run_pass("bn_conv", _ScaleUpARank(), torch.randn(3, 9))
    assert run.rewrites == 0 and "broadcasts the input of shape [4, 7] to [1, 4, 7]" in run.reasons


def test_scale_that_expands_a_size_one_dim_is_refused():
    class ExpandChannels(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Conv1d(4, 5, 1)
            self.register_buffer("g", torch.randn(1, 4, 1))

        def forward(self, x):
            return self.b(x * self.g)

    run = run_pass("bn_conv", ExpandChannels(), torch.randn(2, 1, 9))
    assert run.rewrites == 0 and "to [2, 4, 9]" in run.reasons


# ----------------------------------------------------------- through optimize: capture, every pass, verification


class BNConv(nn.Module):
    def __init__(self, padding=0, padding_mode="zeros", groups=1, stride=1, dilation=1, affine=True):
        super().__init__()
        self.bn = nn.BatchNorm2d(4, affine=affine)
        self.conv = nn.Conv2d(4, 8, 3, padding=padding, padding_mode=padding_mode, groups=groups, stride=stride,
                              dilation=dilation)

    def forward(self, x):
        return self.conv(self.bn(x))


@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
@pytest.mark.parametrize(("groups", "stride", "dilation", "affine"),
                         [(1, 1, 1, True), (2, 2, 1, True), (4, 1, 2, False), (1, 2, 2, True)])
def test_bn_before_unpadded_conv_folds_through_optimize(capture, groups, stride, dilation, affine):
    folded = fold(BNConv(0, groups=groups, stride=stride, dilation=dilation, affine=affine),
                  torch.randn(2, 4, 9, 9), capture=capture)
    rep = fxreparam.report(folded)
    assert rep.after.batch_norm == 0 and rep.rewrites["bn_conv"] == 1


def test_bn_before_zero_padded_conv_is_refused_through_optimize():
    folded = fold(BNConv(1), torch.randn(2, 4, 9, 9))
    rep = fxreparam.report(folded)
    assert rep.after.batch_norm == 1
    assert any("bn 'bn' before conv 'conv'" in r.reason and "zero-pads" in r.reason for r in rep.refusals)


def test_bn_before_reflect_padded_conv_folds_in_module_form():
    # With a non-zero padding mode the affine map is applied before the padding copies values: exact.
    folded = fold(BNConv(1, padding_mode="reflect"), torch.randn(2, 4, 9, 9), capture="symbolic_trace")
    assert fxreparam.report(folded).after.batch_norm == 0


def test_bn_with_second_consumer_is_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.bn(x)
            return self.conv(y) * y

    rep = fxreparam.report(fold(Shared(), torch.randn(2, 4, 5, 5)))
    assert rep.after.batch_norm == 1
    assert any("another consumer" in r.reason for r in rep.refusals)


def test_bn_before_transposed_conv_is_refused_through_optimize():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 4, 3))
    rep = fxreparam.report(fold(model, torch.randn(2, 4, 5, 5)))
    assert rep.after.batch_norm == 1
    assert any("transposed" in r.reason for r in rep.refusals)


def test_constant_scale_before_padded_conv_folds():
    # A pure scale (no shift) commutes with zero padding: exact even with padding.
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("s", torch.randn(1, 4, 1, 1))
            self.conv = nn.Conv2d(4, 6, 3, padding=1)

        def forward(self, x):
            return self.conv(x * self.s)

    rep = fxreparam.report(fold(Scaled(), torch.randn(2, 4, 6, 6)))
    assert rep.after.mul_div == 0

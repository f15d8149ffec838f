"""``bn_conv`` alone on small graphs: an affine map before a conv or linear layer goes into its kernel, where exact."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxreparam.testing import run_pass


def test_bn_before_unpadded_conv_folds():
    run = run_pass("bn_conv", nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)), torch.randn(2, 3, 6, 6))
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
    assert run.rewrites == 1 and run.error < 1e-6 and not run.layers(nn.BatchNorm2d)


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

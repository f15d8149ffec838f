"""``pool_as_conv`` alone: an exact average pool before a per-channel affine becomes a depthwise conv."""

import torch
from torch import nn

from fxreparam.testing import run_pass


def test_exact_pool_before_bn_becomes_a_depthwise_conv():
    run = run_pass("pool_as_conv", nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(4)), torch.randn(1, 4, 5, 5))
    assert (run.rewrites, run.count("conv"), run.error < 1e-6) == (1, 1, True)


def test_pool_without_padding_count_is_refused():
    run = run_pass("pool_as_conv", nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.BatchNorm2d(4)),
                   torch.randn(1, 4, 5, 5))
    assert run.rewrites == 0 and "count_include_pad" in run.reasons


def test_pool_on_an_unbatched_input_reads_channels_on_dim_0():
    run = run_pass("pool_as_conv", nn.Sequential(nn.AvgPool1d(2), _Scale()), torch.randn(3, 8))
    assert (run.rewrites, run.error < 1e-6) == (1, True)


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor([[2.0], [3.0], [4.0]]))

    def forward(self, x):
        return x * self.scale

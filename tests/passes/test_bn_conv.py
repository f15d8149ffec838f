"""``bn_conv`` alone on small graphs: an affine map before a conv or linear layer goes into its kernel, where exact."""

import torch
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

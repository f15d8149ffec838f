"""bn_conv: a BatchNorm folded into the conv after it only where exact (REPARAM §2)."""

from __future__ import annotations

import pytest
import torch
from conftest import fold
from torch import nn

import fxreparam


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
def test_bn_before_unpadded_conv_folds(capture, groups, stride, dilation, affine):
    folded = fold(BNConv(0, groups=groups, stride=stride, dilation=dilation, affine=affine),
                  torch.randn(2, 4, 9, 9), capture=capture)
    rep = fxreparam.report(folded)
    assert rep.after.batch_norm == 0 and rep.rewrites["bn_conv"] == 1


def test_bn_before_zero_padded_conv_is_refused():
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


def test_bn_before_transposed_conv_is_refused():
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

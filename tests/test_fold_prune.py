"""prune_zero_channels: ResRep's zero compactor rows remove channels, with the inputs that read them."""

from __future__ import annotations

import torch
from conftest import fold
from torch import nn

import fxreparam


class CompactedBlock(nn.Module):
    def __init__(self, cin, cout, zero_rows):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.compactor = nn.Conv2d(cout, cout, 1, bias=False)
        with torch.no_grad():
            self.compactor.weight[list(zero_rows)] = 0

    def forward(self, x):
        return torch.relu(self.compactor(self.bn(self.conv(x))))


def test_zero_rows_are_removed_through_relu_pool_and_flatten():
    model = nn.Sequential(CompactedBlock(3, 8, [1, 4]), nn.MaxPool2d(2), CompactedBlock(8, 8, [0, 2, 7]),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    folded = fold(model, torch.randn(2, 3, 8, 8))
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 6), (6, 5)]
    assert next(m for m in folded.modules() if isinstance(m, nn.Linear)).in_features == 5 * 16
    assert fxreparam.report(folded).rewrites["prune_zero_channels"] == 2


def test_a_zero_channel_that_an_add_needs_is_kept_and_reported():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = CompactedBlock(4, 4, [3])

        def forward(self, x):
            return x * self.block(x)

    rep = fxreparam.report(fold(Residual(), torch.randn(2, 4, 6, 6)))
    assert rep.rewrites["prune_zero_channels"] == 0
    assert any("zero output channels kept" in r.reason and "needs every channel" in r.reason for r in rep.refusals)


def test_a_grouped_consumer_keeps_the_channel():
    model = nn.Sequential(CompactedBlock(4, 4, [0]), nn.Conv2d(4, 4, 3, padding=1, groups=2))
    rep = fxreparam.report(fold(model, torch.randn(2, 4, 6, 6)))
    assert rep.rewrites["prune_zero_channels"] == 0
    assert any("grouped" in r.reason for r in rep.refusals)


def test_zero_channels_of_grouped_producers_fold_exactly_or_are_kept_without_verification():
    def zeroed(conv, channels):
        with torch.no_grad():
            conv.weight[list(channels)] = 0
            conv.bias[list(channels)] = 0
        return conv

    for conv, channels, x in ((nn.Conv2d(4, 4, 3, groups=2), (0, 1), torch.randn(2, 4, 6, 6)),
                              (nn.Conv2d(4, 6, 3, groups=2), (1, 5), torch.randn(2, 4, 6, 6)),
                              (nn.Conv2d(4, 4, 3, groups=4), (2,), torch.randn(2, 4, 6, 6)),
                              (nn.Conv3d(4, 4, 3, groups=2), (1,), torch.randn(2, 4, 5, 5, 5))):
        consumer = (nn.Conv2d if conv.weight.dim() == 4 else nn.Conv3d)(conv.out_channels, 3, 1)
        model = nn.Sequential(zeroed(conv, channels), nn.ReLU(), consumer).eval()
        folded = fxreparam.optimize(model, (x,), verify=False)
        with torch.no_grad():
            assert (folded(x) - model(x)).abs().max() < 1e-5

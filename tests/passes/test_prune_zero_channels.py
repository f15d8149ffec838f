"""``prune_zero_channels``: all-zero output channels go with the inputs that read them, where nothing else needs
them; pools that reach the channel axis keep them.

First the pass alone (``run_pass``), then end to end through ``optimize`` (ResRep's zero compactor rows).
"""

import torch
import torch.nn.functional as F
from conftest import fold
from torch import nn

import fxreparam
from fxreparam.testing import run_pass


def _with_zero_channels(conv: nn.Module, channels=(1, 3)) -> nn.Module:
    with torch.no_grad():
        for c in channels:
            conv.weight[c] = 0
            conv.bias[c] = 0
    return conv


def test_zero_channels_between_two_convs_are_removed():
    model = nn.Sequential(_with_zero_channels(nn.Conv2d(3, 5, 3)), nn.ReLU(), nn.Conv2d(5, 2, 1))
    run = run_pass("prune_zero_channels", model, torch.randn(1, 3, 6, 6))
    assert (run.rewrites, run.error < 1e-6) == (1, True)
    assert run.layers(nn.Conv2d)[0].out_channels == 3


def test_zero_channels_through_flatten_into_linear_are_removed():
    model = nn.Sequential(_with_zero_channels(nn.Conv2d(3, 5, 3)), nn.Flatten(), nn.Linear(5 * 4 * 4, 2))
    run = run_pass("prune_zero_channels", model, torch.randn(2, 3, 6, 6))
    assert (run.rewrites, run.error < 1e-6) == (1, True)


def test_unbatched_zero_channels_are_removed_along_dim_0():
    model = nn.Sequential(_with_zero_channels(nn.Conv1d(3, 5, 3)), nn.ReLU(), nn.Conv1d(5, 2, 1))
    run = run_pass("prune_zero_channels", model, torch.randn(3, 9))
    assert (run.rewrites, run.error < 1e-6) == (1, True)


class _PoolOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _with_zero_channels(nn.Conv2d(3, 5, 3)), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.b(F.max_pool3d(self.a(x), (2, 1, 1)))  # a 3-d pool on a 4-d tensor pools over channels


def test_pool_that_mixes_channels_keeps_them():
    run = run_pass("prune_zero_channels", _PoolOverChannels(), torch.randn(1, 3, 6, 6))
    assert run.rewrites == 0 and run.error < 1e-6


def test_pool_over_the_channel_axis_of_a_conv1d_output_keeps_them():
    model = nn.Sequential(_with_zero_channels(nn.Conv1d(3, 6, 3)), nn.MaxPool2d((3, 1)), nn.Conv1d(2, 2, 1))
    run = run_pass("prune_zero_channels", model, torch.randn(1, 3, 9))
    assert run.rewrites == 0 and run.error < 1e-6


def test_grouped_producer_loses_the_same_number_of_zero_channels_from_every_group():
    model = nn.Sequential(_with_zero_channels(nn.Conv2d(4, 6, 3, groups=2), (0, 4)), nn.ReLU(), nn.Conv2d(6, 2, 1))
    run = run_pass("prune_zero_channels", model, torch.randn(1, 4, 6, 6))
    assert (run.rewrites, run.error < 1e-6) == (1, True)
    grouped = run.layers(nn.Conv2d)[0]
    assert (grouped.out_channels, grouped.groups) == (4, 2)


def test_grouped_producer_with_zeros_in_one_group_only_keeps_them():
    model = nn.Sequential(_with_zero_channels(nn.Conv2d(4, 4, 3, groups=2), (0, 1)), nn.ReLU(), nn.Conv2d(4, 2, 1))
    run = run_pass("prune_zero_channels", model, torch.randn(1, 4, 6, 6))
    assert (run.rewrites, run.error < 1e-6) == (0, True)
    assert "same number from every group" in run.reasons


def test_depthwise_and_grouped_3d_producers_keep_a_lone_zero_channel():
    for conv, consumer, x in ((nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 2, 1), torch.randn(1, 4, 6, 6)),
                              (nn.Conv3d(4, 4, 3, groups=2), nn.Conv3d(4, 2, 1), torch.randn(1, 4, 5, 5, 5))):
        run = run_pass("prune_zero_channels", nn.Sequential(_with_zero_channels(conv, (1,)), consumer), x)
        assert (run.rewrites, run.error < 1e-6) == (0, True)
        assert "groups" in run.reasons


# ----------------------------------------------------------- through optimize: capture, every pass, verification


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

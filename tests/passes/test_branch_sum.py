"""``branch_sum`` alone: summed conv, BN and pool branches of one input become one conv, where aligned."""

import torch
from torch import nn

from fxreparam.testing import run_pass


class Branches(nn.Module):
    def __init__(self, *branches: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return sum(b(x) for b in self.branches)


def cbn(cin, cout, k, padding, groups=1, dims=2):
    conv = (nn.Conv1d, nn.Conv2d)[dims - 1](cin, cout, k, padding=padding, groups=groups)
    return nn.Sequential(conv, (nn.BatchNorm1d, nn.BatchNorm2d)[dims - 1](cout))


def test_repvgg_branches_merge():
    model = Branches(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1))
    run = run_pass("branch_sum", model, torch.randn(1, 4, 5, 5))
    assert (run.rewrites, run.count("conv"), run.error < 1e-6) == (1, 1, True)


def test_depthwise_branches_stay_depthwise():
    model = Branches(nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 6, 1, groups=6))
    run = run_pass("branch_sum", model, torch.randn(1, 6, 5, 5))
    (conv,) = run.layers(nn.Conv2d)
    assert (conv.groups, run.error < 1e-6) == (6, True)


def test_asymmetric_branches_alone_would_grow_the_kernel_and_are_refused():
    model = Branches(nn.Conv2d(4, 4, (1, 3), padding=(0, 1)), nn.Conv2d(4, 4, (3, 1), padding=(1, 0)))
    run = run_pass("branch_sum", model, torch.randn(1, 4, 5, 5))
    assert run.rewrites == 0 and "weights" in run.reasons


def test_misaligned_centers_are_refused():
    model = Branches(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 2, stride=2))
    run = run_pass("branch_sum", model, torch.randn(1, 4, 6, 6))
    assert run.rewrites == 0 and "center" in run.reasons


def test_unbatched_conv1d_branches_merge():
    model = Branches(nn.Conv1d(3, 3, 3, padding=1), nn.Conv1d(3, 3, 1))
    run = run_pass("branch_sum", model, torch.randn(3, 7))
    assert (run.rewrites, run.error < 1e-6) == (1, True)

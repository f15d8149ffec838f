"""``concat_convs`` alone: convs of one input concatenated on channels become one conv, where no costlier."""

import torch
from torch import nn

from fxreparam.testing import run_pass


class Concat(nn.Module):
    def __init__(self, *convs: nn.Module, dim: int = 1):
        super().__init__()
        self.convs, self.dim = nn.ModuleList(convs), dim

    def forward(self, x):
        return torch.cat([c(x) for c in self.convs], self.dim)


def test_equal_kernels_stack():
    model = Concat(nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.BatchNorm2d(2)))
    run = run_pass("concat_convs", model, torch.randn(2, 3, 6, 6))
    (conv,) = run.layers(nn.Conv2d)
    assert (run.rewrites, conv.out_channels, run.error < 1e-6) == (1, 6, True)


def test_stacking_a_1x1_with_a_3x3_would_cost_more_and_is_refused():
    model = Concat(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1))
    run = run_pass("concat_convs", model, torch.randn(2, 3, 6, 6))
    assert run.rewrites == 0 and "weights" in run.reasons


def test_concatenation_on_another_axis_is_left_alone():
    model = Concat(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1), dim=2)
    run = run_pass("concat_convs", model, torch.randn(2, 3, 6, 6))
    assert run.rewrites == 0 and run.error == 0


def test_unbatched_concatenation_on_dim_0_stacks():
    model = Concat(nn.Conv1d(3, 2, 3, padding=1), nn.Conv1d(3, 5, 3, padding=1), dim=0)
    run = run_pass("concat_convs", model, torch.randn(3, 8))
    assert (run.rewrites, run.error < 1e-6) == (1, True)

"""``identity`` alone: ``x + conv(x)`` becomes one conv with a Dirac kernel added; ``x + x`` stays."""

import torch
from torch import nn

from fxreparam.testing import run_pass


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def test_residual_folds_into_the_conv():
    run = run_pass("identity", Residual(nn.Conv2d(4, 4, 3, padding=1)), torch.randn(1, 4, 5, 5))
    assert (run.rewrites, run.count("add_sub"), run.error < 1e-6) == (1, 0, True)


def test_residual_on_an_unbatched_input_folds():
    run = run_pass("identity", Residual(nn.Conv2d(4, 4, 3, padding=1)), torch.randn(4, 5, 5))
    assert (run.rewrites, run.error < 1e-6) == (1, True)


def test_residual_around_a_grouped_conv_folds_per_group():
    run = run_pass("identity", Residual(nn.Conv2d(4, 4, 3, padding=1, stride=1, dilation=1, groups=2)),
                   torch.randn(1, 4, 5, 5))
    assert (run.rewrites, run.error < 1e-6) == (1, True)


def test_sum_of_a_tensor_with_itself_stays_elementwise():
    run = run_pass("identity", Residual(nn.Identity()), torch.randn(1, 4, 5, 5))
    assert run.rewrites == 0

"""``conv_bn``: an affine map after a conv or linear layer goes into its kernel (REPARAM §1).

First the pass alone on small graphs (``run_pass``), then end to end through ``optimize``: a parameter grid
over both captures, and the cases that must be refused.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import count_kind, fold, rel_err
from torch import nn

import fxreparam
from fxreparam.testing import randomize_batch_norms, run_pass


class Seq(nn.Sequential):
    pass


@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
def test_bn_after_conv_folds(capture):
    """In both forms the pass meets: aten ops (export) and module calls (symbolic_trace)."""
    run = run_pass("conv_bn", Seq(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), torch.randn(2, 3, 5, 5),
                   capture=capture)
    assert (run.rewrites, run.count("batch_norm"), run.error < 1e-6) == (1, 0, True)


def test_bn_after_transposed_grouped_conv_folds():
    run = run_pass("conv_bn", Seq(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)),
                   torch.randn(1, 4, 4, 4))
    assert (run.count("batch_norm"), run.error < 1e-6) == (0, True)


def test_bn1d_after_linear_folds():
    run = run_pass("conv_bn", Seq(nn.Linear(5, 3), nn.BatchNorm1d(3)), torch.randn(4, 5))
    assert (run.count("batch_norm"), run.error < 1e-6) == (0, True)


class Scaled(nn.Module):
    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 3)
        self.register_buffer("scale", scale)

    def forward(self, x):
        return self.conv(x) * self.scale


def test_per_channel_constant_on_an_unbatched_input_folds_along_dim_0():
    run = run_pass("conv_bn", Scaled(torch.tensor([[2.0], [3.0], [-1.0]])), torch.randn(3, 8))
    assert (run.rewrites, run.error < 1e-6) == (1, True)


def test_batch_norm_on_an_unbatched_conv1d_output_is_refused():
    # BatchNorm1d reads [C, L] as [N, C]: it normalizes along L, not along the conv's channels.
    run = run_pass("conv_bn", Seq(nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4)), torch.randn(4, 4))
    assert run.rewrites == 0 and "normalizes dim 1" in run.reasons


def test_infinite_scale_is_refused():
    run = run_pass("conv_bn", Scaled(torch.tensor([[1.0], [float("inf")], [2.0]])), torch.randn(1, 3, 8))
    assert run.rewrites == 0 and "not finite" in run.reasons


def test_zero_variance_with_zero_eps_is_refused():
    model = randomize_batch_norms(Seq(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, eps=0.0)))
    model[1].running_var[0] = 0.0
    run = run_pass("conv_bn", model, torch.randn(1, 2, 3, 3), randomize=False)
    assert run.rewrites == 0 and "not finite" in run.reasons


def test_shared_conv_output_is_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y), y

    run = run_pass("conv_bn", Shared(), torch.randn(1, 2, 5, 5))
    assert run.rewrites == 0 and "another consumer" in run.reasons


class _LinearBN(nn.Module):
    """LeViT's Linear-BN: the BN normalizes the features of every token, reached through a flatten."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x).flatten(0, 1)).reshape(x.shape[0], x.shape[1], 4)


def test_bn_reached_through_a_reshape_that_keeps_the_features_folds():
    run = run_pass("conv_bn", _LinearBN(), torch.randn(2, 5, 6))
    assert (run.rewrites, run.count("batch_norm"), run.error < 1e-6) == (1, 0, True)


def test_scale_that_broadcasts_the_rank_up_is_refused_after_the_conv():
    class ScaleUpARank(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv1d(3, 4, 3)
            self.register_buffer("g", torch.randn(1, 4, 1))

        def forward(self, x):
            return self.a(x) * self.g

    run = run_pass("conv_bn", ScaleUpARank(), torch.randn(3, 9))
    assert run.rewrites == 0 and "broadcasts" in run.reasons


# ----------------------------------------------------------- through optimize: capture, every pass, verification


CONVS = {(1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
         (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d}
BNS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class ConvBN(nn.Module):
    def __init__(self, dims, transposed, groups, stride, dilation, bias, affine):
        super().__init__()
        kw = {"output_padding": stride - 1} if transposed else {}
        self.conv = CONVS[(dims, transposed)](4, 6, 3, stride=stride, padding=dilation, dilation=dilation,
                                              groups=groups, bias=bias, **kw)
        self.bn = BNS[dims](6, affine=affine, eps=1e-3)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class FunctionalConvBN(nn.Module):
    """The torch-function form: F.conv2d and F.batch_norm on stored tensors."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4, 3, 3))
        self.b = nn.Parameter(torch.randn(6))
        self.register_buffer("mean", torch.randn(6))
        self.register_buffer("var", torch.rand(6) + 0.5)
        self.gamma = nn.Parameter(torch.randn(6))
        self.beta = nn.Parameter(torch.randn(6))

    def forward(self, x):
        y = F.conv2d(x, self.w, self.b, padding=1)
        return F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5)


def _input(dims: int) -> torch.Tensor:
    return torch.randn(2, 4, *[7] * dims)


GRID = list(itertools.product([1, 2, 3], [False, True], [1, 2], [1, 2], [1, 2], [True, False], [True, False]))


@pytest.mark.parametrize(("dims", "transposed", "groups", "stride", "dilation", "bias", "affine"), GRID)
def test_conv_bn_grid_symbolic_trace(dims, transposed, groups, stride, dilation, bias, affine):
    model = ConvBN(dims, transposed, groups, stride, dilation, bias, affine)
    folded = fold(model, _input(dims), capture="symbolic_trace")
    assert fxreparam.report(folded).after.batch_norm == 0
    assert fxreparam.report(folded).rewrites["conv_bn"] == 1


@pytest.mark.parametrize(("dims", "transposed", "groups", "stride", "dilation", "bias", "affine"), GRID[::5])
def test_conv_bn_grid_export(dims, transposed, groups, stride, dilation, bias, affine):
    model = ConvBN(dims, transposed, groups, stride, dilation, bias, affine)
    folded = fold(model, _input(dims))
    rep = fxreparam.report(folded)
    assert rep.capture.startswith("torch.export")
    assert rep.after.batch_norm == 0 and rep.after.conv == 1
    assert rep.verification.ok  # per channel, float32 against float64, within the model's own rounding


def test_conv_bn_functional_form():
    folded = fold(FunctionalConvBN(), torch.randn(2, 4, 8, 8), capture="symbolic_trace")
    assert fxreparam.report(folded).after.batch_norm == 0
    assert count_kind(folded, nn.Conv2d) == 1


def test_conv_bn_float64_is_exact_to_rounding():
    model = ConvBN(2, False, 2, 1, 1, True, True).double()
    folded = fold(model, _input(2).double())
    x = _input(2).double()
    assert rel_err(model(x), folded(x)) < 1e-13


def test_refuses_conv_output_with_second_consumer():
    class TwoConsumers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) * y

    folded = fold(TwoConsumers(), torch.randn(2, 4, 6, 6))
    rep = fxreparam.report(folded)
    assert rep.after.batch_norm == 1
    assert any("bn 'bn' after conv 'conv': its output has another consumer" in r.reason for r in rep.refusals)


def test_refuses_bn_without_running_stats():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    folded = fold(model, torch.randn(4, 3, 6, 6))
    rep = fxreparam.report(folded)
    assert rep.after.batch_norm == 1
    assert any("track_running_stats=False" in r.reason and "'1'" in r.reason for r in rep.refusals)


def test_refuses_bn_forced_into_training_mode():
    class Forced(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            b = self.bn
            return F.batch_norm(self.conv(x), b.running_mean, b.running_var, b.weight, b.bias, True, 0.0, b.eps)

    folded = fold(Forced(), torch.randn(4, 3, 6, 6), capture="symbolic_trace")
    rep = fxreparam.report(folded)
    assert rep.after.batch_norm == 1
    assert any("training mode" in r.reason for r in rep.refusals)


@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
def test_conv_then_constant_scale_and_shift(capture):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, padding=1)
            self.register_buffer("gamma", torch.randn(1, 5, 1, 1))
            self.register_buffer("shift", torch.randn(5, 1, 1))

        def forward(self, x):
            return (self.conv(x) * self.gamma + self.shift) * 0.5 - 1.0

    folded = fold(Scaled(), torch.randn(2, 3, 6, 6), capture=capture)
    rep = fxreparam.report(folded)
    assert rep.after.mul_div == 0 and rep.after.add_sub == 0 and rep.after.conv == 1


def test_constant_that_is_not_per_channel_is_left_alone():
    class Spatial(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, padding=1)
            self.register_buffer("mask", torch.randn(1, 1, 6, 6))

        def forward(self, x):
            return self.conv(x) * self.mask

    folded = fold(Spatial(), torch.randn(2, 3, 6, 6))
    assert fxreparam.report(folded).after.mul_div == 1


@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
def test_linear_bn_both_orders(capture):
    model = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3),
                          nn.BatchNorm1d(3))
    folded = fold(model, torch.randn(5, 8), capture=capture)
    rep = fxreparam.report(folded)
    assert rep.after.batch_norm == 0 and rep.after.linear == 2


def test_linear_bn_refused_on_3d_input():
    # BatchNorm1d normalizes dim 1 of [N, C, L]; the linear layer mixes dim 2: not a per-channel fold.
    model = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(4))
    folded = fold(model, torch.randn(3, 4, 5))
    rep = fxreparam.report(folded)
    assert rep.after.batch_norm == 1
    assert any("normalizes dim 1" in r.reason for r in rep.refusals)

"""``conv_bn`` alone on small graphs: an affine map after a conv or linear layer goes into its kernel."""

import torch
from torch import nn

from fxreparam.testing import randomize_batch_norms, run_pass


class Seq(nn.Sequential):
    pass


def test_bn_after_conv_folds():
    run = run_pass("conv_bn", Seq(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), torch.randn(2, 3, 5, 5))
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

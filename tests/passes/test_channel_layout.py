"""``channel_layout`` alone: a per-channel affine reached from a conv or Linear through permute / transpose / view /
flatten folds into the layer where its constant takes one value per layer channel, and is refused (with the reason)
where it varies within a channel or the layer's output has another reader."""

from collections.abc import Callable

import pytest
import torch
from torch import nn

from fxreparam.testing import run_pass

CAPTURES = ["export", "symbolic_trace"]


class Chain(nn.Module):
    """``after(layout(layer(x)))``, optionally also returning ``layer(x)`` (a second reader)."""

    def __init__(self, layer: nn.Module, layout: Callable, after: nn.Module | Callable, leak: bool = False):
        super().__init__()
        self.layer, self.layout, self.leak = layer, layout, leak
        self.after = after if isinstance(after, nn.Module) else None
        self.fn = None if isinstance(after, nn.Module) else after

    def forward(self, x):
        y = self.layer(x)
        z = self.layout(y)
        z = self.after(z) if self.after is not None else self.fn(z)
        return (z, y) if self.leak else z


class Scale(nn.Module):
    """``gamma * x`` with ``gamma`` of a given shape (a layer scale)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(shape))

    def forward(self, x):
        return self.gamma * x


def _nchw(y):
    return y.permute(0, 3, 1, 2)


@pytest.mark.parametrize("capture", CAPTURES)
def test_bn2d_after_nhwc_linear_permuted_back_folds_into_the_linear(capture):
    run = run_pass("channel_layout", Chain(nn.Linear(6, 8), _nchw, nn.BatchNorm2d(8)), torch.randn(2, 5, 5, 6),
                   capture=capture)
    assert (run.rewrites, run.count("batch_norm"), run.count("linear"), run.error < 1e-6) == (1, 0, 1, True)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("shape", [(1, 8, 1, 1), (8, 1, 1)])
def test_layer_scale_after_the_permute_folds(capture, shape):
    run = run_pass("channel_layout", Chain(nn.Linear(6, 8), _nchw, Scale(shape)), torch.randn(2, 4, 3, 6),
                   capture=capture)
    assert (run.rewrites, run.count("mul_div"), run.error < 1e-6) == (1, 0, True)


def test_layer_scale_on_the_last_axis_then_bn_after_permute_both_fold():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.gamma, self.bn = nn.Linear(6, 8), nn.Parameter(torch.randn(8)), nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn(_nchw(self.fc(x) * self.gamma) + 0.5)

    run = run_pass("channel_layout", Block(), torch.randn(2, 3, 3, 6))
    # the add of 0.5 sits between the permute and the BN: neither is a fold of this pass (the mul is conv_bn's)
    assert (run.rewrites, run.count("batch_norm")) == (0, 1)
    both = run_pass(["conv_bn", "channel_layout"], Block(), torch.randn(2, 3, 3, 6))
    assert (both.count("batch_norm"), both.count("mul_div"), both.count("add_sub"), both.error < 1e-6) == (
        0, 0, 0, True)


@pytest.mark.parametrize("capture", CAPTURES)
def test_transpose_of_a_conv1d_then_a_per_feature_scale_folds(capture):
    # [B, C, L] -> [B, L, C], a vector on the last axis: per conv channel
    run = run_pass("channel_layout", Chain(nn.Conv1d(3, 5, 3), lambda y: y.transpose(1, 2), Scale((5,))),
                   torch.randn(2, 3, 9), capture=capture)
    assert (run.rewrites, run.count("mul_div"), run.count("conv"), run.error < 1e-6) == (1, 0, 1, True)


@pytest.mark.parametrize("capture", CAPTURES)
def test_reshape_splitting_the_channel_axis_folds_with_the_vector_repeated(capture):
    # RepMLP's fc3 -> reshape(-1, C, h, w) -> BN2d(C): conv channel k = c*h*w + i*w + j gets the BN's vector at c
    c, h, w = 3, 2, 4
    layout = lambda y: y.reshape(-1, c, h, w)  # noqa: E731
    run = run_pass("channel_layout", Chain(nn.Conv2d(c * h * w, c * h * w, 1, groups=2), layout, nn.BatchNorm2d(c)),
                   torch.randn(3, c * h * w, 1, 1), capture=capture)
    assert (run.rewrites, run.count("batch_norm"), run.error < 1e-6) == (1, 0, True)


def test_unflatten_of_a_linear_then_bn2d_folds():
    run = run_pass("channel_layout", Chain(nn.Linear(5, 12), nn.Unflatten(1, (3, 2, 2)), nn.BatchNorm2d(3)),
                   torch.randn(4, 5), capture="symbolic_trace")
    assert (run.rewrites, run.count("batch_norm"), run.error < 1e-6) == (1, 0, True)


def _bn1d_constant_per_channel(channels: int, block: int) -> nn.BatchNorm1d:
    """A BatchNorm1d over ``channels * block`` features whose statistics are the same within each channel's block."""
    bn = nn.BatchNorm1d(channels * block)
    with torch.no_grad():
        for t, lo in ((bn.weight, 0.5), (bn.bias, -1.0), (bn.running_mean, -1.0), (bn.running_var, 0.5)):
            t.copy_((torch.rand(channels) + lo).repeat_interleave(block))
    return bn


@pytest.mark.parametrize("capture", CAPTURES)
def test_flatten_then_bn1d_over_chw_is_refused_where_it_varies_within_a_channel(capture):
    flat = lambda y: y.view(y.size(0), -1)  # noqa: E731
    run = run_pass("channel_layout", Chain(nn.Conv2d(3, 4, 3, padding=1), flat, nn.BatchNorm1d(4 * 5 * 5)),
                   torch.randn(2, 3, 5, 5), capture=capture)
    assert (run.rewrites, run.count("batch_norm")) == (0, 1)
    assert "varies within one channel of the layer" in run.reasons


@pytest.mark.parametrize("capture", CAPTURES)
def test_flatten_then_bn1d_constant_within_each_channel_block_folds(capture):
    flat = lambda y: y.flatten(1)  # noqa: E731
    run = run_pass("channel_layout", Chain(nn.Conv2d(3, 4, 3, padding=1), flat, _bn1d_constant_per_channel(4, 25)),
                   torch.randn(2, 3, 5, 5), capture=capture, randomize=False)
    assert (run.rewrites, run.count("batch_norm"), run.error < 1e-6) == (1, 0, True)


def test_linear_over_tokens_flattened_then_bn1d_per_feature_is_refused():
    # [B, N, C] -> [B, N*C] -> BN1d(N*C): the vector differs between tokens of one Linear feature
    run = run_pass("channel_layout", Chain(nn.Linear(4, 3), lambda y: y.flatten(1), nn.BatchNorm1d(6)),
                   torch.randn(5, 2, 4))
    assert (run.rewrites, run.count("batch_norm")) == (0, 1)
    assert "varies within one channel" in run.reasons


@pytest.mark.parametrize("capture", CAPTURES)
def test_layer_output_read_elsewhere_is_refused(capture):
    run = run_pass("channel_layout", Chain(nn.Linear(6, 8), _nchw, nn.BatchNorm2d(8), leak=True),
                   torch.randn(2, 3, 3, 6), capture=capture)
    assert (run.rewrites, run.count("batch_norm")) == (0, 1)
    assert "output has another consumer" in run.reasons


def test_intermediate_layout_value_read_elsewhere_is_refused():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(6, 8), nn.BatchNorm2d(8)

        def forward(self, x):
            p = _nchw(self.fc(x))
            return self.bn(p.contiguous()), p

    run = run_pass("channel_layout", Leaky(), torch.randn(2, 3, 3, 6))
    assert (run.rewrites, run.count("batch_norm")) == (0, 1)
    assert "output has another consumer" in run.reasons


@pytest.mark.parametrize("capture", CAPTURES)
def test_affine_varying_on_a_spatial_axis_is_refused(capture):
    run = run_pass("channel_layout", Chain(nn.Linear(6, 8), _nchw, Scale((1, 1, 3, 1))), torch.randn(2, 3, 4, 6),
                   capture=capture)
    assert (run.rewrites, run.count("mul_div")) == (0, 1)
    assert "varies within one channel" in run.reasons


def test_bn_after_a_permute_of_a_non_layer_is_refused_with_the_reason():
    run = run_pass("channel_layout", Chain(nn.GELU(), _nchw, nn.BatchNorm2d(6)), torch.randn(2, 3, 3, 6))
    assert (run.rewrites, run.count("batch_norm")) == (0, 1)
    assert "not of a conv or linear layer" in run.reasons


def test_a_constant_that_broadcasts_the_input_up_is_refused():
    run = run_pass("channel_layout", Chain(nn.Linear(6, 8), _nchw, Scale((2, 8, 1, 1))), torch.randn(1, 3, 3, 6))
    assert (run.rewrites, run.count("mul_div")) == (0, 1)
    assert "broadcasts the input" in run.reasons


def test_a_reshape_that_regroups_the_dynamic_batch_is_refused():
    # [B, 4, 1] -> [8, B/2]: at B=2 row r holds channel r % 4 (a per-channel vector repeated twice fits), at B=4
    # row r holds channels 2r % 4 and (2r+1) % 4: which channel a row holds depends on the (dynamic) batch
    scale = Scale((8, 1))
    with torch.no_grad():
        scale.gamma.copy_(torch.rand(4).repeat(2)[:, None])
    run = run_pass("channel_layout", Chain(nn.Conv1d(2, 4, 1), lambda y: y.reshape(8, -1), scale),
                   torch.randn(2, 2, 1))  # export keeps the batch dynamic
    assert (run.rewrites, run.count("mul_div")) == (0, 1)
    traced = run_pass("channel_layout", Chain(nn.Conv1d(2, 4, 1), lambda y: y.reshape(8, -1), scale),
                      torch.randn(2, 2, 1), capture="symbolic_trace")  # records one size: dim 0 may vary all the same
    assert (traced.rewrites, traced.count("mul_div")) == (0, 1)


def test_bn_right_after_the_layer_is_left_to_conv_bn():
    run = run_pass("channel_layout", nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), torch.randn(1, 3, 4, 4))
    assert (run.rewrites, run.refusals) == (0, [])


LAYOUTS = {
    "movedim": lambda y: y.movedim(1, -1),
    "swapaxes_contiguous": lambda y: y.swapaxes(1, 3).contiguous(),
    "flatten_unflatten": lambda y: y.flatten(2).unflatten(2, (3, 4)).permute(0, 2, 3, 1),
    "unsqueeze_squeeze": lambda y: y.unsqueeze(2).permute(0, 2, 3, 4, 1).squeeze(1),
}


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_chains_of_layout_ops_ending_channels_last_fold_a_per_channel_scale(capture, layout):
    # a conv's channels moved to the last axis by various chains; a [C] vector there is per conv channel
    run = run_pass("channel_layout", Chain(nn.Conv2d(3, 5, 3, padding=1), LAYOUTS[layout], Scale((5,))),
                   torch.randn(2, 3, 3, 4), capture=capture)
    assert (run.rewrites, run.count("mul_div"), run.count("conv"), run.error < 1e-6) == (1, 0, 1, True)


def test_transposed_grouped_conv_then_permute_then_scale_folds():
    model = Chain(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), lambda y: y.permute(0, 2, 3, 1), Scale((6,)))
    run = run_pass("channel_layout", model, torch.randn(1, 4, 3, 3))
    assert (run.rewrites, run.count("mul_div"), run.error < 1e-6) == (1, 0, True)


def test_unbatched_conv_permuted_channels_last_then_scale_folds():
    run = run_pass("channel_layout", Chain(nn.Conv1d(3, 5, 1), lambda y: y.t(), Scale((5,))), torch.randn(3, 7),
                   capture="symbolic_trace")
    assert (run.rewrites, run.count("mul_div"), run.error < 1e-6) == (1, 0, True)

"""``pool_as_conv`` alone: an exact average pool before a per-channel affine becomes a depthwise conv where a sum
holds a conv that absorbs it, and stays a pool (declined as costlier) elsewhere."""

import torch
from torch import nn

import fxreparam
from fxreparam.testing import randomize_batch_norms, run_pass


class _Summed(nn.Module):
    """``main(x) + bn(pool(pre(x)))``: an average pool's branch summed with a conv."""

    def __init__(self, main: nn.Module, pool: nn.Module, pre: nn.Module | None = None, other_input: bool = False):
        super().__init__()
        self.main, self.pool, self.pre, self.bn = main, pool, pre, nn.BatchNorm2d(4)
        self.other_input = other_input

    def forward(self, x):
        y = self.bn(self.pool(x if self.pre is None else self.pre(x)))
        return self.main(x.flip(-1) if self.other_input else x) + y


def test_a_lone_pool_before_bn_stays_a_pool():
    run = run_pass("pool_as_conv", nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(4)), torch.randn(1, 4, 5, 5))
    assert (run.rewrites, run.count("conv")) == (0, 0)
    assert run.refusals[0].declined and "no sum holds a conv that would absorb it" in run.reasons


def test_pool_and_bn_summed_with_a_kxk_of_the_same_input_becomes_a_depthwise_conv_and_merges():
    model = _Summed(nn.Conv2d(4, 4, 3, 1, 1), nn.AvgPool2d(3, 1, 1))
    x = torch.randn(1, 4, 6, 6)
    run = run_pass("pool_as_conv", model, x)
    assert (run.rewrites, run.count("conv"), run.error < 1e-6) == (1, 2, True)
    folded = fxreparam.optimize(randomize_batch_norms(model).eval(), (x,))
    assert sum(isinstance(m, nn.Conv2d) for m in folded.modules()) == 1
    assert fxreparam.report(folded).costlier is None


def test_pool_of_a_1x1_summed_with_a_kxk_of_the_1x1s_input_becomes_a_conv_and_folds():
    # DBB's 1x1-avg branch: the pool composes with the 1x1 (sequential), and the kxk absorbs the composition.
    model = _Summed(nn.Conv2d(4, 4, 3), nn.AvgPool2d(3, 1), pre=nn.Conv2d(4, 4, 1))
    x = torch.randn(1, 4, 6, 6)
    assert run_pass("pool_as_conv", model, x).rewrites == 1
    folded = fxreparam.optimize(randomize_batch_norms(model).eval(), (x,))
    assert sum(isinstance(m, nn.Conv2d) for m in folded.modules()) == 1
    assert fxreparam.report(folded).costlier is None


def test_pool_summed_with_a_conv_that_cannot_absorb_it_stays_a_pool():
    x = torch.randn(1, 4, 6, 6)
    smaller = run_pass("pool_as_conv", _Summed(nn.Conv2d(4, 4, 1), nn.AvgPool2d(3, 1, 1)), x)
    other_input = run_pass("pool_as_conv", _Summed(nn.Conv2d(4, 4, 3, 1, 1), nn.AvgPool2d(3, 1, 1), other_input=True),
                           x)
    strided = run_pass("pool_as_conv", _Summed(nn.Conv2d(4, 4, 7), nn.AvgPool2d(3, 3)), torch.randn(1, 4, 9, 9))
    assert (smaller.rewrites, other_input.rewrites, strided.rewrites) == (0, 0, 0)
    assert smaller.refusals[0].declined and strided.refusals[0].declined


def test_lone_pool_and_bn_optimized_are_never_costlier():
    model = randomize_batch_norms(nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(4))).eval()
    folded = fxreparam.optimize(model, torch.randn(2, 4, 6, 6))
    assert fxreparam.report(folded).costlier is None


def test_pool_without_padding_count_is_refused():
    run = run_pass("pool_as_conv", nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.BatchNorm2d(4)),
                   torch.randn(1, 4, 5, 5))
    assert run.rewrites == 0 and "count_include_pad" in run.reasons


def test_pool_on_an_unbatched_input_reads_channels_on_dim_0():
    run = run_pass("pool_as_conv", _Unbatched(), torch.randn(3, 8))
    assert (run.rewrites, run.error < 1e-6) == (1, True)


class _Unbatched(nn.Module):
    """A pool and a per-channel scale summed with a conv of the same unbatched ``(C, L)`` input."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv1d(3, 3, 2, 2), nn.AvgPool1d(2)
        self.register_buffer("scale", torch.tensor([[2.0], [3.0], [4.0]]))

    def forward(self, x):
        return self.conv(x) + self.pool(x) * self.scale

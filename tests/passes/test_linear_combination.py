"""``linear_combination`` alone: ``sum_i c_i * f_i(x)`` over affine layers of one input, one layer's output read
several times (DoRA), as one layer; refused where a coefficient is not per output channel."""

import torch
from torch import nn

from fxreparam.testing import run_pass


def _vector(*shape: int) -> torch.Tensor:
    return torch.rand(*shape) + 0.5


class _Reused(nn.Module):
    """``y + c1 * y - 0.5 * (y - b) * c2 + 3`` with ``y = conv(x)`` read three times."""

    def __init__(self, coef_shape=(1, 6, 1, 1)):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.register_buffer("c1", _vector(*coef_shape))
        self.register_buffer("c2", _vector(1, 6, 1, 1))
        self.register_buffer("b", torch.randn(1, 6, 1, 1))

    def forward(self, x):
        y = self.conv(x)
        return y + self.c1 * y - 0.5 * (y - self.b) * self.c2 + 3


def test_a_layer_read_three_times_with_per_channel_and_scalar_coefficients_is_one_conv():
    run = run_pass("linear_combination", _Reused(), torch.randn(2, 4, 7, 7))
    assert (run.rewrites, run.count("conv"), run.count("add_sub"), run.count("mul_div")) == (1, 1, 0, 0)
    assert run.error < 1e-6


def test_a_coefficient_on_a_spatial_axis_is_refused():
    run = run_pass("linear_combination", _Reused(coef_shape=(1, 1, 7, 1)), torch.randn(2, 4, 7, 7))
    assert run.rewrites == 0 and "not per-channel" in run.reasons and run.count("conv") == 1


class _DoraConv(nn.Module):
    """DoRA on a conv as peft computes it: ``y + (n - 1) * (y - b) + n * s * B(A(x))`` with A a kxk, B a 1x1 and
    ``n = m / ||W + s * B A||`` per output channel, computed in forward from parameters only."""

    def __init__(self, cin=4, cout=6, r=2, k=3):
        super().__init__()
        torch.manual_seed(1)
        self.base = nn.Conv2d(cin, cout, k, padding=k // 2)
        self.a = nn.Conv2d(cin, r, k, padding=k // 2, bias=False)
        self.b = nn.Conv2d(r, cout, 1, bias=False)
        self.m = nn.Parameter(_vector(1, cout, 1, 1))

    def forward(self, x):
        w, r = self.base.weight, self.a.weight.shape[0]
        delta = torch.mm(self.b.weight.view(-1, r), self.a.weight.view(r, -1)).reshape(w.shape)
        n = self.m / (w + 2.0 * delta).norm(p=2, dim=(1, 2, 3), keepdim=True).transpose(1, 0)
        y = self.base(x)
        return y + (n - 1) * (y - self.base.bias.view(1, -1, 1, 1)) + n * self.b(self.a(x)) * 2.0


def test_dora_conv_form_with_its_adapter_chain_is_one_conv():
    """``fold_constants`` precomputes the norm and the bias view; then the tree is one 3x3 conv."""
    run = run_pass(["fold_constants", "linear_combination"], _DoraConv(), torch.randn(2, 4, 8, 8))
    (conv,) = run.layers(nn.Conv2d)
    assert (conv.kernel_size, run.count("add_sub"), run.count("mul_div"), run.refusals) == ((3, 3), 0, 0, [])
    assert run.error < 1e-6


class _DoraLinear(nn.Module):
    """DoRA's form on a Linear over tokens (channels on the last dim), with ``sub`` and a Linear -> Linear chain."""

    def __init__(self, cin=8, cout=5, r=2):
        super().__init__()
        torch.manual_seed(2)
        self.base, self.a, self.b = nn.Linear(cin, cout), nn.Linear(cin, r, bias=False), nn.Linear(r, cout, bias=False)
        self.register_buffer("m", _vector(1, cout))
        self.register_buffer("one_minus_m", 1 - self.m)

    def forward(self, x):
        y = self.base(x)
        return y - self.one_minus_m * (y - self.base.bias) + self.m * self.b(self.a(x)) * 0.5


def test_dora_linear_form_is_one_linear():
    run = run_pass("linear_combination", _DoraLinear(), torch.randn(2, 3, 8))
    assert (run.rewrites, run.count("linear"), run.count("add_sub"), run.count("mul_div")) == (1, 1, 0, 0)
    assert run.error < 1e-6


class _ReadOutside(nn.Module):
    """``y + 2 * y + B(A(x))`` where ``y`` is also returned: ``y``'s conv must stay."""

    def __init__(self, r: int):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.a, self.b = nn.Conv2d(4, r, 3, padding=1, bias=False), nn.Conv2d(r, 4, 1, bias=False)

    def forward(self, x):
        y = self.conv(x)
        return y + 2 * y + self.b(self.a(x)), y


def test_a_layer_read_outside_stays_and_the_fold_that_would_add_weights_is_declined():
    run = run_pass("linear_combination", _ReadOutside(r=2), torch.randn(1, 4, 6, 6))
    assert run.rewrites == 0 and "weights" in run.reasons and run.count("conv") == 3


def test_a_layer_read_outside_stays_and_the_combination_folds_where_it_costs_less():
    run = run_pass("linear_combination", _ReadOutside(r=16), torch.randn(1, 4, 6, 6))
    assert (run.rewrites, run.count("conv"), run.count("add_sub"), run.count("mul_div")) == (1, 2, 0, 0)
    assert run.error < 1e-6


class _WithInput(nn.Module):
    """``y + c * y + k * x``: the bare input is a term of its own."""

    def __init__(self, per_channel: bool):
        super().__init__()
        torch.manual_seed(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.register_buffer("c", _vector(1, 4, 1, 1))
        self.register_buffer("k", _vector(1, 4, 1, 1) if per_channel else torch.tensor(3.0))

    def forward(self, x):
        y = self.conv(x)
        return y + self.c * y + self.k * x


def test_a_non_layer_term_keeps_its_scalar_coefficient():
    run = run_pass("linear_combination", _WithInput(per_channel=False), torch.randn(1, 4, 6, 6))
    assert (run.rewrites, run.count("conv"), run.count("add_sub"), run.count("mul_div")) == (1, 1, 1, 1)
    assert run.error < 1e-6


def test_a_non_layer_term_with_a_per_channel_coefficient_is_refused():
    run = run_pass("linear_combination", _WithInput(per_channel=True), torch.randn(1, 4, 6, 6))
    assert run.rewrites == 0 and "varies per channel" in run.reasons


class _Kernels(nn.Module):
    """``y3 + 0.5 * y3 + y1``: a 3x3 read twice and a 1x1 of the same input, merged as branch_sum aligns them."""

    def __init__(self, stride1: int = 1):
        super().__init__()
        torch.manual_seed(5)
        self.k3, self.k1 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1, stride=stride1)

    def forward(self, x):
        y = self.k3(x)
        return y + 0.5 * y + self.k1(x)


def test_kernels_of_different_sizes_merge_centered():
    run = run_pass("linear_combination", _Kernels(), torch.randn(1, 4, 6, 6))
    (conv,) = run.layers(nn.Conv2d)
    assert (run.rewrites, conv.kernel_size, run.error < 1e-6) == (1, (3, 3), True)


class _PaddedAfterBias(nn.Module):
    """``y + 0.5 * y + B(A(x))`` with A a 1x1 with a bias and B a zero-padded 3x3: B's border taps read 0 where A
    would give its bias, so the chain is not one conv (REPARAM §6)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)
        nn.init.uniform_(self.a.bias, 0.5, 1.0)

    def forward(self, x):
        y = self.conv(x)
        return y + 0.5 * y + self.b(self.a(x))


def test_a_chain_that_does_not_compose_exactly_stays_two_layers():
    run = run_pass("linear_combination", _PaddedAfterBias(), torch.randn(1, 4, 6, 6))
    assert (run.rewrites, run.count("conv"), run.count("mul_div"), run.error < 1e-6) == (1, 3, 0, True)


class _PlainSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.k3, self.k1 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.k3(x) + self.k1(x)


def test_a_plain_sum_of_single_use_layers_is_left_to_branch_sum():
    run = run_pass("linear_combination", _PlainSum(), torch.randn(1, 4, 6, 6))
    assert (run.rewrites, run.refusals) == (0, [])

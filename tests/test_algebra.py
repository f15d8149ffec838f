"""Each kernel-algebra function against torch.nn.functional on random data."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fxreparam import algebra

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.double(), b.double(), rtol=1e-10, atol=1e-10)


def test_bn_to_affine_matches_batch_norm():
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    mean, var = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.1
    gamma, beta = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    a, c = algebra.bn_to_affine(mean, var, gamma, beta, 1e-3)
    expected = F.batch_norm(x, mean, var, gamma, beta, training=False, eps=1e-3)
    assert close(a.view(1, -1, 1, 1) * x + c.view(1, -1, 1, 1), expected)
    a, c = algebra.bn_to_affine(mean, var, None, None, 1e-5)  # affine=False
    assert close(a.view(1, -1, 1, 1) * x + c.view(1, -1, 1, 1), F.batch_norm(x, mean, var, training=False))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_scale_output_channels(dims, groups):
    x = torch.randn(2, 8, *[6] * dims, dtype=torch.float64)
    w = torch.randn(12, 8 // groups, *[3] * dims, dtype=torch.float64)
    s = torch.randn(12, dtype=torch.float64)
    y = CONV[dims](x, algebra.scale_output_channels(w, s), groups=groups)
    assert close(y, CONV[dims](x, w, groups=groups) * s.view(1, -1, *[1] * dims))


@pytest.mark.parametrize("groups", [1, 3])
def test_scale_output_channels_transposed(groups):
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64)  # [I, O/g, k, k]
    out_ch = 3 * groups
    s = torch.randn(out_ch, dtype=torch.float64)
    scaled = algebra.scale_output_channels(w, s, groups=groups, transposed=True)
    y = F.conv_transpose2d(x, scaled, groups=groups, stride=2)
    assert close(y, F.conv_transpose2d(x, w, groups=groups, stride=2) * s.view(1, -1, 1, 1))


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_scale_input_channels_and_shift_through_kernel(groups):
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    w = torch.randn(4 * groups, 8 // groups, 3, 3, dtype=torch.float64)
    s, c = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    affine_x = x * s.view(1, -1, 1, 1) + c.view(1, -1, 1, 1)
    expected = F.conv2d(affine_x, w, groups=groups)  # padding 0: every tap reads real input
    w2 = algebra.scale_input_channels(w, s, groups=groups)
    b2 = algebra.shift_through_kernel(w, c, groups=groups)
    assert close(F.conv2d(x, w2, b2, groups=groups), expected)


def test_shift_through_linear_kernel():
    x = torch.randn(5, 6, dtype=torch.float64)
    w, c = torch.randn(3, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    assert close(F.linear(x, w, algebra.shift_through_kernel(w, c)), F.linear(x + c, w))


def test_center_pad_aligns_centers():
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    w1 = torch.randn(5, 4, 1, 3, dtype=torch.float64)
    padded = algebra.center_pad(w1, (3, 3))
    assert padded.shape == (5, 4, 3, 3)
    assert close(F.conv2d(x, padded, padding=1), F.conv2d(x, w1, padding=(0, 1)))
    with pytest.raises(ValueError):
        algebra.center_pad(torch.randn(1, 1, 2, 2), (3, 3))


@pytest.mark.parametrize(("groups", "new_groups"), [(4, 1), (4, 2), (8, 8)])
def test_regroup(groups, new_groups):
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    w = torch.randn(8, 8 // groups, 3, 3, dtype=torch.float64)
    assert close(F.conv2d(x, algebra.regroup(w, groups, new_groups), groups=new_groups), F.conv2d(x, w, groups=groups))


def test_sum_kernels():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    ws = [torch.randn(4, 3, 3, 3, dtype=torch.float64) for _ in range(3)]
    assert close(F.conv2d(x, algebra.sum_kernels(ws)), sum(F.conv2d(x, w) for w in ws))


@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("k", [(1, 1), (3, 3), (5, 3)])
def test_identity_kernel(groups, k):
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    w = algebra.identity_kernel(6, 6 // groups, k)
    assert close(F.conv2d(x, w, groups=groups, padding=(k[0] // 2, k[1] // 2)), x)


def test_identity_kernel_refuses_even_sizes():
    with pytest.raises(ValueError):
        algebra.identity_kernel(4, 4, (2, 2))


def test_compose_both_orders():
    x = torch.randn(2, 5, 8, 8, dtype=torch.float64)
    kxk = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    pw_after = torch.randn(4, 6, 1, 1, dtype=torch.float64)
    w, g = algebra.compose(pw_after, 1, kxk, 1)
    assert g == 1 and close(F.conv2d(x, w), F.conv2d(F.conv2d(x, kxk), pw_after))
    pw_before = torch.randn(7, 5, 1, 1, dtype=torch.float64)
    kxk2 = torch.randn(3, 7, 3, 3, dtype=torch.float64)
    w, g = algebra.compose(kxk2, 1, pw_before, 1)
    assert g == 1 and close(F.conv2d(x, w), F.conv2d(F.conv2d(x, pw_before), kxk2))


@pytest.mark.parametrize(("outer_groups", "inner_groups"), [(4, 4), (2, 4), (4, 1), (8, 8)])
def test_compose_keeps_the_common_group_structure(outer_groups, inner_groups):
    """REPARAM §9: a grouped 1x1 then a grouped kxk compose per group, at gcd of the group counts."""
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    pw = torch.randn(8, 8 // inner_groups, 1, 1, dtype=torch.float64)
    kxk = torch.randn(8, 8 // outer_groups, 3, 3, dtype=torch.float64)
    b1, b2 = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    w, g = algebra.compose(kxk, outer_groups, pw, inner_groups)
    bias = algebra.compose_bias(kxk, b2, outer_groups, b1)
    want = F.conv2d(F.conv2d(x, pw, b1, groups=inner_groups), kxk, b2, groups=outer_groups)
    assert g == math.gcd(outer_groups, inner_groups) and close(F.conv2d(x, w, bias, groups=g), want)


def test_linear_weights_compose():
    x = torch.randn(3, 5, dtype=torch.float64)
    a, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    w, _ = algebra.compose(b, 1, a, 1)
    assert close(x @ w.T, (x @ a.T) @ b.T)


def test_cast_to_rounds_once_to_the_model_dtype():
    w = torch.randn(3, 3, dtype=torch.float16)
    out = algebra.cast_to(algebra.exact(w) * 2, w.dtype, w.device)
    assert out.dtype == torch.float16 and torch.equal(out, w * 2)


def test_finite_rejects_inf_and_nan():
    assert algebra.finite(torch.ones(2), None)
    assert not algebra.finite(torch.tensor([1.0, float("inf")]))
    assert not algebra.finite(torch.tensor([float("nan")]))


def test_avg_pool_kernel_is_the_pool():
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    w = algebra.avg_pool_kernel(3, (3, 3))
    assert close(F.conv2d(x, w, stride=2, padding=1, groups=3), F.avg_pool2d(x, 3, 2, 1))


@pytest.mark.parametrize("groups", [1, 2])
def test_affine_after_and_before_a_conv(groups):
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    w, b = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    a_out, c_out = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    w2, b2 = algebra.affine_after(w, b, (a_out, c_out), groups=groups)
    expected = F.conv2d(x, w, b, groups=groups) * a_out.view(1, -1, 1, 1) + c_out.view(1, -1, 1, 1)
    assert close(F.conv2d(x, w2, b2, groups=groups), expected)
    a_in, c_in = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    w3, b3 = algebra.affine_before(w, b, (a_in, c_in), groups=groups)
    expected = F.conv2d(x * a_in.view(1, -1, 1, 1) + c_in.view(1, -1, 1, 1), w, b, groups=groups)
    assert close(F.conv2d(x, w3, b3, groups=groups), expected)


@pytest.mark.parametrize(("groups", "structure"), [(1, 4), (1, 1), (2, 8), (1, 6)])
def test_coarsest_groups_finds_the_block_structure(groups, structure):
    """REPARAM §9: a kernel whose off-diagonal blocks are zero is the same conv with more groups."""
    x = torch.randn(2, 24, 5, 5, dtype=torch.float64)
    fine = torch.randn(24, 24 // structure, 3, 3, dtype=torch.float64)
    dense = algebra.regroup(fine, structure, groups) if structure % groups == 0 else fine
    start = groups if structure % groups == 0 else structure
    w, g = algebra.coarsest_groups(dense, start)
    assert g == max(structure, start) and w.shape[1] == 24 // g
    assert close(F.conv2d(x, w, groups=g), F.conv2d(x, dense, groups=start))


def test_coarsest_groups_keeps_a_dense_kernel_dense():
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    assert algebra.coarsest_groups(w, 1)[1] == 1


def test_undilate_is_the_same_conv():
    x = torch.randn(1, 2, 11, 11, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 2, dtype=torch.float64)
    wide = algebra.undilate(w, (2, 3))
    assert wide.shape[2:] == (5, 4)
    assert close(F.conv2d(x, wide, padding=(2, 1)), F.conv2d(x, w, padding=(2, 1), dilation=(2, 3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sum_centered_is_the_padded_regrouped_sum(dtype):
    """A merge builds its kernel in one tensor: bit for bit the sum of the padded, regrouped kernels, inputs kept."""
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    kernels = [(torch.randn(8, 4, 3, 3).to(dtype), 2), (torch.randn(8, 8, 1, 1).to(dtype), 1),
               (torch.randn(8, 1, 1, 1).to(dtype), 8), (torch.randn(8, 1, 3, 1).to(dtype), 8)]
    before = [w.clone() for w, _ in kernels]
    merged = algebra.sum_centered(kernels, 1, (3, 3))
    expected = algebra.sum_kernels([algebra.center_pad(algebra.regroup(w, g, 1), (3, 3)) for w, g in kernels])
    assert merged.dtype == torch.float64 and torch.equal(merged, expected)
    assert all(torch.equal(w, b) for (w, _), b in zip(kernels, before))
    pads = {(3, 3): (1, 1), (1, 1): (0, 0), (3, 1): (1, 0)}
    branches = sum(F.conv2d(x, w.double(), padding=pads[tuple(w.shape[2:])], groups=g) for w, g in kernels)
    assert close(F.conv2d(x, merged, padding=1), branches)
    dense = [(torch.randn(8, 8, 3, 3).to(dtype), 1), (torch.randn(8, 8, 1, 1).to(dtype), 1)]  # the first fills it
    expected = algebra.sum_kernels([algebra.center_pad(w, (3, 3)) for w, _ in dense])
    assert torch.equal(algebra.sum_centered(dense, 1, (3, 3)), expected)
    with pytest.raises(ValueError):
        algebra.sum_centered([(torch.randn(8, 4, 3, 3), 2)], 4, (3, 3))


def test_kernels_are_computed_in_float64_from_any_dtype_and_rounded_once():
    """float32 kernels are read in place (no float64 copy first) with float64 results; ``dtype=`` rounds once."""
    w, s = torch.randn(6, 3, 3, 3), torch.randn(6, dtype=torch.float64) * 3
    exact = algebra.scale_output_channels(w.double(), s)
    assert torch.equal(algebra.scale_output_channels(w, s), exact)
    stored = algebra.scale_output_channels(w, s, dtype=torch.float32)
    assert stored.dtype == torch.float32 and torch.equal(stored, algebra.cast_to(exact, torch.float32, w.device))
    weight, bias = algebra.affine_after(w, None, (s, s), dtype=torch.float16)
    assert weight.dtype == torch.float16 and bias.dtype == torch.float64
    assert torch.equal(weight, exact.to(torch.float16))
    inner = algebra.scale_input_channels(w.double(), s[:3])
    weight, _ = algebra.affine_before(w, None, (s[:3], s[:3]), dtype=torch.float32)
    assert weight.dtype == torch.float32 and torch.equal(weight, inner.float())
    assert torch.equal(algebra.regroup(w, 2, 1), algebra.regroup(w.double(), 2, 1))
    point = w[:, :, :1, :1]
    assert torch.equal(algebra.center_pad(point, (3, 3)), algebra.center_pad(point.double(), (3, 3)))
    single = algebra.sum_kernels([w])
    assert single.dtype == torch.float64 and torch.equal(single, w.double())
    w64 = w.double()
    assert algebra.sum_kernels([w64]).data_ptr() != w64.data_ptr()  # a new tensor, never the input


def test_coarsest_groups_keeps_the_kernel_dtype():
    w = algebra.regroup(torch.randn(8, 2, 3, 3), 4, 1).float()
    grouped, groups = algebra.coarsest_groups(w, 1)
    assert groups == 4 and grouped.dtype == torch.float32

"""The kernel algebra: pure tensor functions that every pass builds kernels with.

Each function upcasts to float64 for the arithmetic (``exact``), and callers cast
the final kernel back to the model's dtype with :func:`cast_to`, so a fold adds
one rounding at most. Shapes follow PyTorch: a conv weight is ``[O, I/g, *k]``,
a transposed-conv weight ``[I, O/g, *k]``, a linear weight ``[O, I]``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

__all__ = [
    "Affine",
    "affine_after",
    "affine_before",
    "avg_pool_kernel",
    "bn_to_affine",
    "cast_to",
    "center_pad",
    "coarsest_groups",
    "compose",
    "compose_bias",
    "composed_shape",
    "exact",
    "finite",
    "identity_kernel",
    "regroup",
    "scale_input_channels",
    "scale_output_channels",
    "shift_through_kernel",
    "sum_centered",
    "sum_kernels",
    "undilate",
]

Affine = tuple[torch.Tensor, torch.Tensor]
"""A per-channel affine map ``y = scale * x + shift``, both of shape ``[C]``."""


def exact(t: torch.Tensor) -> torch.Tensor:
    """The tensor in float64 (complex stays complex), detached: the precision folds are computed in."""
    t = t.detach()
    return t if t.is_complex() else t.to(torch.float64)


def _exact_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype :func:`exact` gives ``t``."""
    return t.dtype if t.is_complex() else torch.float64


def _times(weight: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``exact(weight) * factor`` (``factor`` float64, broadcast to ``weight``) with one temporary: the upcast copy is
    scaled in place (a mixed-dtype multiply is not vectorized and runs slower). With ``dtype``, rounded once into it,
    as ``cast_to`` would."""
    w = weight.detach()
    product = w.to(torch.promote_types(_exact_dtype(w), factor.dtype), copy=True).mul_(factor)
    return product if dtype is None else product.to(dtype)


def cast_to(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``t`` cast to the model's dtype and device: folds are computed exactly, stored as the model's."""
    return t.to(dtype=dtype, device=device).contiguous()


def finite(*tensors: torch.Tensor | None) -> bool:
    """Whether every entry is finite: a kernel built from an inf or nan scale would put nan where the
    original computes +-inf, so such folds are refused (REPARAM §1, §8)."""
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


def bn_to_affine(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> Affine:
    """Inference BatchNorm as ``a * x + c``: ``a = gamma / sqrt(var + eps)``, ``c = beta - mean * a``."""
    mean, var = exact(running_mean), exact(running_var)
    gamma = exact(weight) if weight is not None else torch.ones_like(mean)
    beta = exact(bias) if bias is not None else torch.zeros_like(mean)
    a = gamma / torch.sqrt(var + eps)
    return a, beta - mean * a


def _channel_view(v: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return v.reshape(shape)


def scale_output_channels(
    weight: torch.Tensor, scale: torch.Tensor, *, groups: int = 1, transposed: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Multiply output channel ``o`` of a conv or linear kernel by ``scale[o]`` (REPARAM §1).

    A transposed conv keeps its output channels on weight dim 1, per group. The product is float64; with
    ``dtype`` it is rounded once into that dtype as it is written (the same values as ``cast_to`` of it).
    """
    w, s = weight.detach(), exact(scale)
    if not transposed:
        return _times(w, _channel_view(s, w.dim(), 0), dtype)
    in_ch, out_per_group = w.shape[0], w.shape[1]
    w = w.reshape(groups, in_ch // groups, out_per_group, *w.shape[2:])
    s = s.reshape(groups, 1, out_per_group, *([1] * (w.dim() - 3)))
    return _times(w, s, dtype).reshape(weight.shape)


def scale_input_channels(weight: torch.Tensor, scale: torch.Tensor, *, groups: int = 1,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fold ``x * scale`` (per input channel) into the kernel that reads x (REPARAM §2, §8).

    Input channel ``i`` of group ``g`` sits at ``weight[g*O/g : (g+1)*O/g, i - g*I/g]``. The product is float64;
    with ``dtype`` it is rounded once into that dtype as it is written.
    """
    w, s = weight.detach(), exact(scale)
    out_ch, in_per_group = w.shape[0], w.shape[1]
    w = w.reshape(groups, out_ch // groups, in_per_group, *w.shape[2:])
    return _times(w, s.reshape(groups, 1, in_per_group, *([1] * (w.dim() - 3))), dtype).reshape(weight.shape)


def shift_through_kernel(weight: torch.Tensor, shift: torch.Tensor, *, groups: int = 1) -> torch.Tensor:
    """The per-output bias that a constant input ``shift[i]`` produces: ``sum_{i,k} W[o,i,k] * shift[i]``.

    Exact only where every tap reads real input (no zero padding): see REPARAM §2.
    """
    w, c = exact(weight), exact(shift)
    out_ch, in_per_group = w.shape[0], w.shape[1]
    w = w.reshape(groups, out_ch // groups, in_per_group, -1).sum(-1)  # [g, O/g, I/g]
    c = c.reshape(groups, in_per_group, 1)
    return torch.bmm(w, c).reshape(out_ch)


def center_pad(weight: torch.Tensor, kernel_size: Sequence[int]) -> torch.Tensor:
    """Zero-pad a kernel symmetrically to ``kernel_size`` so that the centers align (REPARAM §3)."""
    w = weight.detach()
    window = _center(w.shape[2:], kernel_size)
    if all(s == slice(None) for s in window):
        return exact(w)
    out = torch.zeros(*w.shape[:2], *kernel_size, dtype=_exact_dtype(w), device=w.device)
    out[(slice(None), slice(None), *window)] = w  # the copy upcasts: one pass, no padded float64 temporary
    return out


def _center(have: Sequence[int], kernel_size: Sequence[int]) -> tuple[slice, ...]:
    """Per spatial dim, where a ``have`` kernel sits centered in a ``kernel_size`` one (``slice(None)``: all of it)."""
    if len(have) != len(kernel_size):
        raise ValueError(f"cannot center a {tuple(have)} kernel in {tuple(kernel_size)}")
    window = []
    for k, want in zip(have, kernel_size):
        extra = want - k
        if extra < 0 or extra % 2:
            raise ValueError(f"cannot center a {tuple(have)} kernel in {tuple(kernel_size)}")
        window.append(slice(extra // 2, extra // 2 + k) if extra else slice(None))
    return tuple(window)


def regroup(weight: torch.Tensor, groups: int, new_groups: int) -> torch.Tensor:
    """Express a grouped kernel with fewer groups, zero-filling the off-diagonal blocks (REPARAM §3).

    ``new_groups`` must divide ``groups``; the result has shape ``[O, I/new_groups, *k]``.
    """
    if groups == new_groups:
        return exact(weight)
    w = weight.detach()
    if groups % new_groups:
        raise ValueError(f"{new_groups} groups do not divide {groups}")
    result = torch.zeros(w.shape[0], w.shape[1] * (groups // new_groups), *w.shape[2:], dtype=_exact_dtype(w),
                         device=w.device)
    _diagonal_blocks(result, groups, new_groups).copy_(_as_blocks(w, groups, new_groups))
    return result


def _diagonal_blocks(kernel: torch.Tensor, groups: int, new_groups: int) -> torch.Tensor:
    """A view of the diagonal blocks of ``kernel`` (``[O, I/new_groups, *k]``) that a ``groups``-group kernel fills,
    ``[new_groups, O/groups, I/groups, *k, m]`` (``m = groups/new_groups``): group ``g`` at ``[g // m, ..., g % m]``."""
    merge = groups // new_groups
    out_ch, wide, *k = kernel.shape
    blocks = kernel.view(new_groups, merge, out_ch // groups, merge, wide // merge, *k)
    return torch.diagonal(blocks, dim1=1, dim2=3)


def _as_blocks(weight: torch.Tensor, groups: int, new_groups: int) -> torch.Tensor:
    """``weight`` (``[O, I/groups, *k]``) laid out as :func:`_diagonal_blocks`' view."""
    merge = groups // new_groups
    out_ch, in_per_group, *k = weight.shape
    blocks = weight.reshape(new_groups, merge, out_ch // groups, in_per_group, *k)
    return blocks.movedim(1, -1)


def _block_diagonal(w: torch.Tensor, groups: int, new_groups: int) -> torch.Tensor | None:
    """``w`` (``[O, I/groups, *k]``) at ``new_groups`` groups if every tap outside those diagonal blocks is zero."""
    out_ch, in_per_group = w.shape[0], w.shape[1]
    in_ch = in_per_group * groups
    if out_ch % new_groups or in_ch % new_groups:
        return None
    if in_per_group > in_ch // new_groups and bool(w[0, in_ch // new_groups:].any()):
        return None  # output channel 0 reads outside its block: a dense kernel is refused at one row's cost
    o = torch.arange(out_ch).unsqueeze(1)
    absolute = (o // (out_ch // groups)) * in_per_group + torch.arange(in_per_group).unsqueeze(0)  # [O, I/g]
    allowed = absolute // (in_ch // new_groups) == o // (out_ch // new_groups)
    if bool(w[~allowed].any()):
        return None
    return w[allowed].reshape(out_ch, in_ch // new_groups, *w.shape[2:])


def coarsest_groups(weight: torch.Tensor, groups: int) -> tuple[torch.Tensor, int]:
    """The same conv kernel at the largest group count whose off-diagonal blocks are all zero (REPARAM §9).

    A fold that built ``[O, I/g, *k]`` may have produced a block-diagonal kernel (a depthwise branch
    composed with a depthwise pool); stored with more groups it costs that many times less. The kernel keeps its
    dtype (the blocks are selected, not computed): a kernel already in the model's dtype is not copied.
    """
    w = weight.detach()
    out_ch, in_ch = w.shape[0], w.shape[1] * groups
    rest = math.gcd(out_ch, in_ch) // groups if math.gcd(out_ch, in_ch) % groups == 0 else 1
    p = 2
    while rest > 1:
        if rest % p:
            p += 1
            continue
        finer = _block_diagonal(w, groups, groups * p)
        rest //= p
        if finer is not None:
            w, groups = finer, groups * p
        else:
            while rest % p == 0:  # no block structure at p: none at any power of p either
                rest //= p
    return w, groups


def undilate(weight: torch.Tensor, dilation: Sequence[int]) -> torch.Tensor:
    """The same conv at dilation 1: taps spread ``dilation`` apart, zeros between (REPARAM §10).

    A ``k``-tap kernel at dilation ``d`` becomes ``d * (k - 1) + 1`` taps.
    """
    w = weight.detach()
    size = [d * (k - 1) + 1 for k, d in zip(w.shape[2:], dilation)]
    out = torch.zeros(*w.shape[:2], *size, dtype=_exact_dtype(w), device=w.device)
    out[(slice(None), slice(None), *[slice(None, None, d) for d in dilation])] = w
    return out


def sum_kernels(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The kernel of a sum of convs that share stride, padding alignment and groups: the sum of kernels."""
    shape = torch.broadcast_shapes(*(w.shape for w in weights))
    dtype = _exact_dtype(weights[0])
    for w in weights[1:]:
        dtype = torch.promote_types(dtype, _exact_dtype(w))
    total = torch.empty(shape, dtype=dtype, device=weights[0].device)
    total.copy_(weights[0].detach())  # the copy upcasts; the rest add into it in place, each read once
    for w in weights[1:]:
        total.add_(w.detach())
    return total


def sum_centered(kernels: Sequence[tuple[torch.Tensor, int]], groups: int, kernel_size: Sequence[int]
                 ) -> torch.Tensor:
    """``sum_kernels([center_pad(regroup(w, g, groups), kernel_size) for w, g in kernels])``, built in one kernel:
    each ``(weight, its groups)`` added into its diagonal blocks and centered window (REPARAM §3), nothing padded
    or regrouped on the way, so a merge writes its result once."""
    first = kernels[0][0]
    dtype = _exact_dtype(first)
    for w, _ in kernels[1:]:
        dtype = torch.promote_types(dtype, _exact_dtype(w))
    covers = kernels[0][1] == groups and tuple(first.shape[2:]) == tuple(kernel_size)  # the first fills it all
    total = (torch.empty if covers else torch.zeros)(first.shape[0], first.shape[1] * kernels[0][1] // groups,
                                                     *kernel_size, dtype=dtype, device=first.device)
    for i, (w, g) in enumerate(kernels):
        w = w.detach()
        if g % groups:
            raise ValueError(f"{groups} groups do not divide {g}")
        window = (slice(None), slice(None), *_center(w.shape[2:], kernel_size))
        target = _diagonal_blocks(total[window], g, groups)
        source = _as_blocks(w, g, groups)
        target.copy_(source) if i == 0 else target.add_(source)  # the first is copied: bit for bit the sum
    return total


def identity_kernel(channels: int, in_per_group: int, kernel_size: Sequence[int]) -> torch.Tensor:
    """The Dirac kernel of the identity map: ``W[o, o mod (I/g), center] = 1`` (REPARAM §4)."""
    if any(k % 2 == 0 for k in kernel_size):
        raise ValueError(f"an identity kernel needs odd sizes, not {tuple(kernel_size)}")
    w = torch.zeros(channels, in_per_group, *kernel_size, dtype=torch.float64)
    center = tuple(k // 2 for k in kernel_size)
    o = torch.arange(channels)
    w[(o, o % in_per_group, *center)] = 1.0
    return w


def affine_after(weight: torch.Tensor, bias: torch.Tensor | None, affine: Affine, *, groups: int = 1,
                 transposed: bool = False, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of ``scale * layer(x) + shift`` (REPARAM §1, §8): ``W * a`` per output, ``b * a + c``.

    ``dtype``: the kernel rounded once into it (a fold that stores it as it is); the bias stays float64.
    """
    scale, shift = exact(affine[0]), exact(affine[1])
    new_bias = (exact(bias) * scale if bias is not None else torch.zeros_like(scale)) + shift
    return scale_output_channels(weight, scale, groups=groups, transposed=transposed, dtype=dtype), new_bias


def affine_before(weight: torch.Tensor, bias: torch.Tensor | None, affine: Affine, *, groups: int = 1,
                  dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of ``layer(scale * x + shift)`` where every tap reads real input (REPARAM §2).

    ``dtype``: the kernel rounded once into it (a fold that stores it as it is); the bias stays float64.
    """
    scale, shift = exact(affine[0]), exact(affine[1])
    new_bias = shift_through_kernel(weight, shift, groups=groups)
    if bias is not None:
        new_bias = new_bias + exact(bias)
    return scale_input_channels(weight, scale, groups=groups, dtype=dtype), new_bias


def avg_pool_kernel(channels: int, kernel_size: Sequence[int]) -> torch.Tensor:
    """The depthwise kernel of an average pool: ``1 / prod(k)`` at every tap (REPARAM §7)."""
    return torch.full((channels, 1, *kernel_size), 1.0 / math.prod(kernel_size), dtype=torch.float64)


def composed_shape(outer: Sequence[int], outer_groups: int, inner: Sequence[int], inner_groups: int
                   ) -> tuple[tuple[int, ...], int]:
    """Shape and groups of :func:`compose`'s kernel from the two kernels' shapes alone: a cost check can refuse a
    composition before computing it."""
    groups = math.gcd(outer_groups, inner_groups)
    kernel = tuple(outer[2:]) if any(k != 1 for k in outer[2:]) else tuple(inner[2:])
    return (outer[0], inner[1] * inner_groups // groups, *kernel), groups


def compose(outer: torch.Tensor, outer_groups: int, inner: torch.Tensor, inner_groups: int
            ) -> tuple[torch.Tensor, int]:
    """Kernel and groups of ``outer(inner(x))`` where one of the two is pointwise (1x1, or linear) (REPARAM §6, §9).

    The two compose per group at ``gcd`` of their group counts (a grouped 1x1 then a kxk with the same
    groups stays grouped). ``outer``: ``[O, M/go, *k_o]``, ``inner``: ``[M, I/gi, *k_i]``; linear weights
    ``[O, M]`` and ``[M, I]`` compose the same way.
    """
    groups = math.gcd(outer_groups, inner_groups)
    v, u = regroup(outer, outer_groups, groups), regroup(inner, inner_groups, groups)
    o, m, i = v.shape[0], u.shape[0], u.shape[1]
    v = v.reshape(groups, o // groups, m // groups, *v.shape[2:])
    u = u.reshape(groups, m // groups, i, *u.shape[2:])
    if all(k == 1 for k in v.shape[3:]):  # pointwise after kxk: mix the kxk's output channels
        w = torch.einsum("gom,gmi...->goi...", v.flatten(3).squeeze(-1) if v.dim() > 3 else v, u)
    elif all(k == 1 for k in u.shape[3:]):  # kxk after pointwise: mix the kxk's input channels
        w = torch.einsum("gom...,gmi->goi...", v, u.flatten(3).squeeze(-1) if u.dim() > 3 else u)
    else:
        raise ValueError("compose needs one pointwise (1x1) kernel")
    return w.reshape(o, i, *w.shape[3:]), groups


def correlate(outer: torch.Tensor, outer_groups: int, inner: torch.Tensor, inner_groups: int, groups: int, *,
              step: Sequence[int], dilation: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Kernel of ``outer(inner(x))`` for two spatial convs, at ``groups`` (REPARAM §6, §9): each outer tap ``t``
    mixes the inner kernel's channels and lands at ``t * step`` (the outer's dilation times the inner's stride),
    the inner's taps spaced by its ``dilation``; ``size`` is the composed kernel's (a full correlation per group)."""
    v, u = regroup(outer, outer_groups, groups), regroup(inner, inner_groups, groups)
    o, m, i = v.shape[0], u.shape[0], u.shape[1]
    v = v.reshape(groups, o // groups, m // groups, *v.shape[2:])
    u = u.reshape(groups, m // groups, i, *u.shape[2:])
    w = torch.zeros(groups, o // groups, i, *size, dtype=torch.promote_types(u.dtype, v.dtype), device=u.device)
    for tap in itertools.product(*(range(k) for k in v.shape[3:])):
        window = tuple(slice(t * st, t * st + d * (k - 1) + 1, d) for t, st, d, k in zip(tap, step, dilation,
                                                                                            u.shape[3:]))
        w[(slice(None),) * 3 + window] += torch.einsum("gom,gmi...->goi...", v[(..., *tap)], u)
    return w.reshape(o, i, *size)


def compose_bias(outer: torch.Tensor, outer_bias: torch.Tensor | None, outer_groups: int,
                 inner_bias: torch.Tensor | None) -> torch.Tensor | None:
    """Bias of ``outer(inner(x))``: the inner bias through the outer kernel, plus the outer bias.

    Exact where every tap of ``outer`` reads the inner layer's output (no zero padding between them).
    """
    bias = shift_through_kernel(outer, inner_bias, groups=outer_groups) if inner_bias is not None else None
    if outer_bias is not None:
        bias = exact(outer_bias) if bias is None else bias + exact(outer_bias)
    return bias

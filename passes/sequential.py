"""``sequential``: two linear layers in a row as one (REPARAM §6, §9).

- kxk then pointwise 1x1 (ResRep's compactor): always exact.
- pointwise 1x1 then kxk (DBB's 1x1-kxk branch): exact when the kxk does not zero-pad, when the
  1x1 has no bias, or when the tensor between them is padded with exactly the 1x1's bias (DBB's
  BN-and-pad, recognized by value); the pair becomes one kxk conv padding its input.
- an exact average pool counts as a depthwise kxk (DBB's 1x1-avg branch); Linear then Linear (any input rank).
- two convs that both span space (a 1xk then a kx1, separable; any kxk pair): one conv whose kernel is the
  full correlation of the two, exact under :func:`_spatial_spec`'s padding and bias conditions (§6). It grows
  the kernel, so it folds where a conv at least as large sums with it (RepNeXt's decomposed depthwise kernels).
The pair composes per group (a grouped 1x1 then a kxk with the same groups stays grouped). It
folds where the result costs no more than the two layers, or where a layer of the same input in the
same sum will absorb it (a conv at least as large; a linear of the same width, LoRA's base layer):
``branch_sum`` then merges it into a layer that is there anyway. That composition is provisional: if
the sum does not fold after all, ``settle_provisional`` restores the pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import fx

from fxreparam import algebra, branches, cost, ops
from fxreparam.graph import LayerParts, Provisional, emit, mark_provisional
from fxreparam.meta import concrete_shape, speculation_undone
from fxreparam.padding import padded_by_value
from fxreparam.registry import Costlier, NotExact, PassContext, register_pass
from fxreparam.spec import ConvSpec, Layer


def _conv_like(gm: fx.GraphModule, node: fx.Node) -> Layer | None:
    """A non-transposed conv, or an exact average pool read as one."""
    layer = ops.conv(gm, node) or branches.pool_as_conv(gm, node)
    return layer if layer is not None and not layer.transposed else None


def _same_values(border: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """The border equals the 1x1's bias up to a few roundings in the model's dtype (both were computed there)."""
    bias = torch.zeros_like(border) if bias is None else bias
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return torch.allclose(border, bias, rtol=8 * eps, atol=8 * eps * float(bias.abs().max().clamp_min(1e-30)))


def _positions(layer: Layer) -> int:
    shape = concrete_shape(layer.node)
    return cost.node_positions(layer.node, layer.spec.channel_dim(len(shape))) if shape is not None else 1


def _absorbs_linear(gm: fx.GraphModule, source: fx.Node, width: int) -> Callable[[fx.Node], bool]:
    """A term that is a linear layer of ``source`` whose output the composed ``width`` outputs sum into (equal,
    or broadcast from one), so that the merged layer has its shape (LoRA's base layer)."""
    def fits(term: fx.Node) -> bool:
        layer = ops.linear(gm, term)
        return layer is not None and layer.input is source and width in (1, layer.weight.shape[0])
    return fits


def _fold_conv_pair(ctx: PassContext, outer: Layer) -> bool:
    gm, mid = ctx.gm, outer.input
    border = padded_by_value(gm, mid, outer.node) if not any(outer.spec.padding) else None
    inner_node = border.input if border is not None else mid
    inner = _conv_like(gm, inner_node)
    if inner is None or len(inner_node.users) != 1 or (border is None and len(mid.users) != 1):
        return False
    if inner.spec.dims != outer.spec.dims:
        return False
    where = f"{ctx.label(inner.node, 'conv')} then {ctx.label(outer.node, 'conv')}"
    inner_bias = algebra.exact(inner.bias) if inner.bias is not None else None
    if outer.spec.pointwise(outer.kernel_size):  # kxk then 1x1: always exact
        if border is not None:
            return False
        spec = inner.spec
    elif inner.spec.pointwise(inner.kernel_size):  # 1x1 then kxk: exact where no border tap reads the bias as 0
        spec = outer.spec
        if border is not None:
            pads = border.pads
            if any(pads[2 * i] != pads[2 * i + 1] for i in range(len(pads) // 2)):
                raise NotExact(f"{where}: the padding between them is not symmetric", outer.node)
            if not _same_values(border.border, inner_bias, inner.weight.dtype):
                raise NotExact(f"{where}: the border written between them is not the 1x1's output for a zero input, "
                               "so the pair is not one conv on a zero-padded input", outer.node)
            spec = replace(spec, padding=tuple(reversed(pads[::2])), padding_mode="zeros")
        elif any(outer.spec.padding) and outer.spec.padding_mode == "zeros" and inner_bias is not None \
                and bool(inner_bias.any()):
            raise NotExact(f"{where}: the kxk zero-pads the 1x1's output, whose bias is not zero (border taps "
                           "would read the bias, not 0)", outer.node)
    else:
        return _fold_spatial_pair(ctx, inner, outer, border is not None, where)
    shape, groups = algebra.composed_shape(outer.weight.shape, outer.groups, inner.weight.shape, inner.groups)
    spec = replace(spec, groups=groups)
    has_bias = outer.bias is not None or inner_bias is not None
    why = cost.why_costlier([cost.kernel_cost(inner.weight, inner.bias, _positions(inner)),
                             cost.kernel_cost(outer.weight, outer.bias, _positions(outer))],
                            _planned_cost(shape, has_bias, _positions(outer)))
    restorable = border is None and ops.conv(gm, inner.node) is not None and ops.conv(gm, outer.node) is not None
    absorbs = branches.conv_absorbs(gm, inner.input, tuple(shape[2:]), spec.stride, spec.groups)
    if why is not None and not (branches.summed_with(outer.node, absorbs)
                                and not (restorable and speculation_undone(outer.node))):
        if ops.conv(gm, outer.node) is None:
            return False  # a conv then a plain pooling: no structure to fold, nothing to report
        raise Costlier(f"{where}: not composed: {why}", outer.node)
    record = _provisional(inner, outer) if why is not None and restorable else None
    weight, _ = algebra.compose(outer.weight, outer.groups, inner.weight, inner.groups)
    bias = algebra.compose_bias(outer.weight, outer.bias, outer.groups, inner_bias)
    new = emit(gm, spec, weight, bias, input=inner.input, replaces=outer.node, storage=outer.storage,
               name=outer.name, at=inner.node)
    if record is not None:  # costlier than the pair: it pays only if the sum absorbs it (else settle_provisional)
        mark_provisional(new, replace(record, target=str(new.target)))
    return True


def _spatial_spec(inner: Layer, outer: Layer, where: str) -> tuple[ConvSpec, tuple[int, ...], tuple[int, ...]]:
    """The spec of one conv equal to ``outer(inner(x))`` for two spatial convs, with each axis's step between outer
    taps in the composed kernel and its size; raises NotExact where no conv is (docs/identities.md s6).

    Per axis (inner kernel ``k``, stride ``s``, dilation ``d``, padding ``p``; outer ``k', s', d', p'``) the pair reads
    input ``(m s' + t d' - p') s + q d - p``: one conv of stride ``s s'``, padding ``p + s p'``, dilation 1, its taps
    at ``t d' s + q d`` (size ``d' s (k'-1) + d (k-1) + 1``). Exact where the outer does not pad that axis, or where
    the inner's output continued past its border is zero, as the outer's padding reads it: stride 1 and
    ``p >= d (k-1)`` (a 1xk on the axis its kernel does not span, ``k = 1, p = 0``, is). And where the outer pads
    anywhere, the inner has no bias: its padding reads 0, not the bias the composed conv would add there.
    """
    si, so = inner.spec, outer.spec
    for layer in (inner, outer):
        if any(layer.spec.padding) and layer.spec.padding_mode != "zeros":
            raise NotExact(f"{where}: {layer.spec.padding_mode} padding composes into no zero-padded conv", outer.node)
    step, size = [], []
    for a in range(si.dims):
        k, s, d, p = inner.kernel_size[a], si.stride[a], si.dilation[a], si.padding[a]
        k2, d2, p2 = outer.kernel_size[a], so.dilation[a], so.padding[a]
        if p2 and (s != 1 or p < d * (k - 1)):
            raise NotExact(f"{where}: the outer conv zero-pads spatial axis {a}, where the inner's output continued "
                           f"past its border is not zero (inner padding {p} < {d * (k - 1)} or stride {s})",
                           outer.node)
        step.append(d2 * s)
        size.append(d2 * s * (k2 - 1) + d * (k - 1) + 1)
    if any(so.padding) and inner.bias is not None and bool(inner.bias.detach().any()):
        raise NotExact(f"{where}: the outer conv zero-pads the inner's output, whose bias is not zero (border taps "
                       "would read the bias, not 0)", outer.node)
    spec = replace(so, stride=tuple(a * b for a, b in zip(si.stride, so.stride)),
                   padding=tuple(p + s * p2 for p, s, p2 in zip(si.padding, si.stride, so.padding)),
                   dilation=(1,) * si.dims, groups=math.gcd(inner.groups, outer.groups), padding_mode="zeros")
    return spec, tuple(step), tuple(size)


def _fold_spatial_pair(ctx: PassContext, inner: Layer, outer: Layer, padded_between: bool, where: str) -> bool:
    """Two spatial convs in a row (a 1xk then a kx1) as one: where no costlier, or provisionally where a conv of the
    same input in the same sum is at least as large (``branch_sum`` merges it there); refused with the reason else."""
    gm = ctx.gm
    if ops.conv(gm, inner.node) is None or ops.conv(gm, outer.node) is None:
        return False  # an average pool in the pair: no kernel of its own to compose here
    if padded_between:
        raise NotExact(f"{where}: a pad written between two spatial convs: not composed", outer.node)
    spec, step, size = _spatial_spec(inner, outer, where)
    shape = (outer.weight.shape[0], inner.weight.shape[1] * inner.groups // spec.groups, *size)
    has_bias = outer.bias is not None or inner.bias is not None
    why = cost.why_costlier([cost.kernel_cost(inner.weight, inner.bias, _positions(inner)),
                             cost.kernel_cost(outer.weight, outer.bias, _positions(outer))],
                            _planned_cost(shape, has_bias, _positions(outer)))
    absorbs = branches.conv_absorbs(gm, inner.input, size, spec.stride, spec.groups)
    if why is not None and (speculation_undone(outer.node) or not branches.summed_with(outer.node, absorbs)):
        raise Costlier(f"{where}: not composed: {why}, and no conv of the same input in the same sum is as large",
                       outer.node)
    record = _provisional(inner, outer) if why is not None else None
    weight = algebra.correlate(outer.weight, outer.groups, inner.weight, inner.groups, spec.groups, step=step,
                               dilation=inner.spec.dilation, size=size)
    inner_bias = algebra.exact(inner.bias) if inner.bias is not None else None
    bias = algebra.compose_bias(outer.weight, outer.bias, outer.groups, inner_bias)
    new = emit(gm, spec, weight, bias, input=inner.input, replaces=outer.node, storage=outer.storage,
               name=outer.name, at=inner.node)
    if record is not None:  # costlier than the pair: it pays only if the sum absorbs it (else settle_provisional)
        mark_provisional(new, replace(record, target=str(new.target)))
    return True


def _parts(layer: Layer) -> LayerParts:
    return LayerParts(layer.spec, layer.weight, layer.bias, layer.storage, layer.name, dict(layer.node.meta))


def _provisional(inner: Layer, outer: Layer) -> Provisional:
    """The record that restores ``inner`` then ``outer`` if their composition is not absorbed (target set on emit)."""
    return Provisional("", inner.input, _parts(inner), _parts(outer))


def _planned_cost(shape: tuple[int, ...], has_bias: bool, positions: int) -> cost.Cost:
    """The cost of a kernel of ``shape`` not computed yet (meta tensors hold its sizes, no values)."""
    bias = torch.empty(shape[0], device="meta") if has_bias else None
    return cost.kernel_cost(torch.empty(shape, device="meta"), bias, positions)


def _fold_linear_pair(ctx: PassContext, outer: Layer) -> bool:
    """Linear then Linear (any input rank, both on the last dim) as one: where no costlier, or provisionally where
    a linear of the same input in the same sum absorbs the product (LoRA's ``base(x) + B(A(x))``)."""
    gm = ctx.gm
    inner = ops.linear(gm, outer.input)
    if inner is None or len(outer.input.users) != 1:
        return False
    shape, _ = algebra.composed_shape(outer.weight.shape, 1, inner.weight.shape, 1)
    why = cost.why_costlier([cost.kernel_cost(inner.weight, inner.bias, 1), cost.kernel_cost(outer.weight,
                                                                                            outer.bias, 1)],
                            _planned_cost(shape, outer.bias is not None or inner.bias is not None, 1))
    if why is not None and (speculation_undone(outer.node)
                            or not branches.summed_with(outer.node, _absorbs_linear(gm, inner.input, shape[0]))):
        raise Costlier(f"{ctx.label(inner.node, 'linear')} then {ctx.label(outer.node, 'linear')}: not composed: "
                       f"{why}, and no linear of the same input in the same sum absorbs it", outer.node)
    record = _provisional(inner, outer) if why is not None else None
    weight, _ = algebra.compose(outer.weight, 1, inner.weight, 1)
    bias = algebra.compose_bias(outer.weight, outer.bias, 1, inner.bias)
    new = emit(gm, outer.spec, weight, bias, input=inner.input, replaces=outer.node, storage=outer.storage,
               name=outer.name, at=inner.node)
    if record is not None:  # costlier than the pair: it pays only if the sum absorbs it (else settle_provisional)
        mark_provisional(new, replace(record, target=str(new.target)))
    return True


@register_pass("sequential", "compose 1x1-kxk, kxk-1x1 (with DBB's BN-and-pad), 1xk-kx1 and Linear-Linear pairs")
def sequential(ctx: PassContext, node: fx.Node) -> bool:
    conv = _conv_like(ctx.gm, node)
    if conv is not None:
        return _fold_conv_pair(ctx, conv)
    linear = ops.linear(ctx.gm, node)
    return linear is not None and _fold_linear_pair(ctx, linear)

"""``sequential``: two linear layers in a row as one (REPARAM §6), and ``avgpool``: an exact average pool
followed by a per-channel affine map as a depthwise conv (REPARAM §7), so that the affine folds.

- kxk then pointwise 1x1 (ResRep's compactor): always exact.
- pointwise 1x1 then kxk (DBB's 1x1-kxk branch): exact when the kxk does not zero-pad, when the
  1x1 has no bias, or when the tensor between them is padded with exactly the 1x1's bias (DBB's
  BN-and-pad, recognized by value); the pair becomes one kxk conv padding its input.
- Linear then Linear.
A pair folds where the result costs no more than the two layers, or where it is a term of a sum
(``branch_sum`` then merges it into a conv that is there anyway).
"""

from __future__ import annotations

import math

import torch
from torch import fx

from fxreparam import algebra, branches, ops
from fxreparam.graph import emit, erase_dead, live_nodes
from fxreparam.padding import padded_by_value
from fxreparam.registry import PassContext, register_pass


def _layer(gm: fx.GraphModule, node: fx.Node) -> ops.Conv | None:
    """A non-transposed conv, or an exact average pool read as one."""
    conv = ops.conv(gm, node) or branches.pool_as_conv(gm, node)
    return conv if conv is not None and not conv.transposed else None


def _pointwise(c: ops.Conv) -> bool:
    return all(k == 1 for k in c.kernel_size) and all(s == 1 for s in c.stride) and not any(c.padding)


def _macs(c: ops.Conv) -> int:
    """Multiply-accumulates per output pixel."""
    return c.weight.shape[0] * c.weight.shape[1] * math.prod(c.kernel_size)


def _feeds_sum(node: fx.Node) -> bool:
    """Whether the node's only consumer is an add or sub, where ``branch_sum`` can merge it."""
    if len(node.users) != 1:
        return False
    b = ops.binary(next(iter(node.users)))
    return b is not None and b.op in ("add", "sub")


def _same_values(border: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """The border equals the 1x1's bias up to a few roundings in the model's dtype (both were computed there)."""
    bias = torch.zeros_like(border) if bias is None else bias
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return torch.allclose(border, bias, rtol=8 * eps, atol=8 * eps * float(bias.abs().max().clamp_min(1e-30)))


def _dense(c: ops.Conv) -> torch.Tensor:
    return algebra.regroup(c.weight, c.groups, 1)


def _fold_pair(ctx: PassContext, outer: ops.Conv) -> int:
    gm = ctx.gm
    mid = outer.input
    border = padded_by_value(gm, mid, outer.node) if not any(outer.padding) else None
    inner_node = border.input if border is not None else mid
    inner = _layer(gm, inner_node)
    if inner is None or len(inner_node.users) != 1 or (border is None and len(mid.users) != 1):
        return 0
    if len(inner.kernel_size) != len(outer.kernel_size):
        return 0
    where = f"{ctx.label(inner.node, 'conv')} then {ctx.label(outer.node, 'conv')}"
    inner_bias = algebra.exact(inner.bias) if inner.bias is not None else None
    if _pointwise(outer):  # kxk then 1x1: always exact
        if border is not None:
            return 0
        spec, padding, mode = inner, inner.padding, inner.padding_mode
    elif _pointwise(inner):  # 1x1 then kxk: exact where no border tap reads the 1x1's bias as 0
        spec, padding, mode = outer, outer.padding, outer.padding_mode
        if border is not None:
            pads = border.pads
            if any(pads[2 * i] != pads[2 * i + 1] for i in range(len(pads) // 2)):
                ctx.refuse(outer.node, f"{where}: the padding between them is not symmetric")
                return 0
            if not _same_values(border.border, inner_bias, inner.weight.dtype):
                ctx.refuse(outer.node, f"{where}: the border written between them is not the 1x1's output for "
                                       "a zero input, so the pair is not one conv on a zero-padded input")
                return 0
            padding, mode = tuple(reversed(pads[::2])), "zeros"
        elif any(outer.padding) and outer.padding_mode == "zeros" and inner_bias is not None and inner_bias.any():
            ctx.refuse(outer.node, f"{where}: the kxk zero-pads the 1x1's output, whose bias is not zero "
                                   "(border taps would read the bias, not 0)")
            return 0
    else:
        return 0  # two kxk convs grow the kernel and the cost: not a fold
    # Either way the pair is outer's channel mixing applied to inner's kernel, and inner's bias through outer.
    weight = algebra.compose_pointwise(_dense(outer), _dense(inner))
    bias = algebra.shift_through_kernel(outer.weight, inner_bias, groups=outer.groups) if inner_bias is not None \
        else None
    if outer.bias is not None:
        bias = algebra.exact(outer.bias) + (bias if bias is not None else 0)
    merged = ops.Conv(outer.node, inner.input, weight, bias, spec.stride, padding, spec.dilation, 1, False, (),
                      mode, outer.name)
    if _macs(merged) > _macs(inner) + _macs(outer) and not _feeds_sum(outer.node):
        return 0
    like = outer.weight if outer.weight.numel() and outer.weight.dtype.is_floating_point else inner.weight
    template = ops.Conv(outer.node, inner.input, like, None, spec.stride, padding, spec.dilation, 1, False, (),
                        mode, outer.name)
    emit(gm, template, weight, bias, inner.input, outer.node, at=inner.node)
    if border is not None and border.mutators:  # the writes into the now unread pad
        for n in reversed(border.mutators):
            if not n.users:
                gm.graph.erase_node(n)
        erase_dead(mid)
    return 1


def _fold_linear_pair(ctx: PassContext, outer: ops.Linear) -> int:
    inner = ops.linear(ctx.gm, outer.input)
    if inner is None or len(outer.input.users) != 1:
        return 0
    o, m, i = outer.out_channels, outer.in_channels, inner.in_channels
    if o * i > m * i + o * m and not _feeds_sum(outer.node):
        return 0
    weight = algebra.exact(outer.weight) @ algebra.exact(inner.weight)
    bias = algebra.exact(outer.weight) @ algebra.exact(inner.bias) if inner.bias is not None else None
    if outer.bias is not None:
        bias = algebra.exact(outer.bias) + (bias if bias is not None else 0)
    emit(ctx.gm, outer, weight, bias, inner.input, outer.node, at=inner.node)
    return 1


@register_pass("sequential", "compose 1x1-kxk, kxk-1x1 (with DBB's BN-and-pad) and Linear-Linear pairs", order=38)
def sequential(ctx: PassContext) -> int:
    rewrites = 0
    for node in live_nodes(ctx.graph):
        conv = _layer(ctx.gm, node)
        if conv is not None and isinstance(conv.input, fx.Node):
            rewrites += _fold_pair(ctx, conv)
            continue
        linear = ops.linear(ctx.gm, node)
        if linear is not None:
            rewrites += _fold_linear_pair(ctx, linear)
    return rewrites


@register_pass("avgpool", "an exact average pool followed by a BN or per-channel affine, as a depthwise conv",
               order=35)
def avgpool(ctx: PassContext) -> int:
    rewrites = 0
    for node in live_nodes(ctx.graph):
        pool = ops.avg_pool(ctx.gm, node)
        if pool is None or len(node.users) != 1 or ops.channel_affine(ctx.gm, next(iter(node.users))) is None:
            continue
        if pool.why_not_conv:
            ctx.refuse(node, f"{ctx.label(node, 'avg-pool')}: not a conv: {pool.why_not_conv}")
            continue
        conv = branches.pool_as_conv(ctx.gm, node)
        if conv is None:
            continue
        emit(ctx.gm, conv, conv.weight, None, conv.input, node)
        rewrites += 1
    return rewrites

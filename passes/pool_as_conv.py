"""``pool_as_conv``: an exact average pool followed by a BN or per-channel affine, as a depthwise conv.

``AvgPool(k, s, p)`` is a depthwise conv with weight ``1/prod(k)`` where it is exact (REPARAM §7:
no ceil mode, no divisor override, padding counted); as a conv, the affine after it folds
(``conv_bn``) and DBB's 1x1-avg branch composes (``sequential``). The depthwise conv stores more than the
pool and its affine (``C * prod(k)`` weights against the affine's ``2C``..``4C``), so it is made only where a
sum will absorb it: the affine's output is a term of a sum that also holds a conv at least as large (same
stride) reading the pool's input, or the input of the conv the pool reads (which ``sequential`` composes
with it). Elsewhere it is declined as costlier. (Formerly named ``avgpool``.)
"""

from __future__ import annotations

from torch import fx

from fxreparam import algebra, branches, ops
from fxreparam.branches import pool_as_conv as read_as_conv
from fxreparam.graph import emit
from fxreparam.padding import padded_by_value
from fxreparam.registry import Costlier, NotExact, PassContext, register_pass
from fxreparam.spec import Layer


def _absorbed_by_sum(gm: fx.GraphModule, term: fx.Node, conv: Layer) -> bool:
    """Whether a conv in the sum ``term`` (the affine after the pool) belongs to absorbs the pool as a conv: one
    of the pool's input (``branch_sum`` merges them), or of the input of the conv whose output, zero- or
    border-padded, the pool reads (``sequential`` composes the two, then ``branch_sum`` merges)."""
    kernel = tuple(conv.weight.shape[2:])
    if branches.summed_with(term, branches.conv_absorbs(gm, conv.input, kernel, conv.spec.stride, conv.spec.groups)):
        return True
    border = padded_by_value(gm, conv.input, conv.node)
    inner = ops.conv(gm, border.input if border is not None else conv.input)
    if inner is None or inner.transposed or len(inner.node.users) != 1:
        return False
    _, groups = algebra.composed_shape(conv.weight.shape, conv.spec.groups, inner.weight.shape, inner.spec.groups)
    return branches.summed_with(term, branches.conv_absorbs(gm, inner.input, kernel, conv.spec.stride, groups))


@register_pass("pool_as_conv", "an exact average pool followed by a BN or per-channel affine, as a depthwise conv "
                               "a sum absorbs", aliases=("avgpool",))
def pool_as_conv(ctx: PassContext, node: fx.Node) -> bool:
    pool = ops.avg_pool(ctx.gm, node)
    user = ops.sole_user(node) if pool is not None else None
    if user is None or ops.channel_affine(ctx.gm, user) is None:
        return False
    if pool.why_not_conv:
        raise NotExact(f"{ctx.label(node, 'avg-pool')}: not a conv: {pool.why_not_conv}")
    conv = read_as_conv(ctx.gm, node)
    if conv is None:
        return False
    if not _absorbed_by_sum(ctx.gm, user, conv):
        raise Costlier(f"{ctx.label(node, 'avg-pool')}: not made a depthwise conv: no sum holds a conv that would "
                       "absorb it (the conv would store more than the pool and its affine)", node)
    emit(ctx.gm, conv.spec, conv.weight, None, input=conv.input, replaces=node, storage=conv.storage, name=conv.name)
    return True

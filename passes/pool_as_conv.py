"""``pool_as_conv``: an exact average pool followed by a BN or per-channel affine, as a depthwise conv.

``AvgPool(k, s, p)`` is a depthwise conv with weight ``1/prod(k)`` where it is exact (REPARAM §7:
no ceil mode, no divisor override, padding counted); as a conv, the affine after it folds
(``conv_bn``) and DBB's 1x1-avg branch composes (``sequential``). (Formerly named ``avgpool``.)
"""

from __future__ import annotations

from torch import fx

from fxreparam import ops
from fxreparam.branches import pool_as_conv as read_as_conv
from fxreparam.graph import emit
from fxreparam.registry import NotExact, PassContext, register_pass


@register_pass("pool_as_conv", "an exact average pool followed by a BN or per-channel affine, as a depthwise conv",
               aliases=("avgpool",))
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
    emit(ctx.gm, conv.spec, conv.weight, None, input=conv.input, replaces=node, storage=conv.storage, name=conv.name)
    return True

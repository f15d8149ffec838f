"""``linear_bn``: Linear then BatchNorm1d, and BatchNorm1d then Linear, folded into one Linear (REPARAM §1, §2)."""

from __future__ import annotations

from fxreparam import ops
from fxreparam.graph import live_nodes
from fxreparam.registry import PassContext, register_pass

from .bn_conv import fold_before
from .conv_bn import fold_after


@register_pass("linear_bn", "fold a BatchNorm1d (or per-channel scale/shift) into the Linear before or after it",
               order=25)
def linear_bn(ctx: PassContext) -> int:
    rewrites = 0
    for node in live_nodes(ctx.graph):
        rewrites += fold_after(ctx, node, ops.Linear) or fold_before(ctx, node, ops.Linear)
    return rewrites

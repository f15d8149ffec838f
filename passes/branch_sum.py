"""``branch_sum``: parallel conv, BN and average-pool branches that read one tensor and are summed, as one conv.

RepVGG (3x3-BN + 1x1-BN + BN), ACNet (3x3 + 1x3 + 3x1), MobileOne (k convs + 1x1 + BN) and
DBB's final sum are add/sub trees whose terms are convs of the same input; REPARAM §3 gives
when their kernels add up exactly. Bare ``x`` terms are left to the ``identity`` pass; a merge
that would store more weights or do more work than the branches it replaces is refused.
"""

from __future__ import annotations

from torch import fx

from fxreparam.branches import fold_sum, sum_root
from fxreparam.registry import PassContext, register_pass


@register_pass("branch_sum", "merge summed conv, BN and avg-pool branches that read one tensor into one conv")
def branch_sum(ctx: PassContext, node: fx.Node) -> bool:
    return sum_root(node) and fold_sum(ctx, node, with_identity=False)

"""``identity``: ``x + f(x)`` folded into ``f``'s conv, the identity being a Dirac kernel (REPARAM §4).

Runs after ``branch_sum``, so a bare ``x`` (or a BN of a shared ``x``) joins a group of summed
branches only where that group holds a conv of ``x``: ``x + x`` stays two elementwise ops,
cheaper than the conv they would become.
"""

from __future__ import annotations

from torch import fx

from fxreparam.branches import sum_root
from fxreparam.registry import PassContext, register_pass

from .branch_sum import fold_sum


@register_pass("identity", "fold x + f(x) into f's conv: the identity is a Dirac kernel")
def identity(ctx: PassContext, node: fx.Node) -> bool:
    return sum_root(node) and fold_sum(ctx, node, with_identity=True)

"""``zero_branches``: a summed term computed by a conv or linear layer whose kernel and bias are all zero, removed.

peft initializes every LoRA B to zeros, so an adapter not trained yet adds ``B(A(x)) * s == 0`` to its base
layer; a pruned or zero-initialized branch does the same. The term is zero for every finite input (the
convention the other zero folds, such as ``prune_zero_channels``, follow), so ``y + 0`` becomes ``y`` and the
layers that only fed the term go as dead code. The sum stays where the term would broadcast the other operand
to a larger shape or another dtype.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from fxreparam import ops
from fxreparam.meta import concrete_shape, storage, written
from fxreparam.registry import PassContext, register_pass


def zero_layer(gm: fx.GraphModule, value: Any) -> bool:
    """Whether ``value`` is the output of a conv or linear layer whose stored weight and bias are all zero."""
    layer = ops.weighted(gm, value) if isinstance(value, fx.Node) else None
    if layer is None or bool(layer.weight.any()):
        return False
    return layer.bias is None or not bool(layer.bias.any())


def _zero_through_scale(gm: fx.GraphModule, value: Any) -> bool:
    """A zero layer's output, or one scaled by a constant number (LoRA's ``* scaling``)."""
    if zero_layer(gm, value):
        return True
    b = ops.binary(value) if isinstance(value, fx.Node) else None
    return b is not None and b.op in ("mul", "div") and isinstance(b.rhs, (int, float)) and zero_layer(gm, b.lhs)


def _kept_operand(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The operand of the sum ``node`` that stays when its other term is zero (same shape and dtype, and not written
    in place later: the sum was a fresh tensor, the operand would alias it), or None."""
    b = ops.binary(node)
    if b is None or b.op not in ("add", "sub") or b.inplace or written(node):
        return None
    for zero, kept in ((b.rhs, b.lhs), (b.lhs, b.rhs) if b.op == "add" else (None, None)):
        if isinstance(kept, fx.Node) and not written(kept) and _zero_through_scale(gm, zero) and \
                concrete_shape(kept) == concrete_shape(node) is not None and storage(kept) == storage(node):
            return kept
    return None


@register_pass("zero_branches", "remove summed terms computed by all-zero conv or linear layers (untrained LoRA B)")
def zero_branches(ctx: PassContext, node: fx.Node) -> bool:
    kept = _kept_operand(ctx.gm, node)
    if kept is None:
        return False
    node.replace_all_uses_with(kept)
    ctx.gm.graph.erase_node(node)
    return True

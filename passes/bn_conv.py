"""``bn_conv``: a BatchNorm or per-channel affine map folded into the conv after it, where exact (REPARAM §2)."""

from __future__ import annotations

from torch import fx

from fxreparam import algebra, ops
from fxreparam.graph import emit, live_nodes
from fxreparam.registry import PassContext, register_pass


def _why_not_exact(affine: ops.ChannelAffine, layer: ops.Conv | ops.Linear, shift) -> str | None:
    if not isinstance(layer, ops.Conv):
        return None
    if layer.transposed:
        return "a transposed conv reads each input pixel through a varying number of taps"
    if any(layer.padding) and layer.padding_mode == "zeros" and bool((shift != 0).any()):
        return (f"the conv zero-pads (padding={layer.padding}): its border taps read 0, not the "
                f"{affine.kind}'s shift, so the fold is exact only with padding 0")
    return None


def fold_before(ctx: PassContext, node: fx.Node, consumer_kind: type) -> int:
    """Fold the affine map feeding the layer at ``node`` (of type ``consumer_kind``) into its input channels."""
    layer = ops.weighted(ctx.gm, node)
    if layer is None or not isinstance(layer, consumer_kind) or not isinstance(layer.input, fx.Node):
        return 0
    affine = ops.channel_affine(ctx.gm, layer.input)
    if affine is None:
        return 0
    what = ctx.label(affine.node, "bn" if affine.kind == "batch norm" else affine.kind)
    kind = "conv" if isinstance(layer, ops.Conv) else "linear"
    where = f"{what} before {ctx.label(node, kind)}"
    if len(affine.node.users) != 1:
        ctx.refuse(affine.node, f"{where}: its output has another consumer")
        return 0
    ndim = ops.rank(affine.node) or (layer.weight.dim() if isinstance(layer, ops.Conv) else None)
    if ndim is None:
        ctx.refuse(affine.node, f"{where}: the rank of its output is unknown (pass example inputs)")
        return 0
    channel_dim = 1 if isinstance(layer, ops.Conv) else ndim - 1
    vectors = affine.vectors(layer.in_channels, ndim, channel_dim, layer.weight.dtype)
    if isinstance(vectors, str):
        ctx.refuse(affine.node, f"{where}: {vectors}")
        return 0
    scale, shift = vectors
    why = _why_not_exact(affine, layer, shift)
    if why is not None:
        ctx.refuse(affine.node, f"{where}: {why}")
        return 0
    groups = layer.groups if isinstance(layer, ops.Conv) else 1
    weight, bias = algebra.affine_before(layer.weight, layer.bias, (scale, shift), groups=groups)
    emit(ctx.gm, layer, weight, bias, affine.input, node, at=affine.node)
    return 1


@register_pass("bn_conv", "fold a BatchNorm (or per-channel scale/shift) into the conv after it, where exact",
               order=30)
def bn_conv(ctx: PassContext) -> int:
    return sum(fold_before(ctx, node, ops.Conv) for node in live_nodes(ctx.graph))

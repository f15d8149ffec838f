"""``conv_bn``: a BatchNorm or any per-channel affine map folded into the conv before it (REPARAM §1, §8)."""

from __future__ import annotations

from torch import fx

from fxreparam import algebra, ops
from fxreparam.graph import emit, live_nodes
from fxreparam.registry import PassContext, register_pass


def fold_affine_into_producer(ctx: PassContext, affine: ops.ChannelAffine, layer: ops.Conv | ops.Linear) -> str | None:
    """Fold ``affine`` into the output channels of ``layer``; returns why not, or ``None`` once folded."""
    if len(layer.node.users) != 1:
        return "its output has another consumer"
    ndim = ops.rank(layer.node) or (layer.weight.dim() if isinstance(layer, ops.Conv) else None)
    if ndim is None:
        return "the rank of its output is unknown (pass example inputs)"
    channel_dim = 1 if isinstance(layer, ops.Conv) else ndim - 1
    vectors = affine.vectors(layer.out_channels, ndim, channel_dim, layer.weight.dtype)
    if isinstance(vectors, str):
        return vectors
    scale, shift = vectors
    transposed = isinstance(layer, ops.Conv) and layer.transposed
    groups = layer.groups if isinstance(layer, ops.Conv) else 1
    weight, bias = algebra.affine_after(layer.weight, layer.bias, (scale, shift), groups=groups, transposed=transposed)
    emit(ctx.gm, layer, weight, bias, layer.input, affine.node, at=layer.node)
    return None


def fold_after(ctx: PassContext, node: fx.Node, producer_kind: type) -> int:
    """Fold the affine map at ``node`` into the layer of type ``producer_kind`` feeding it, if exact."""
    bn = ops.batch_norm(ctx.gm, node)
    if bn is not None and bn.affine is None:
        ctx.refuse(node, f"{ctx.label(node, 'bn')}: {bn.why_not}")
        return 0
    affine = ops.channel_affine(ctx.gm, node)
    if affine is None:
        return 0
    layer = ops.weighted(ctx.gm, affine.input)
    if layer is None or not isinstance(layer, producer_kind):
        if bn is not None and producer_kind is ops.Conv and ops.linear(ctx.gm, affine.input) is None:
            ctx.refuse(node, f"{ctx.label(node, 'bn')} follows {affine.input.name}, not a conv or linear layer")
        return 0
    why = fold_affine_into_producer(ctx, affine, layer)
    if why is not None:
        kind = "conv" if isinstance(layer, ops.Conv) else "linear"
        ctx.refuse(node, f"{ctx.label(node, affine.kind.replace('batch norm', 'bn'))} after "
                         f"{ctx.label(layer.node, kind)}: {why}")
        return 0
    return 1


@register_pass("conv_bn", "fold a BatchNorm (or a per-channel scale/shift) into the conv before it", order=20)
def conv_bn(ctx: PassContext) -> int:
    return sum(fold_after(ctx, node, ops.Conv) for node in live_nodes(ctx.graph))

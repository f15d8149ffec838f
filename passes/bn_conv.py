"""``bn_conv``: a BatchNorm or per-channel affine map folded into the conv or linear layer after it, where exact.

``layer(scale * x + shift)`` scales the layer's input channels and turns the shift into a bias
(REPARAM §2), also across averages and flattens that keep each channel whole (a BN before a global pool and a
classifier). The bias is exact only where every tap reads real input: a zero-padded conv's
border taps read 0, not the shift, so a non-zero shift before a padded conv is refused.
"""

from __future__ import annotations

from torch import fx

from fxreparam import algebra, ops
from fxreparam.graph import emit
from fxreparam.meta import rank
from fxreparam.registry import NotExact, PassContext, register_pass
from fxreparam.spec import Layer


def _why_not_exact(layer: Layer, shift, kind: str) -> str | None:
    if not layer.is_conv:
        return None
    if layer.transposed:
        return "a transposed conv reads each input pixel through a varying number of taps"
    if any(layer.spec.padding) and layer.spec.padding_mode == "zeros" and bool((shift != 0).any()):
        return (f"the conv zero-pads (padding={layer.spec.padding}): its border taps read 0, not the "
                f"{kind}'s shift, so the fold is exact only with padding 0")
    return None


def _across_averages(ctx: PassContext, layer: Layer) -> tuple[fx.Node, int | None, list[fx.Node]]:
    """The node before ``layer`` across global means, adaptive average pools and flattens that keep each channel
    whole and that nothing else reads, its channel dim (None: not known), and the nodes crossed."""
    node, crossed = layer.input, []
    ndim = rank(node)
    channel_dim = layer.spec.channel_dim(ndim) if ndim is not None else None
    while channel_dim is not None and ops.channel_affine(ctx.gm, node) is None and len(ops.value_users(node)) == 1:
        step = ops.channel_average(ctx.gm, node, channel_dim)
        if step is None:
            break
        crossed.append(node)
        node, channel_dim = step
    return node, channel_dim, crossed


@register_pass("bn_conv", "fold a BatchNorm (or per-channel scale/shift) into the conv or linear layer after it, "
                          "where exact", aliases=("linear_bn",))
def bn_conv(ctx: PassContext, node: fx.Node) -> bool:
    layer = ops.weighted(ctx.gm, node)
    if layer is None:
        return False
    before, channel_dim, crossed = _across_averages(ctx, layer)
    affine = ops.channel_affine(ctx.gm, before)
    if affine is None:
        return False
    kind = "bn" if affine.kind == "batch norm" else affine.kind
    where = f"{ctx.label(affine.node, kind)} before {ctx.label(node, layer.kind)}"
    if len(ops.value_users(affine.node)) != 1:
        raise NotExact(f"{where}: its output has another consumer", affine.node)
    ndim = rank(affine.node) or (layer.spec.dims + 2 if layer.is_conv and not crossed else None)
    if ndim is None:
        raise NotExact(f"{where}: the rank of its output is unknown (pass example inputs)", affine.node)
    if channel_dim is None:
        channel_dim = layer.spec.channel_dim(ndim)
    vectors = affine.vectors(layer.in_channels, ndim, channel_dim, layer.weight.dtype)
    if isinstance(vectors, str):
        raise NotExact(f"{where}: {vectors}", affine.node)
    why = _why_not_exact(layer, vectors[1], affine.kind)
    if why is not None:
        raise NotExact(f"{where}: {why}", affine.node)
    weight, bias = algebra.affine_before(layer.weight, layer.bias, vectors, groups=layer.groups,
                                         dtype=layer.storage[0])  # rounded once, as it is stored
    for user in list(affine.node.users):  # the averages and shape queries read the affine map's input instead
        if user is not node:
            user.replace_input_with(affine.node, affine.input)
    emit(ctx.gm, layer.spec, weight, bias, input=layer.input if crossed else affine.input, replaces=node,
         storage=layer.storage, name=layer.name, at=None if crossed else affine.node)
    return True

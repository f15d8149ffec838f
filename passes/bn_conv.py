"""``bn_conv``: a BatchNorm or per-channel affine map folded into the conv or linear layer after it, where exact.

``layer(scale * x + shift)`` scales the layer's input channels and turns the shift into a bias
(REPARAM §2). The bias is exact only where every tap reads real input: a zero-padded conv's
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


@register_pass("bn_conv", "fold a BatchNorm (or per-channel scale/shift) into the conv or linear layer after it, "
                          "where exact", aliases=("linear_bn",))
def bn_conv(ctx: PassContext, node: fx.Node) -> bool:
    layer = ops.weighted(ctx.gm, node)
    if layer is None:
        return False
    affine = ops.channel_affine(ctx.gm, layer.input)
    if affine is None:
        return False
    kind = "bn" if affine.kind == "batch norm" else affine.kind
    where = f"{ctx.label(affine.node, kind)} before {ctx.label(node, layer.kind)}"
    if len(affine.node.users) != 1:
        raise NotExact(f"{where}: its output has another consumer", affine.node)
    ndim = rank(affine.node) or (layer.spec.dims + 2 if layer.is_conv else None)
    if ndim is None:
        raise NotExact(f"{where}: the rank of its output is unknown (pass example inputs)", affine.node)
    vectors = affine.vectors(layer.in_channels, ndim, layer.spec.channel_dim(ndim), layer.weight.dtype)
    if isinstance(vectors, str):
        raise NotExact(f"{where}: {vectors}", affine.node)
    why = _why_not_exact(layer, vectors[1], affine.kind)
    if why is not None:
        raise NotExact(f"{where}: {why}", affine.node)
    weight, bias = algebra.affine_before(layer.weight, layer.bias, vectors, groups=layer.groups)
    emit(ctx.gm, layer.spec, weight, bias, input=affine.input, replaces=node, storage=layer.storage, name=layer.name,
         at=affine.node)
    return True

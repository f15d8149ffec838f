"""``conv_bn``: a BatchNorm or any per-channel affine map folded into the conv or linear layer before it.

``scale * layer(x) + shift`` is ``layer`` with each output channel's kernel scaled and its bias
mapped (REPARAM §1, §8): exact always, as long as nothing else reads the layer's output. The
channel axis comes from the tensor's rank (dim 1 batched, dim 0 unbatched, the last for linear
layers); a BatchNorm normalizes dim 1 and so folds only where that is the channel axis. A linear
layer is also seen through a reshape that keeps its feature axis whole (LeViT's
``bn(linear(x).flatten(0, 1)).reshape_as(x)``).
"""

from __future__ import annotations

from torch import fx

from fxreparam import algebra, ops
from fxreparam.graph import emit, emit_refolded, replace
from fxreparam.meta import rank
from fxreparam.registry import NotExact, PassContext, register_pass

from . import channel_layout


def _kind(affine: ops.ChannelAffine) -> str:
    return "bn" if affine.kind == "batch norm" else affine.kind


@register_pass("conv_bn", "fold a BatchNorm (or a per-channel scale/shift) into the conv or linear layer before it",
               aliases=("linear_bn",))
def conv_bn(ctx: PassContext, node: fx.Node) -> bool:
    bn = ops.batch_norm(ctx.gm, node)
    if bn is not None and bn.affine is None:
        raise NotExact(f"{ctx.label(node, 'bn')}: {bn.why_not}")
    affine = ops.channel_affine(ctx.gm, node)
    if affine is None:
        return False
    layer, reshape = ops.weighted(ctx.gm, affine.input), None
    if layer is None and len(ops.value_users(affine.input)) == 1:  # a linear layer seen through [B, N, C] -> [B*N, C]
        inner = ops.last_axis_reshape(ctx.gm, affine.input)
        layer = ops.linear(ctx.gm, inner) if inner is not None else None
        reshape = affine.input if layer is not None else None
    if layer is None:
        if channel_layout.layout_op(ctx.gm, affine.input) is not None:
            return False  # an affine after permute / view: channel_layout folds it or says why not
        if bn is not None:
            raise NotExact(f"{ctx.label(node, 'bn')} follows {affine.input.name}, not a conv or linear layer")
        return False
    where = f"{ctx.label(node, _kind(affine))} after {ctx.label(layer.node, layer.kind)}"
    if len(ops.value_users(layer.node)) != 1:
        raise NotExact(f"{where}: its output has another consumer")
    ndim = rank(affine.input) or (layer.spec.dims + 2 if layer.is_conv else None)
    if ndim is None:
        raise NotExact(f"{where}: the rank of its output is unknown (pass example inputs)")
    vectors = affine.vectors(layer.out_channels, ndim, layer.spec.channel_dim(ndim), layer.weight.dtype)
    if isinstance(vectors, str):
        raise NotExact(f"{where}: {vectors}")
    weight, bias = algebra.affine_after(layer.weight, layer.bias, vectors, groups=layer.groups,
                                        transposed=layer.transposed, dtype=layer.storage[0])  # rounded once, stored
    if reshape is None:
        emit_refolded(ctx.gm, layer, weight, bias, replaces=node)
        return True
    emit(ctx.gm, layer.spec, weight, bias, input=layer.input, replaces=layer.node, storage=layer.storage,
         name=layer.name)
    replace(node, reshape)  # the affine is in the layer now; the reshape reads the new layer
    return True

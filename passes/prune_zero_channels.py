"""``prune_zero_channels``: output channels whose folded kernel and bias are exactly zero are removed,
with the matching input channels of every consumer (ResRep's lossless pruning, REPARAM §6).

A zero channel stays zero through ReLU-like activations, pooling over the dims after the channel
axis, and dropout; it is removed where every consumer downstream of those is a conv (groups 1)
or linear layer reading it, or a ``flatten`` feeding linear layers. Any other consumer (an add,
a cat, the output, a pool that reaches the channel axis) needs the channel, and the pass says so. A grouped or depthwise
producer keeps equal groups over the same inputs: it loses the same number of zero channels from every group,
or none.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from fxreparam import ops
from fxreparam.graph import emit
from fxreparam.meta import concrete_shape, forget_shape, rank
from fxreparam.registry import NotExact, PassContext, register_pass
from fxreparam.spec import Layer


def _consumers(ctx: PassContext, node: fx.Node, channels: int, axis: int) -> tuple[list[tuple[Layer, int]],
                                                                                   list[fx.Node]]:
    """The layers reading ``node``'s channels (on ``axis``, with how many features each channel spans for them)
    and the zero-keeping ops in between; raises :class:`NotExact` naming a consumer that needs every channel."""
    layers: list[tuple[Layer, int]] = []
    passed: list[fx.Node] = []
    stack = [(u, node, 1) for u in node.users]
    while stack:
        user, source, span = stack.pop()
        if span == 1 and ops.zero_keeping(ctx.gm, user, axis) is source:
            passed.append(user)
            stack.extend((u, user, span) for u in user.users)
            continue
        start = ops.flatten_start(ctx.gm, user)
        shape = concrete_shape(source)
        if start is not None and start == axis and span == 1 and shape is not None and shape[axis] == channels \
                and rank(user) == axis + 1:
            passed.append(user)
            stack.extend((u, user, math.prod(shape[axis + 1:])) for u in user.users)
            continue
        layer = ops.weighted(ctx.gm, user)
        if layer is not None and layer.input is source:
            source_rank = rank(source)
            if layer.is_conv and (layer.transposed or layer.groups != 1):
                raise NotExact(f"{ctx.label(user, 'conv')} is grouped or transposed")
            if layer.is_conv and (source_rank is None or layer.spec.channel_dim(source_rank) != axis or span != 1):
                raise NotExact(f"{ctx.label(user, 'conv')} reads the channels on another axis")
            if not layer.is_conv and (source_rank is None or source_rank - 1 != axis):
                raise NotExact(f"{ctx.label(user, 'linear')} reads more than a flat feature vector")
            layers.append((layer, span))
            continue
        raise NotExact(f"{user.name} ({user.target if user.op != 'output' else 'the model output'}) needs every "
                       "channel")
    return layers, passed


@register_pass("prune_zero_channels", "remove output channels whose folded kernel and bias are zero, with the "
                                      "inputs that read them")
def prune_zero_channels(ctx: PassContext, node: fx.Node) -> bool:
    layer = ops.weighted(ctx.gm, node)
    if layer is None or layer.transposed or (layer.bias is not None and bool(layer.bias.all())):
        return False  # a non-zero bias on every channel: no channel is zero (and no weight needs scanning)
    zero = (layer.weight.flatten(1) == 0).all(1)
    if layer.bias is not None:
        zero &= layer.bias == 0
    if not zero.any() or zero.all():
        return False
    keep = _kept_channels(zero, layer.groups)
    if isinstance(keep, str):
        raise NotExact(f"{ctx.label(node, 'layer')}: {int(zero.sum())} zero output channels kept: {keep}")
    out_rank = rank(node)
    if out_rank is None:
        raise NotExact(f"{ctx.label(node, 'layer')}: {int(zero.sum())} zero output channels kept: the rank of its "
                       "output is unknown (pass example inputs)")
    try:
        layers, passed = _consumers(ctx, node, layer.out_channels, layer.spec.channel_dim(out_rank))
    except NotExact as why:
        raise type(why)(f"{ctx.label(node, 'layer')}: {int(zero.sum())} zero output channels kept: {why}") from None
    for consumer, span in layers:
        columns = keep.repeat_interleave(span)
        emit(ctx.gm, consumer.spec, consumer.weight[:, columns], consumer.bias, input=consumer.input,
             replaces=consumer.node, storage=consumer.storage, name=consumer.name)
    emit(ctx.gm, layer.spec, layer.weight[keep], layer.bias[keep] if layer.bias is not None else None,
         input=layer.input, replaces=node, storage=layer.storage, name=layer.name)
    views = [n for n in passed if ops.flatten_start(ctx.gm, n) is not None and not _is_flatten(n)]
    for n in passed:  # their recorded shapes still count the removed channels
        forget_shape(n)
    for n in views:  # and a view to explicit sizes would too
        _as_flatten(ctx.graph, n)
    return True


def _kept_channels(zero: torch.Tensor, groups: int) -> torch.Tensor | str:
    """The output channels to keep: every group of a grouped conv must keep as many as the others (its outputs
    stay in contiguous equal groups over the same inputs), so each drops its first ``m`` zero channels, ``m`` the
    fewest zeros any group has; why not, where that is none."""
    if groups == 1:
        return ~zero
    per_group = zero.reshape(groups, -1)
    removable = int(per_group.sum(1).min())
    if removable == 0:
        return (f"the conv has {groups} groups and some group has no zero channel: a grouped conv loses channels "
                "only as the same number from every group")
    rank_in_group = per_group.cumsum(1)  # the how-manieth zero of its group each channel is
    return ~(per_group & (rank_in_group <= removable)).reshape(-1)


def _is_flatten(node: fx.Node) -> bool:
    return node.op == "call_module" or node.target in (torch.flatten, torch.ops.aten.flatten.using_ints)


def _as_flatten(graph: fx.Graph, node: fx.Node) -> None:
    """Replace a flattening view or reshape by ``torch.flatten`` from the same dim, which names no sizes."""
    start = len(node.args[1]) - 1 if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
        else len(node.args) - 2
    with graph.inserting_before(node):
        flat = graph.call_function(torch.flatten, (node.args[0], start))
    flat.meta.update(node.meta)
    node.replace_all_uses_with(flat)
    graph.erase_node(node)

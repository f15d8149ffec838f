"""``prune_zero_channels``: output channels whose folded kernel and bias are exactly zero are removed,
with the matching input channels of every consumer (ResRep's lossless pruning, REPARAM §6).

A zero channel stays zero through ReLU-like activations, pooling and dropout; it is removed where
every consumer downstream of those is a conv (groups 1) or linear layer reading it, or a
``flatten`` feeding linear layers. Any other consumer (an add, a cat, the output) needs the
channel, and the pass reports that instead.
"""

from __future__ import annotations

import torch
from torch import fx

from fxreparam import ops
from fxreparam.graph import emit, live_nodes
from fxreparam.registry import PassContext, register_pass


def _consumers(ctx: PassContext, node: fx.Node, channels: int
               ) -> tuple[list[tuple[ops.Conv | ops.Linear, int]], list[fx.Node]] | str:
    """The layers reading ``node``'s channels (with how many features each channel spans for them), and
    the zero-keeping ops in between; or why some consumer needs every channel."""
    layers: list[tuple[ops.Conv | ops.Linear, int]] = []
    passed: list[fx.Node] = []
    stack = [(u, node, 1) for u in node.users]
    while stack:
        user, source, span = stack.pop()
        if ops.zero_keeping(ctx.gm, user) is source:
            passed.append(user)
            stack.extend((u, user, span) for u in user.users)
            continue
        start = ops.flatten_start(ctx.gm, user)
        shape = ops.concrete_shape(source)
        if start == 1 and span == 1 and shape is not None and shape[1] == channels:
            passed.append(user)
            stack.extend((u, user, int(torch.tensor(shape[2:]).prod())) for u in user.users)
            continue
        layer = ops.weighted(ctx.gm, user)
        if layer is not None and layer.input is source:
            if isinstance(layer, ops.Conv) and (layer.transposed or layer.groups != 1):
                return f"{ctx.label(user, 'conv')} is grouped or transposed"
            if isinstance(layer, ops.Linear) and (ops.rank(source) or 0) != 2:
                return f"{ctx.label(user, 'linear')} reads more than a flat feature vector"
            layers.append((layer, span))
            continue
        return f"{user.name} ({user.target if user.op != 'output' else 'the model output'}) needs every channel"
    return layers, passed


@register_pass("prune_zero_channels", "remove output channels whose folded kernel and bias are zero, with the "
                                      "inputs that read them", order=60)
def prune_zero_channels(ctx: PassContext) -> int:
    rewrites = 0
    for node in live_nodes(ctx.graph):
        layer = ops.weighted(ctx.gm, node)
        if layer is None or (isinstance(layer, ops.Conv) and layer.transposed):
            continue
        zero = (layer.weight.flatten(1) == 0).all(1)
        if layer.bias is not None:
            zero &= layer.bias == 0
        if not zero.any() or zero.all():
            continue
        found = _consumers(ctx, node, layer.out_channels)
        if isinstance(found, str):
            ctx.refuse(node, f"{ctx.label(node, 'layer')}: {int(zero.sum())} zero output channels kept: {found}")
            continue
        layers, passed = found
        keep = ~zero
        for consumer, span in layers:
            columns = keep.repeat_interleave(span)
            weight = consumer.weight[:, columns] if consumer.weight.dim() == 2 or consumer.groups == 1 else None
            emit(ctx.gm, consumer, weight, consumer.bias, consumer.input, consumer.node)
        emit(ctx.gm, layer, layer.weight[keep], layer.bias[keep] if layer.bias is not None else None, layer.input,
             node)
        for n in passed:  # their recorded shapes still count the removed channels
            ops.forget_shape(n)
        rewrites += 1
    return rewrites

"""``channel_layout``: a per-channel affine map reached from a conv or linear layer through layout ops, folded in.

``affine(L_k(...L_1(layer(x))))`` where each ``L_i`` only moves elements (permute, transpose, movedim, view,
reshape, flatten, unflatten, squeeze, unsqueeze, contiguous) is ``L_k(...L_1(affine'(layer(x))))`` with
``affine'`` the same map read back onto the layer's output, where the affine's constant at each element depends
only on the layer channel that element came from (docs/identities.md s14): UniRepLKNet's BN after a permute back to
NCHW, a layer scale after it, RepMLP's BN after a view that splits or merges the channel axis. The channel each
element came from is derived exactly by sending the layer's channel index through the same layout ops; the map
then goes into the layer's kernel (REPARAM §1) at once, so every rewrite removes the affine op (no move is made
that a fold does not follow). Refused (NotExact, with the reason) where the constant varies within one channel
(a BatchNorm1d over ``C*H*W`` features that differ inside a channel's block, an affine along a spatial axis), or
where an intermediate value has another reader.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import fx, nn

from fxreparam import algebra, ops
from fxreparam.graph import emit, replace
from fxreparam.meta import concrete_shape, fetch_attr, recorded_value
from fxreparam.registry import NotExact, PassContext, register_pass
from fxreparam.spec import Layer

aten = torch.ops.aten

Move = Callable[[torch.Tensor], torch.Tensor]
"""What a layout op does to a tensor of its input's shape (applied to an index tensor)."""

_PERMUTE = {aten.permute.default, torch.permute}
_TRANSPOSE = {aten.transpose.int, aten.swapaxes.default, aten.swapdims.default, torch.transpose, torch.swapaxes,
              torch.swapdims}
_MOVEDIM = {aten.movedim.int, torch.movedim}
_RESHAPE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
            aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
            aten.view_as.default, aten.reshape_as.default,
            torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze}
_SAME = {aten.contiguous.default, aten.clone.default, aten.alias.default}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_TRANSPOSE_METHODS = {"transpose", "swapaxes", "swapdims"}


def _ints(values: object) -> list[int] | None:
    """``values`` as a list of ints (one list, or ints passed one by one), else None (a symbolic entry)."""
    if len(values) == 1 and isinstance(values[0], (list, tuple)):
        values = values[0]
    return list(values) if all(isinstance(v, int) and not isinstance(v, bool) for v in values) else None


def _sizes(node: fx.Node) -> list[str] | None:
    """``node``'s recorded sizes as written, a symbolic one by its expression (``s0``), a static one as ``None``:
    which dims vary with the input (a dynamic batch). Where capture recorded sizes without saying which vary
    (symbolic_trace's example shapes), dim 0 is taken to be a batch that may (the graph runs at any size)."""
    value = recorded_value(node)
    shape = getattr(value, "shape", None)
    if shape is None:
        ndim = len(concrete_shape(node) or ())
        return ["batch", *[None] * (ndim - 1)] if ndim else None
    return [str(d) if isinstance(d, torch.SymInt) and not d.node.is_constant() else None for d in shape]


def _reshape_move(source: fx.Node, node: fx.Node) -> Move | None:
    """A reshape to ``node``'s recorded shape, where it keeps every symbolic dim in a common leading prefix
    (so the regrouping is the same at every input size), else None."""
    before, after = concrete_shape(source), concrete_shape(node)
    if before is None or after is None or math.prod(before) != math.prod(after):
        return None
    sym_b, sym_a = _sizes(source) or [], _sizes(node) or []
    prefix = max([i + 1 for sizes in (sym_b, sym_a) for i, d in enumerate(sizes) if d is not None] + [0])
    if prefix > min(len(before), len(after)) or (sym_b[:prefix], before[:prefix]) != (sym_a[:prefix], after[:prefix]):
        return None  # a symbolic dim regrouped: the channel of each element would change with the input's size
    return lambda t: t.reshape(after)


def layout_op(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, Move] | None:
    """``(input, move)`` if ``node`` only moves the elements of its one tensor input (no value changes, none
    dropped or repeated), with ``move`` doing the same to a tensor of the input's shape; else None."""
    if ops.opaque(node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source, rest = node.args[0], tuple(node.args[1:])
    if any(isinstance(a, torch.dtype) for a in (*rest, *node.kwargs.values())):
        return None  # x.view(dtype) reinterprets bits
    if node.op == "call_module":
        mod = fetch_attr(gm, node.target)
        if type(mod) not in (nn.Flatten, nn.Unflatten) or mod._forward_hooks or mod._forward_pre_hooks:
            return None
        move = _reshape_move(source, node)
    elif node.op == "call_method" and node.target in ("contiguous", "clone"):
        move = (lambda t: t) if not any(isinstance(a, fx.Node) for a in rest) else None
    elif node.op == "call_function" and node.target in _SAME:
        move = lambda t: t  # noqa: E731
    elif (node.op == "call_function" and node.target in _RESHAPE) or (
            node.op == "call_method" and node.target in _RESHAPE_METHODS):
        move = _reshape_move(source, node)
    elif (node.op == "call_method" and node.target == "permute") or (
            node.op == "call_function" and node.target in _PERMUTE):
        dims = _ints(rest or (node.kwargs.get("dims"),))
        move = (lambda t: t.permute(dims)) if dims is not None else None
    elif (node.op == "call_method" and node.target in _TRANSPOSE_METHODS) or (
            node.op == "call_function" and node.target in _TRANSPOSE):
        dims = _ints(rest)
        move = (lambda t: t.transpose(*dims)) if dims is not None and len(dims) == 2 else None
    elif (node.op == "call_method" and node.target == "t") or (
            node.op == "call_function" and node.target in (aten.t.default, torch.t)):
        move = lambda t: t.t()  # noqa: E731
    elif (node.op == "call_method" and node.target == "movedim") or (
            node.op == "call_function" and node.target in _MOVEDIM):
        dims = _ints(rest) if len(rest) == 2 else None
        move = (lambda t: t.movedim(*dims)) if dims is not None else None
    else:
        return None
    return (source, move) if move is not None else None


def _chain(gm: fx.GraphModule, value: fx.Node) -> tuple[fx.Node, list[tuple[fx.Node, Move]]]:
    """The node before the layout ops ending at ``value``, and those ops in the order they run."""
    moves: list[tuple[fx.Node, Move]] = []
    while (found := layout_op(gm, value)) is not None:
        moves.append((value, found[1]))
        value = found[0]
    return value, moves[::-1]


def _kind(affine: ops.ChannelAffine) -> str:
    return "bn" if affine.kind == "batch norm" else affine.kind


def _constants(affine: ops.ChannelAffine, shape: tuple[int, ...], layer: Layer) -> tuple[torch.Tensor, ...] | str:
    """The affine's scale and shift broadcast to its input's ``shape`` (float64), or why they cannot be."""
    if not algebra.finite(affine.scale, affine.shift):
        return f"the {affine.kind}'s constant is not finite: a fold would turn inf into nan"
    if affine.on_dim1:
        if len(shape) < 2 or shape[1] != affine.scale.numel():
            return f"the {affine.kind} has {affine.scale.numel()} channels on dim 1 of a tensor of shape {list(shape)}"
        view = [1, -1] + [1] * (len(shape) - 2)
        return tuple(algebra.exact(t).reshape(view).expand(shape) for t in (affine.scale, affine.shift))
    if affine.dtype is not None and affine.dtype != layer.weight.dtype and affine.dtype.is_floating_point:
        return f"the constant's dtype {affine.dtype} would change the result's {layer.weight.dtype}"
    try:
        out = torch.broadcast_shapes(shape, affine.scale.shape, affine.shift.shape)
    except RuntimeError:
        return f"the constant does not broadcast with the input of shape {list(shape)}"
    if tuple(out) != tuple(shape):
        return f"the constant broadcasts the input of shape {list(shape)} to {list(out)}: a fold would lose that"
    return tuple(algebra.exact(t).expand(shape) for t in (affine.scale, affine.shift))


def per_channel(layer: Layer, moves: list[tuple[fx.Node, Move]], constants: tuple[torch.Tensor, ...]
                ) -> tuple[torch.Tensor, ...] | str:
    """The constants (each of the affine input's shape) as ``[C]`` vectors over the layer's output channels, or why
    they are not: each element's channel is found by moving the layer's channel index through the layout ops, and
    every constant must take one value per channel (a vector along a merged axis is then the repeat or interleave of
    the per-channel one, exactly)."""
    shape = concrete_shape(layer.node)
    if shape is None:
        return "the shape of its output is unknown (pass example inputs)"
    if 0 in shape:
        return "its output is empty"
    dim, channels = layer.spec.channel_dim(len(shape)), layer.out_channels
    if shape[dim] != channels:
        return f"its output of shape {list(shape)} does not hold its {channels} channels on dim {dim}"
    index = torch.arange(channels).reshape([-1 if d == dim else 1 for d in range(len(shape))]).expand(shape)
    for _, move in moves:
        index = move(index)
    if tuple(index.shape) != tuple(constants[0].shape):
        return f"the layout ops give shape {list(index.shape)}, the affine reads {list(constants[0].shape)}"
    flat = index.reshape(-1)
    out = []
    for t in constants:
        values = t.reshape(-1)
        vector = torch.zeros(channels, dtype=values.dtype).index_put_((flat,), values)  # one of each channel's values
        differs = (vector[flat] != values).nonzero()
        if len(differs):
            i = int(differs[0, 0])
            at, channel = [int(d) for d in torch.unravel_index(torch.tensor(i), index.shape)], int(flat[i])
            return (f"its constant varies within one channel of the layer (channel {channel} meets "
                    f"{float(values[i]):.6g} at {at} of its input and {float(vector[channel]):.6g} elsewhere: it "
                    "varies along an axis that is not the channel axis, or within a channel's block of a merged axis)")
        out.append(vector)
    return tuple(out)


@register_pass("channel_layout", "fold a per-channel affine map reached through permute / transpose / view / "
                                 "flatten into the conv or linear layer before those layout ops")
def channel_layout(ctx: PassContext, node: fx.Node) -> bool:
    affine = ops.channel_affine(ctx.gm, node)
    if affine is None:
        return False
    source, moves = _chain(ctx.gm, affine.input)
    if not moves:
        return False  # right after its producer: conv_bn's case
    layer = ops.weighted(ctx.gm, source)
    ops_names = " -> ".join(n.name for n, _ in moves)
    if layer is None:
        if affine.kind == "batch norm":
            raise NotExact(f"{ctx.label(node, 'bn')} follows layout ops ({ops_names}) of {source.name}, "
                           "not of a conv or linear layer")
        return False
    where = f"{ctx.label(node, _kind(affine))} after {ctx.label(layer.node, layer.kind)} through {ops_names}"
    for value in [layer.node, *(n for n, _ in moves[:-1])]:
        if len(ops.value_users(value)) != 1:
            raise NotExact(f"{where}: {value.name}'s output has another consumer")
    shape = concrete_shape(affine.input)
    if shape is None:
        raise NotExact(f"{where}: the shape of its input is unknown (pass example inputs)")
    constants = _constants(affine, shape, layer)
    vectors = per_channel(layer, moves, constants) if not isinstance(constants, str) else constants
    if isinstance(vectors, str):
        raise NotExact(f"{where}: {vectors}")
    weight, bias = algebra.affine_after(layer.weight, layer.bias, vectors, groups=layer.groups,
                                        transposed=layer.transposed, dtype=layer.storage[0])  # rounded once, stored
    emit(ctx.gm, layer.spec, weight, bias, input=layer.input, replaces=layer.node, storage=layer.storage,
         name=layer.name)
    replace(node, affine.input)  # the affine is in the layer now; the layout ops read the new layer
    return True

"""Channel flow: which ops a value passes through with its channels intact (pass-through, views, pools, crops).

A per-channel map folds across an op that keeps each channel on its own (REPARAM §2); these predicates
say which ops do, and follow the node chains (a batch norm's tuple item, a chain of slices) that
capture splits one op into.
"""

from __future__ import annotations

import math
import operator

from torch import fx, nn

from ..meta import concrete_shape, fetch_attr, rank
from .targets import (
    _ADAPTIVE_AVG,
    _BN_TUPLE_TARGETS,
    _DROPOUT_FUNCTIONS,
    _DROPOUT_MODULES,
    _ELEMENTWISE_FUNCTIONS,
    _ELEMENTWISE_MODULES,
    _FLATTEN,
    _MEAN,
    _POOLING_FUNCTIONS,
    _POOLING_MODULES,
    _RESHAPE_FUNCTIONS,
    _SLICE,
    _TO_END,
    _bind,
    _standard_module,
    opaque,
)


def sole_user(node: fx.Node) -> fx.Node | None:
    """The one op reading ``node``, looking through a batch norm that returns a tuple to its item 0."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.target in _BN_TUPLE_TARGETS:
        items = [u for u in user.users if u.target is operator.getitem and u.args[1] == 0]
        return items[0] if len(items) == 1 else None
    return user


# ----------------------------------------------------------------------------- channel-wise maps that keep zero


def _pooled_dims(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """How many trailing dims ``node`` pools over (0 for an elementwise map), or ``None`` if it is neither."""
    if node.op == "call_module":
        mod = fetch_attr(gm, node.target)
        if opaque(node) or mod._forward_hooks or mod._forward_pre_hooks:
            return None
        if isinstance(mod, _ELEMENTWISE_MODULES):
            return 0
        return _POOLING_MODULES.get(type(mod))
    if node.op == "call_function":
        return 0 if node.target in _ELEMENTWISE_FUNCTIONS else _POOLING_FUNCTIONS.get(node.target)
    if node.op == "call_method" and node.target in ("relu", "relu_", "tanh", "clone", "detach"):
        return 0
    return None


def zero_keeping(gm: fx.GraphModule, node: fx.Node, channel_dim: int) -> fx.Node | None:
    """The input of ``node`` if it maps each channel (along ``channel_dim``) on its own and an all-zero channel
    to an all-zero channel (ReLU-like activations, pooling over trailing dims only, dropout in eval), else None.

    A pooling op that reaches the channel axis (``max_pool3d`` on a 4-d tensor) mixes channels: not zero-keeping.
    """
    pooled = _pooled_dims(gm, node) if opaque(node) is None else None
    if pooled is None or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if any(isinstance(a, fx.Node) for a in [*node.args[1:], *node.kwargs.values()]):
        return None
    if pooled:
        ndim = rank(node.args[0])
        if ndim is None or ndim - pooled <= channel_dim:
            return None
    return node.args[0]


def flatten_start(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """The start dim of a full flatten (to the last dim), else ``None``: ``flatten(x, start)``, ``nn.Flatten``, or
    a ``view``/``reshape`` whose recorded shapes keep the leading dims and merge all the others
    (``x.view(x.size(0), -1)``)."""
    if node.op == "call_module":
        mod = _standard_module(gm, node, nn.Flatten)
        return mod.start_dim % max(rank(node.args[0]) or 1, 1) if mod is not None and mod.end_dim == -1 else None
    if opaque(node):
        return None
    is_reshape = (node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("view", "reshape"))
    if is_reshape and node.args and isinstance(node.args[0], fx.Node):
        before, after = concrete_shape(node.args[0]), concrete_shape(node)
        if before is None or after is None or not after or len(after) > len(before):
            return None
        start = len(after) - 1
        keeps_lead = before[:start] == after[:start] and math.prod(before[start:]) == after[start]
        return start if keeps_lead and 0 not in before else None
    if not ((node.op == "call_function" and node.target in _FLATTEN) or (node.op == "call_method"
            and node.target == "flatten")):
        return None
    a = _bind(node, ("input", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
    return int(a["start_dim"]) if a["end_dim"] == -1 else None


def channel_average(gm: fx.GraphModule, node: fx.Node, channel_dim: int) -> tuple[fx.Node, int] | None:
    """``(input, channel dim there)`` if ``node`` averages each channel over other dims, or flattens dims away
    without touching the channel axis: a per-channel affine map commutes with it (REPARAM §2: ``mean(a x + b) =
    a mean(x) + b``), so it folds across. ``channel_dim`` is the channel axis of ``node``'s output."""
    if opaque(node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source, before = node.args[0], concrete_shape(node.args[0])
    after = concrete_shape(node)
    if before is None or after is None:
        return None
    if (node.op == "call_function" and node.target in _MEAN) or (node.op == "call_method" and node.target == "mean"):
        a = _bind(node, ("input", "dim", "keepdim"), {"dim": None, "keepdim": False})
        if a["dim"] is None or len(a) > 3 or node.kwargs.get("dtype") is not None:
            return None
        dims = {d % len(before) for d in ((a["dim"],) if isinstance(a["dim"], int) else a["dim"])}
        kept = [d for d in range(len(before)) if a["keepdim"] or d not in dims]
        if channel_dim >= len(kept) or kept[channel_dim] in dims:
            return None
        return source, kept[channel_dim]
    if (node.op == "call_function" and node.target in _ADAPTIVE_AVG) or (
            node.op == "call_module" and _standard_module(gm, node, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                                                                     nn.AdaptiveAvgPool3d)) is not None):
        pooled = _pooled_dims(gm, node)  # each output is the mean of a window of its own channel, over these dims
        return (source, channel_dim) if pooled and channel_dim < len(after) - pooled else None
    start = flatten_start(gm, node)
    if start is None or len(after) != start + 1:
        return None
    if channel_dim < start:
        return source, channel_dim  # the channel axis is before the merged dims
    if channel_dim == start and math.prod(before[start + 1:]) == 1:
        return source, channel_dim  # merged with dims of size 1 only
    return None


def symmetric_crop(node: fx.Node, spatial_dims: int) -> tuple[fx.Node, tuple[int, ...]] | None:
    """``(source, crops)`` if ``node`` is ``source`` cropped by ``crops[i]`` pixels on both sides of spatial dim
    ``i`` through a chain of unit-step slices (``x[:, :, 1:-1, :]``), else ``None``. Ends must count from the
    end, so the crop is the same at every input size."""
    crops = [0] * spatial_dims
    seen = False
    while node.op == "call_function" and node.target in _SLICE and not opaque(node):
        a = _bind(node, ("input", "dim", "start", "end", "step"), {"dim": 0, "start": None, "end": None, "step": 1})
        source, ndim = a["input"], rank(a["input"]) if isinstance(a["input"], fx.Node) else None
        if ndim is None or a["step"] != 1 or not all(isinstance(v, int) or v is None for v in (a["start"], a["end"])):
            return None
        dim = a["dim"] % ndim
        start, end = a["start"] or 0, _TO_END if a["end"] is None else a["end"]
        first_spatial = ndim - spatial_dims
        if dim < first_spatial:
            if start != 0 or end < _TO_END:
                return None  # a slice of batch or channels: not a crop
        elif start > 0 and end == -start:
            crops[dim - first_spatial] += start
            seen = True
        elif not (start == 0 and end >= _TO_END):
            return None  # a crop of one side only, or one that depends on the input's size
        node = source
    return (node, tuple(crops)) if seen else None


def inference_identity(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The input of ``node`` if ``node`` is the identity at inference (every dropout variant in eval, in any
    capture form, and ``nn.Identity``), else None."""
    if opaque(node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_module":
        mod = _standard_module(gm, node, (*_DROPOUT_MODULES, nn.Identity))
        return node.args[0] if mod is not None and not mod.training and len(node.args) == 1 else None
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        a = _bind(node, *_DROPOUT_FUNCTIONS[node.target])
        return node.args[0] if a.get("training", a.get("train")) is False else None
    return None


def last_axis_reshape(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The input of ``node`` if ``node`` only regroups the leading dims and keeps the last axis whole
    (``linear(x).flatten(0, 1)``: ``[B, N, C] -> [B*N, C]``), so per-channel maps on either side are one map."""
    if opaque(node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    reshapes = _RESHAPE_FUNCTIONS | _FLATTEN
    if not ((node.op == "call_function" and node.target in reshapes)
            or (node.op == "call_method" and node.target in ("view", "reshape", "flatten"))):
        return None
    before, after = concrete_shape(node.args[0]), concrete_shape(node)
    if before is None or after is None or len(before) < 2 or len(after) < 2 or before[-1] != after[-1]:
        return None
    return node.args[0] if math.prod(before) == math.prod(after) else None

"""``noop_casts``: a cast to the dtype and device its input already has, erased.

peft's ``result.to(previous_dtype)``, ``x.float()`` on a float32 value and ``y.type_as(x)`` capture as
``aten.to``/``aten._to_copy``/``aten.type_as`` calls that compute the identity at the captured dtype, yet
they sit between a conv or linear layer and its BatchNorm and block the fold; they also pin the folded
model to the captured dtype (``folded.double()`` then fails). The value is unchanged, so erasing the cast
is exact; a cast that changes dtype or device, or whose value is written in place, stays.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from fxreparam.meta import concrete_shape, device_recorded, storage, written
from fxreparam.registry import PassContext, register_pass

_aten = torch.ops.aten
_CAST_FUNCTIONS = {getattr(getattr(_aten, name), overload) for name, overloads in
                   (("to", ("dtype", "dtype_layout", "device", "other")), ("_to_copy", ("default",)),
                    ("type_as", ("default",)))
                   for overload in overloads if hasattr(getattr(_aten, name, None), overload)}
_CAST_METHODS = {"to", "type_as", "float", "double", "half", "bfloat16", "type"}
_PLAIN_ARGS = (torch.dtype, bool, torch.memory_format, torch.layout, type(None))


def cast_source(node: fx.Node) -> fx.Node | None:
    """The input of ``node`` if ``node`` is a dtype or device cast (``to``, ``_to_copy``, ``type_as``,
    ``.float()``...), else None. (A recognizer: it belongs in :mod:`fxreparam.ops` once that file takes it.)"""
    if (node.op == "call_function" and node.target in _CAST_FUNCTIONS) or (
            node.op == "call_method" and node.target in _CAST_METHODS):
        source = node.args[0] if node.args else None
        return source if isinstance(source, fx.Node) else None
    return None


def _reads_dtype(arg: Any) -> bool:
    """Whether ``arg`` is a graph value that is a dtype (``x.dtype`` traced): it cannot name a device."""
    return isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target is getattr and \
        len(arg.args) == 2 and arg.args[1] == "dtype"


def _names_only_dtypes(node: fx.Node) -> bool:
    """Whether every argument after the input is a dtype (``x.dtype`` included), a flag, a layout or a memory format:
    nothing that could name a device (another node could: ``x.to(w.device)``, ``x.to(y)``, ``x.type_as(y)``)."""
    rest: list[Any] = [*node.args[1:], *node.kwargs.values()]
    return all(isinstance(a, _PLAIN_ARGS) or _reads_dtype(a) for a in rest) and "device" not in node.kwargs


def why_not_noop(node: fx.Node, source: fx.Node) -> str | None:
    """Why the cast ``node`` of ``source`` may change its value (or cannot be shown not to), or None."""
    if written(node) or written(source):
        return "its value or its input is written in place"
    after, before = storage(node), storage(source)
    if after is None or before is None or after != before:
        return f"it casts {before} to {after}"
    if concrete_shape(node) != concrete_shape(source):
        return "its shape differs from its input's"
    if not (device_recorded(node) and device_recorded(source)) and not _names_only_dtypes(node):
        return "capture did not record the devices, and it may move the value"
    return None


@register_pass("noop_casts", "erase casts to the dtype and device the value already has (peft's "
                             "result.to(previous_dtype), .float() on float32)")
def noop_casts(ctx: PassContext, node: fx.Node) -> bool:
    source = cast_source(node)
    if source is None or why_not_noop(node, source) is not None:
        return False
    node.replace_all_uses_with(source)
    ctx.gm.graph.erase_node(node)
    return True

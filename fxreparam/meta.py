"""What capture recorded about a node: its tensor's rank, shape, dtype and device, and the model path it came from.

Recognizers, passes and the finalizer ask these questions of nodes from any capture form
(``torch.export``'s fake tensors in ``meta["val"]``, Dynamo's ``example_value``, ShapeProp's
``tensor_meta``), so that no pass reads ``node.meta`` itself. Every metadata key fxreparam reads or writes is
named here, with one reader (and one writer, where fxreparam writes it): capture's, torch's and the engine's own.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx, nn

__all__ = [
    "EXAMPLE_VALUE",
    "GRAPHARG",
    "GUARD",
    "MODULE_STACK",
    "OPAQUE",
    "PATH",
    "PROVISIONAL",
    "SPECULATION_UNDONE",
    "TENSOR_META",
    "VAL",
    "WRITTEN",
    "Storage",
    "channels_last",
    "clean_path",
    "concrete_shape",
    "copy_but_written",
    "copy_value",
    "device_recorded",
    "drop_provisional",
    "dynamo_graph_arg",
    "dynamo_value",
    "export_value",
    "fetch_attr",
    "forget_shape",
    "is_guard",
    "mark_guard",
    "mark_opaque",
    "mark_speculation_undone",
    "marked_opaque",
    "module_path",
    "provisional_record",
    "rank",
    "recorded_value",
    "set_path",
    "set_provisional_record",
    "set_written",
    "speculation_undone",
    "storage",
    "written",
]

# Keys torch's capture forms write.
VAL = "val"  # torch.export / make_fx: the node's value as a fake tensor, SymInt or number
EXAMPLE_VALUE = "example_value"  # Dynamo: the value it traced the node with
TENSOR_META = "tensor_meta"  # ShapeProp (after symbolic_trace): shape, dtype, stride
MODULE_STACK = "nn_module_stack"  # export / Dynamo: the modules a node was called under
GRAPHARG = "grapharg"  # Dynamo: where a graph input came from (a parameter, a buffer, a user input)

# Keys fxreparam writes.
OPAQUE = "fxreparam_opaque"  # capture.trace: why a call_module must be kept as it is (recognizers skip it)
GUARD = "fxreparam_guard"  # capture.guard: the input guard's call (bookkeeping, not work)
WRITTEN = "fxreparam_written"  # mutation.mark_written: why a value may be written in place (folds are blocked)
PATH = "fxreparam_path"  # graph.insert_layer: the model path of a layer a fold emitted
PROVISIONAL = "fxreparam_provisional"  # graph.mark_provisional: the pair a provisional composition came from
SPECULATION_UNDONE = "fxreparam_speculation_undone"  # settle_provisional: a restored pair, not to compose again

_META_KEYS = (VAL, EXAMPLE_VALUE)  # export/make_fx, Dynamo

Storage = tuple[torch.dtype, torch.device]
"""The dtype and device a folded tensor is stored in: the model's own."""


def fetch_attr(gm: nn.Module, target: str) -> Any:
    """The object at a dotted attribute path of ``gm``."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _meta_tensor(node: fx.Node) -> Any:
    """What capture recorded about a node's tensor value: a fake tensor, or symbolic_trace's tensor_meta."""
    for key in _META_KEYS:
        value = node.meta.get(key)
        if isinstance(value, torch.Tensor):
            return value
    return node.meta.get(TENSOR_META)


def rank(node: fx.Node) -> int | None:
    """The number of dims of a node's tensor value, where capture recorded it."""
    shape = getattr(_meta_tensor(node), "shape", None)
    return len(shape) if shape is not None else None


def concrete_shape(node: fx.Node) -> tuple[int, ...] | None:
    """A node's shape at capture, symbolic sizes (a dynamic batch) replaced by their example values."""
    shape = getattr(_meta_tensor(node), "shape", None)
    return None if shape is None else _hinted(shape)


def _hinted(sizes: Any) -> tuple[int, ...] | None:
    """Sizes or strides with symbolic entries replaced by their example values (None where one has none)."""
    out = []
    for d in sizes:
        hint = d.node.hint if isinstance(d, torch.SymInt) else d
        if not isinstance(hint, int):
            return None
        out.append(int(hint))
    return tuple(out)


def channels_last(node: fx.Node) -> bool | None:
    """Whether capture recorded a node's 4-d or 5-d value in channels-last layout (None: not recorded); a fold must
    give its result the same layout, since a later ``view`` of it was captured against those strides."""
    meta = _meta_tensor(node)
    if isinstance(meta, torch.Tensor):
        shape, stride = _hinted(meta.shape), _hinted(meta.stride())
    else:
        shape, stride = getattr(meta, "shape", None), getattr(meta, "stride", None)
    if shape is None or stride is None or len(shape) not in (4, 5):
        return None
    return shape[1] > 1 and shape[-1] > 1 and stride[1] == 1 and stride[-1] == shape[1]  # N, H, W, C in memory


def storage(node: fx.Node) -> Storage | None:
    """The dtype and device of a node's value, where recorded: what kernels folded into it are stored as."""
    meta = _meta_tensor(node)
    if meta is None or getattr(meta, "dtype", None) is None:
        return None
    device = meta.device if isinstance(meta, torch.Tensor) else torch.device("cpu")
    return meta.dtype, device


def device_recorded(node: fx.Node) -> bool:
    """Whether capture recorded the device of ``node``'s value (export's and Dynamo's fake tensors do; ShapeProp's
    ``tensor_meta`` does not, and :func:`storage` then says ``cpu``)."""
    return any(isinstance(node.meta.get(key), torch.Tensor) for key in _META_KEYS)


def forget_shape(node: fx.Node) -> None:
    """Drop what capture recorded about a node's value, once a rewrite changed its shape."""
    for key in (*_META_KEYS, TENSOR_META):
        node.meta.pop(key, None)


def export_value(node: fx.Node) -> Any:
    """The value torch.export / make_fx recorded for ``node`` (``meta["val"]``: fake tensor, SymInt, number)."""
    return node.meta.get(VAL)


def dynamo_value(node: fx.Node) -> Any:
    """The value Dynamo traced ``node`` with (``meta["example_value"]``), or None."""
    return node.meta.get(EXAMPLE_VALUE)


def recorded_value(node: fx.Node) -> Any:
    """The value capture recorded for ``node``: export's ``val``, else Dynamo's ``example_value`` (or None)."""
    return node.meta.get(VAL, node.meta.get(EXAMPLE_VALUE))


def copy_value(source: fx.Node, target: fx.Node) -> None:
    """Copy what capture recorded about ``source``'s value (fake tensor, tensor_meta) onto ``target``, which
    computes the same value (the input guard's output for an input)."""
    target.meta.update({k: v for k, v in source.meta.items() if k in (*_META_KEYS, TENSOR_META)})


def copy_but_written(source: fx.Node, target: fx.Node) -> None:
    """Copy all of ``source``'s metadata onto ``target`` but the in-place-write flag: a fresh op computing
    ``source``'s value does not share its storage, so it is not written through it."""
    target.meta.update({k: v for k, v in source.meta.items() if k != WRITTEN})


def dynamo_graph_arg(node: fx.Node) -> Any:
    """Dynamo's record of where the graph input ``node`` came from (its ``GraphArg``: a source that names a
    parameter or buffer), or None."""
    return node.meta.get(GRAPHARG)


def marked_opaque(node: fx.Node) -> str | None:
    """Why capture kept ``node``'s module as it is (written by :func:`mark_opaque`), or None."""
    return node.meta.get(OPAQUE)


def mark_opaque(node: fx.Node, reason: str) -> None:
    """Record that ``node``'s module must be kept as it is, and why (capture.trace, for recognizers to skip)."""
    node.meta[OPAQUE] = reason


def is_guard(node: fx.Node) -> bool:
    """Whether ``node`` is the input guard's call (written by :func:`mark_guard`): bookkeeping, no work."""
    return bool(node.meta.get(GUARD))


def mark_guard(node: fx.Node) -> None:
    """Record that ``node`` is the input guard's call (capture.guard)."""
    node.meta[GUARD] = True


def written(node: fx.Node) -> str | None:
    """Why ``node``'s value may be written in place (written by :func:`set_written`), or None."""
    return node.meta.get(WRITTEN)


def set_written(node: fx.Node, why: str) -> None:
    """Record that ``node``'s value may be written in place, and why (mutation.mark_written)."""
    node.meta[WRITTEN] = why


def set_path(node: fx.Node, path: str) -> None:
    """Record the model path of a layer a fold emitted (graph.insert_layer), read back by :func:`module_path`."""
    node.meta[PATH] = path


def provisional_record(node: fx.Node) -> Any:
    """The provisional composition recorded on ``node`` (written by :func:`set_provisional_record`), or None."""
    return node.meta.get(PROVISIONAL)


def set_provisional_record(node: fx.Node, record: Any) -> None:
    """Record on ``node`` the pair it was provisionally composed from (graph.mark_provisional)."""
    node.meta[PROVISIONAL] = record


def drop_provisional(node: fx.Node) -> None:
    """Forget that ``node`` is a provisional composition (settle_provisional, on the layers it restored)."""
    node.meta.pop(PROVISIONAL, None)


def speculation_undone(node: fx.Node) -> bool:
    """Whether ``node`` is a layer settle_provisional restored (written by :func:`mark_speculation_undone`)."""
    return bool(node.meta.get(SPECULATION_UNDONE))


def mark_speculation_undone(node: fx.Node) -> None:
    """Record that ``node`` was restored from a provisional composition, so it is not composed again on speculation."""
    node.meta[SPECULATION_UNDONE] = True


_STACK_PREFIX = re.compile(r"^(L\['(self|fn|mod|model)'\]|L__self__|self)\.?")
_INDEX = re.compile(r"\[(\d+)\]|\[['\"]([^'\"]+)['\"]\]")


def clean_path(path: str) -> str:
    """A Dynamo or export source path (``L['self']._modules['layer1']``) as the model spells it (``layer1``)."""
    path = _STACK_PREFIX.sub("", path)
    path = _INDEX.sub(lambda m: "." + (m.group(1) or m.group(2)), path)
    path = re.sub(r"(^|\.)_(modules|parameters|buffers)\.", r"\1", path)
    return re.sub(r"@\d+$", "", path).strip(".")


def module_path(node: fx.Node) -> str:
    """The model's own name for where a node came from (``layer1.0.bn1``), for names and messages."""
    if PATH in node.meta:
        return node.meta[PATH]
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get(MODULE_STACK)
    if stack:
        path = clean_path(str(list(stack.values())[-1][0]))
        if path:
            return path
    return node.name

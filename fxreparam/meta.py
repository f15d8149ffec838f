"""What capture recorded about a node: its tensor's rank, shape, dtype and device, and the model path it came from.

Recognizers, passes and the finalizer ask these questions of nodes from any capture form
(``torch.export``'s fake tensors in ``meta["val"]``, Dynamo's ``example_value``, ShapeProp's
``tensor_meta``), so that no pass reads ``node.meta`` itself.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx, nn

__all__ = [
    "Storage",
    "channels_last",
    "clean_path",
    "concrete_shape",
    "device_recorded",
    "fetch_attr",
    "forget_shape",
    "module_path",
    "rank",
    "storage",
]

_META_KEYS = ("val", "example_value")  # export/make_fx, Dynamo

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
    return node.meta.get("tensor_meta")


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
    for key in (*_META_KEYS, "tensor_meta"):
        node.meta.pop(key, None)


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
    if "fxreparam_path" in node.meta:
        return node.meta["fxreparam_path"]
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = clean_path(str(list(stack.values())[-1][0]))
        if path:
            return path
    return node.name

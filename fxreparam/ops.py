"""Op recognizers: one reading of every form a graph arrives in.

A graph from ``torch.fx.symbolic_trace`` calls modules (``call_module`` on an
``nn.Conv2d``), a Dynamo graph calls torch functions (``torch.conv2d``), and a
``torch.export`` graph calls aten overloads (``aten.conv2d.default``,
``aten.batch_norm.default``, ...). Each recognizer below takes a node in any of
these forms and returns one normalized description, or ``None``; passes are
written against these descriptions only.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import algebra

aten = torch.ops.aten

__all__ = [
    "BatchNorm",
    "Binary",
    "ChannelAffine",
    "Conv",
    "Linear",
    "batch_norm",
    "binary",
    "channel_affine",
    "concrete_shape",
    "constant",
    "conv",
    "fetch_attr",
    "flatten_start",
    "forget_shape",
    "like",
    "linear",
    "module_path",
    "op_kind",
    "rank",
    "weighted",
    "zero_keeping",
]


# ----------------------------------------------------------------------------- helpers


def _overloads(name: str, *overloads: str) -> list[Any]:
    """The aten overloads that exist in this torch version (names move between releases)."""
    packet = getattr(aten, name, None)
    return [getattr(packet, o) for o in overloads if packet is not None and hasattr(packet, o)]


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """The node's arguments by name, defaults filled in: positional and keyword forms read alike."""
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def fetch_attr(gm: nn.Module, target: str) -> Any:
    """The object at a dotted attribute path of ``gm``."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def constant(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """The value of ``arg`` if it is known before the forward runs (a stored tensor or a number)."""
    if isinstance(arg, fx.Node):
        if arg.op == "get_attr":
            value = fetch_attr(gm, arg.target)
            return value if isinstance(value, torch.Tensor) else None
        return None
    if isinstance(arg, bool) or not isinstance(arg, (int, float)):
        return None
    return torch.tensor(float(arg), dtype=torch.float64)


_META_KEYS = ("val", "example_value")  # export/make_fx, Dynamo


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
    if shape is None:
        return None
    out = []
    for d in shape:
        hint = d.node.hint if isinstance(d, torch.SymInt) else d
        if not isinstance(hint, int):
            return None
        out.append(int(hint))
    return tuple(out)


def like(node: fx.Node) -> torch.Tensor | None:
    """An empty tensor of the node's dtype and device (where recorded): what folded kernels are stored as."""
    meta = _meta_tensor(node)
    if meta is None or getattr(meta, "dtype", None) is None:
        return None
    device = meta.device if isinstance(meta, torch.Tensor) else torch.device("cpu")
    return torch.empty(0, dtype=meta.dtype, device=device)


def forget_shape(node: fx.Node) -> None:
    """Drop what capture recorded about a node's value, once a rewrite changed its shape."""
    for key in (*_META_KEYS, "tensor_meta"):
        node.meta.pop(key, None)


_STACK_PREFIX = re.compile(r"^(L\['(self|fn|mod|model)'\]|L__self__|self)\.?")
_INDEX = re.compile(r"\[(\d+)\]|\[['\"]([^'\"]+)['\"]\]")


def _clean_path(path: str) -> str:
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
        path = _clean_path(str(list(stack.values())[-1][0]))
        if path:
            return path
    return node.name


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value) if len(value) == dims else tuple(int(value[0]) for _ in range(dims))
    return (int(value),) * dims


# ----------------------------------------------------------------------------- conv and linear


@dataclass(frozen=True)
class Conv:
    """A convolution with stored weights: ``conv(input; weight, bias, stride, padding, ...)``."""

    node: fx.Node
    input: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    transposed: bool = False
    output_padding: tuple[int, ...] = ()
    padding_mode: str = "zeros"
    name: str = ""

    @property
    def dims(self) -> int:
        return self.weight.dim() - 2

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] * self.groups if self.transposed else self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[0] if self.transposed else self.weight.shape[1] * self.groups


@dataclass(frozen=True)
class Linear:
    """``input @ weight.T + bias`` with stored weights."""

    node: fx.Node
    input: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    name: str = ""

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]


_CONV = (("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
         {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
_CONV_T = (("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
           {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1})
_CONVOLUTION = (("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups"),
                {})

_CONV_TARGETS: dict[Any, tuple[tuple[str, ...], dict[str, Any], bool | None]] = {}
for _fn in (torch.conv1d, torch.conv2d, torch.conv3d,
            *_overloads("conv1d", "default", "padding"), *_overloads("conv2d", "default", "padding"),
            *_overloads("conv3d", "default", "padding")):
    _CONV_TARGETS[_fn] = (*_CONV, False)
for _fn in (torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d,
            *_overloads("conv_transpose1d", "default"), *_overloads("conv_transpose2d", "input"),
            *_overloads("conv_transpose3d", "input")):
    _CONV_TARGETS[_fn] = (*_CONV_T, True)
for _fn in (torch.convolution, *_overloads("convolution", "default"), *_overloads("_convolution", "default")):
    _CONV_TARGETS[_fn] = (*_CONVOLUTION, None)

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _string_padding(padding: str, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...] | None:
    """``'valid'`` and ``'same'`` as explicit padding; ``None`` where 'same' pads unevenly."""
    if padding == "valid":
        return (0,) * len(kernel)
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]
    return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)


def conv(gm: fx.GraphModule, node: fx.Node) -> Conv | None:
    """Recognize a convolution whose weight and bias are stored constants."""
    if node.op == "call_module":
        mod = fetch_attr(gm, node.target)
        if not isinstance(mod, _CONV_MODULES) or len(node.args) != 1 or node.kwargs:
            return None
        transposed = isinstance(mod, nn.modules.conv._ConvTransposeNd)
        dims = mod.weight.dim() - 2
        padding = mod.padding
        if isinstance(padding, str):
            padding = _string_padding(padding, tuple(mod.kernel_size), tuple(mod.dilation))
            if padding is None:
                return None
        return Conv(node, node.args[0], mod.weight, mod.bias, _tuple(mod.stride, dims), _tuple(padding, dims),
                    _tuple(mod.dilation, dims), mod.groups, transposed,
                    _tuple(mod.output_padding, dims) if transposed else (), mod.padding_mode, module_path(node))
    if node.op != "call_function" or node.target not in _CONV_TARGETS:
        return None
    names, defaults, transposed = _CONV_TARGETS[node.target]
    a = _bind(node, names, defaults)
    weight = constant(gm, a["weight"])
    bias = constant(gm, a["bias"]) if a["bias"] is not None else None
    if weight is None or (a["bias"] is not None and bias is None) or not isinstance(a["input"], fx.Node):
        return None
    if weight.dim() < 3:
        return None
    transposed = bool(a["transposed"]) if transposed is None else transposed
    dims = weight.dim() - 2
    dilation = _tuple(a["dilation"], dims)
    padding = a["padding"]
    if isinstance(padding, str):
        padding = _string_padding(padding, tuple(weight.shape[2:]), dilation)
        if padding is None:
            return None
    out_pad = _tuple(a.get("output_padding", 0), dims) if transposed else ()
    return Conv(node, a["input"], weight, bias, _tuple(a["stride"], dims), _tuple(padding, dims), dilation,
                int(a["groups"]), transposed, out_pad, "zeros", module_path(node))


_LINEAR_TARGETS = {F.linear, *_overloads("linear", "default")}


def linear(gm: fx.GraphModule, node: fx.Node) -> Linear | None:
    """Recognize a linear layer whose weight and bias are stored constants."""
    if node.op == "call_module":
        mod = fetch_attr(gm, node.target)
        if not isinstance(mod, nn.Linear) or len(node.args) != 1 or node.kwargs:
            return None
        return Linear(node, node.args[0], mod.weight, mod.bias, module_path(node))
    if node.op != "call_function" or node.target not in _LINEAR_TARGETS:
        return None
    a = _bind(node, ("input", "weight", "bias"), {"bias": None})
    weight = constant(gm, a["weight"])
    bias = constant(gm, a["bias"]) if a["bias"] is not None else None
    if weight is None or weight.dim() != 2 or (a["bias"] is not None and bias is None):
        return None
    if not isinstance(a["input"], fx.Node):
        return None
    return Linear(node, a["input"], weight, bias, module_path(node))


def weighted(gm: fx.GraphModule, node: fx.Node) -> Conv | Linear | None:
    """A conv or a linear layer: the ops whose output channels a per-channel affine folds into."""
    return conv(gm, node) or linear(gm, node)


# ----------------------------------------------------------------------------- batch norm


@dataclass(frozen=True)
class BatchNorm:
    """A batch norm. ``affine`` is its inference map, or ``None`` with ``why_not`` when it has none."""

    node: fx.Node
    input: fx.Node
    affine: algebra.Affine | None
    why_not: str | None
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    name: str = ""

    @property
    def channels(self) -> int | None:
        for t in (self.running_mean, self.weight):
            if t is not None:
                return t.numel()
        return None


_BN_FUNCTIONAL = (("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                  {"running_mean": None, "running_var": None, "weight": None, "bias": None, "training": False,
                   "momentum": 0.1, "eps": 1e-5})
_BN_ATEN = (("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
             "cudnn_enabled"), {})
_BN_NO_TRAINING = (("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"), {"training": False})
_BN_NO_STATS = (("input", "weight", "bias", "training", "momentum", "eps"),
                {"running_mean": None, "running_var": None})

# Targets returning the output itself, and targets returning a tuple whose item 0 is the output.
_BN_TARGETS: dict[Any, tuple[tuple[str, ...], dict[str, Any]]] = {
    F.batch_norm: _BN_FUNCTIONAL,
    torch.batch_norm: _BN_ATEN,
    **{t: _BN_ATEN for t in _overloads("batch_norm", "default")},
}
_BN_TUPLE_TARGETS: dict[Any, tuple[tuple[str, ...], dict[str, Any]]] = {
    **{t: _BN_NO_TRAINING for t in _overloads("_native_batch_norm_legit_no_training", "default")},
    **{t: _BN_NO_STATS for t in _overloads("_native_batch_norm_legit", "no_stats")},
    **{t: (_BN_ATEN[0][:-1], {}) for t in _overloads("native_batch_norm", "default")},
}


def _bn_from_module(gm: fx.GraphModule, node: fx.Node) -> BatchNorm | None:
    mod = fetch_attr(gm, node.target)
    if not isinstance(mod, nn.modules.batchnorm._BatchNorm) or len(node.args) != 1:
        return None
    training = mod.training or mod.running_mean is None
    return _bn(node, node.args[0], mod.weight, mod.bias, mod.running_mean, mod.running_var, training, mod.eps)


def _bn(node, input, weight, bias, mean, var, training, eps) -> BatchNorm:
    why = None
    if mean is None or var is None:
        why = "it has no running statistics (track_running_stats=False): it normalizes with batch statistics"
    elif training:
        why = "it runs in training mode: it normalizes with batch statistics"
    affine = None if why else algebra.bn_to_affine(mean, var, weight, bias, eps)
    return BatchNorm(node, input, affine, why, float(eps), weight, bias, mean, var, module_path(node))


def batch_norm(gm: fx.GraphModule, node: fx.Node) -> BatchNorm | None:
    """Recognize a batch norm in any form; ``node`` is the one whose value is its output."""
    if node.op == "call_module":
        return _bn_from_module(gm, node)
    if node.op != "call_function":
        return None
    src = node
    if node.target is operator.getitem:
        src, index = node.args
        if index != 0 or not isinstance(src, fx.Node) or src.target not in _BN_TUPLE_TARGETS:
            return None
        names, defaults = _BN_TUPLE_TARGETS[src.target]
    elif node.target in _BN_TARGETS:
        names, defaults = _BN_TARGETS[node.target]
    else:
        return None
    a = _bind(src, names, defaults)
    if not isinstance(a["input"], fx.Node):
        return None
    tensors = {}
    for key in ("weight", "bias", "running_mean", "running_var"):
        tensors[key] = constant(gm, a[key]) if a.get(key) is not None else None
        if a.get(key) is not None and tensors[key] is None:
            return None  # statistics computed in the graph: not a stored-constant batch norm
    return _bn(node, a["input"], tensors["weight"], tensors["bias"], tensors["running_mean"],
               tensors["running_var"], bool(a.get("training", False)), a.get("eps", 1e-5))


# ----------------------------------------------------------------------------- arithmetic


@dataclass(frozen=True)
class Binary:
    """An elementwise ``lhs <op> rhs`` with op one of add, sub, mul, div (``alpha`` scales rhs of add/sub)."""

    node: fx.Node
    op: str
    lhs: Any
    rhs: Any
    alpha: float = 1.0
    inplace: bool = False  # ``lhs`` is overwritten with the result (``x += y``, ``aten.add_``)


_BINARY_OPS: dict[Any, str] = {
    operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
    torch.add: "add", torch.sub: "sub", torch.mul: "mul", torch.div: "div",
}
_INPLACE_OPS: dict[Any, str] = {
    operator.iadd: "add", operator.isub: "sub", operator.imul: "mul", operator.itruediv: "div",
}
_BINARY_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div"}
_INPLACE_METHODS = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div"}
for _op in ("add", "sub", "mul", "div"):
    for _t in _overloads(_op, "Tensor", "Scalar"):
        _BINARY_OPS[_t] = _op
    for _t in _overloads(_op + "_", "Tensor", "Scalar"):
        _INPLACE_OPS[_t] = _op


def binary(node: fx.Node) -> Binary | None:
    """Recognize an elementwise add, sub, mul or true division, out of place or in place."""
    inplace = False
    if node.op == "call_function" and node.target in _BINARY_OPS:
        op = _BINARY_OPS[node.target]
    elif node.op == "call_function" and node.target in _INPLACE_OPS:
        op, inplace = _INPLACE_OPS[node.target], True
    elif node.op == "call_method" and node.target in _BINARY_METHODS:
        op = _BINARY_METHODS[node.target]
    elif node.op == "call_method" and node.target in _INPLACE_METHODS:
        op, inplace = _INPLACE_METHODS[node.target], True
    else:
        return None
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        return None
    alpha = node.kwargs.get("alpha", 1)
    if (op in ("mul", "div") and "alpha" in node.kwargs) or isinstance(alpha, fx.Node):
        return None
    return Binary(node, op, node.args[0], node.args[1], float(alpha), inplace)


# ----------------------------------------------------------------------------- per-channel affine maps


@dataclass(frozen=True)
class ChannelAffine:
    """``scale * input + shift`` with stored constants: a batch norm, or add/sub/mul/div by a constant.

    A batch norm's ``scale``/``shift`` are vectors over dim 1; an arithmetic op's are the raw
    broadcast constants, read along a given channel dim by :meth:`vectors`.
    """

    node: fx.Node
    input: fx.Node
    scale: torch.Tensor
    shift: torch.Tensor
    on_dim1: bool
    kind: str
    name: str = ""
    dtype: torch.dtype | None = None  # the stored constant's dtype where it takes part in type promotion

    def vectors(self, channels: int, ndim: int, channel_dim: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor] | str:
        """Scale and shift as ``[channels]`` vectors over ``channel_dim``, or why they are not."""
        if self.on_dim1:
            if channel_dim != 1 or ndim < 2:
                return f"the {self.kind} normalizes dim 1, and the channels are dim {channel_dim} of {ndim}"
            if self.scale.numel() != channels:
                return f"the {self.kind} has {self.scale.numel()} channels, the tensor {channels}"
            return self.scale, self.shift
        if self.dtype is not None and self.dtype != dtype and self.dtype.is_floating_point:
            return f"the constant's dtype {self.dtype} would change the result's {dtype}"
        out = []
        for t in (self.scale, self.shift):
            if t.dim() > ndim:
                return f"the constant of shape {tuple(t.shape)} broadcasts the {ndim}-d tensor up"
            shape = [1] * (ndim - t.dim()) + list(t.shape)
            if any(s != 1 for d, s in enumerate(shape) if d != channel_dim) or shape[channel_dim] not in (1, channels):
                return f"the constant of shape {tuple(t.shape)} is not per-channel along dim {channel_dim}"
            out.append(t.reshape(-1).expand(channels))
        return out[0], out[1]


def channel_affine(gm: fx.GraphModule, node: fx.Node) -> ChannelAffine | None:
    """Recognize a per-channel affine map: an inference batch norm, or arithmetic with one constant operand."""
    bn = batch_norm(gm, node)
    if bn is not None:
        if bn.affine is None:
            return None
        return ChannelAffine(node, bn.input, bn.affine[0], bn.affine[1], True, "batch norm", bn.name)
    b = binary(node)
    if b is None or (b.inplace and not (isinstance(b.lhs, fx.Node) and set(b.lhs.users) == {node})):
        return None  # an in-place op is a plain one only where nothing else reads what it overwrites
    lhs_c, rhs_c = constant(gm, b.lhs), constant(gm, b.rhs)
    if (lhs_c is None) == (rhs_c is None):
        return None
    x, c = (b.rhs, lhs_c) if lhs_c is not None else (b.lhs, rhs_c)
    if not isinstance(x, fx.Node) or c.is_complex():
        return None
    raw_dtype = c.dtype if c.dim() > 0 else None  # a 0-d constant never promotes the tensor's dtype
    c = c.detach().to(torch.float64)
    one, zero = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    x_first = lhs_c is None
    if b.op == "mul":
        scale, shift = c, zero
    elif b.op == "div":
        if not x_first:
            return None  # c / x is not affine
        scale, shift = 1.0 / c, zero
    elif b.op == "add":
        scale, shift = one, c * b.alpha if x_first else c
        if not x_first and b.alpha != 1.0:
            return None  # c + alpha * x: leave it
    else:  # sub
        scale, shift = (one, -c * b.alpha) if x_first else (-one * b.alpha, c)
    return ChannelAffine(node, x, scale, shift, False, b.op, module_path(node), raw_dtype)


# ----------------------------------------------------------------------------- pooling and padding


@dataclass(frozen=True)
class AvgPool:
    """``avg_pool{1,2,3}d(input, kernel, stride, padding, ...)``; ``exact_as_conv`` says whether it is a conv."""

    node: fx.Node
    input: fx.Node
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    ceil_mode: bool
    count_include_pad: bool
    divisor_override: int | None
    name: str = ""

    @property
    def why_not_conv(self) -> str | None:
        """Why this pooling is not a depthwise conv with weight 1/k (REPARAM §7), or ``None`` when it is."""
        if self.ceil_mode:
            return "ceil_mode=True averages partial windows"
        if self.divisor_override:
            return "divisor_override changes the weights"
        if any(self.padding) and not self.count_include_pad:
            return "count_include_pad=False divides border windows by fewer taps"
        return None


_POOL_ARGS = (("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
              {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None})
_POOL_TARGETS: dict[Any, int] = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
for _dims in (1, 2, 3):
    for _t in _overloads(f"avg_pool{_dims}d", "default"):
        _POOL_TARGETS[_t] = _dims
_POOL_MODULES = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}


def avg_pool(gm: fx.GraphModule, node: fx.Node) -> AvgPool | None:
    """Recognize an average pooling with a fixed window."""
    if node.op == "call_module":
        mod = fetch_attr(gm, node.target)
        dims = _POOL_MODULES.get(type(mod))
        if dims is None or len(node.args) != 1:
            return None
        a = {"input": node.args[0], "kernel_size": mod.kernel_size, "stride": mod.stride, "padding": mod.padding,
             "ceil_mode": mod.ceil_mode, "count_include_pad": mod.count_include_pad,
             "divisor_override": getattr(mod, "divisor_override", None)}
    elif node.op == "call_function" and node.target in _POOL_TARGETS:
        dims = _POOL_TARGETS[node.target]
        a = _bind(node, *_POOL_ARGS)
    else:
        return None
    if not isinstance(a["input"], fx.Node):
        return None
    kernel = _tuple(a["kernel_size"], dims)
    stride = kernel if a["stride"] in (None, [], ()) else _tuple(a["stride"], dims)
    return AvgPool(node, a["input"], kernel, stride, _tuple(a["padding"], dims), bool(a["ceil_mode"]),
                   bool(a["count_include_pad"]), a["divisor_override"], module_path(node))


@dataclass(frozen=True)
class Pad:
    """Constant padding of the trailing dims: ``pads`` as in ``F.pad`` (last dim first), fill ``value``."""

    node: fx.Node
    input: fx.Node
    pads: tuple[int, ...]
    value: float


_PAD_TARGETS = {F.pad: ("input", "pad", "mode", "value"), torch.constant_pad_nd: ("input", "pad", "value")}
for _t in _overloads("pad", "default"):
    _PAD_TARGETS[_t] = ("input", "pad", "mode", "value")
for _t in _overloads("constant_pad_nd", "default"):
    _PAD_TARGETS[_t] = ("input", "pad", "value")


def constant_pad(node: fx.Node) -> Pad | None:
    """Recognize a constant (zero or scalar) padding; other modes are not recognized."""
    if node.op != "call_function" or node.target not in _PAD_TARGETS:
        return None
    a = _bind(node, _PAD_TARGETS[node.target], {"mode": "constant", "value": None})
    if a["mode"] != "constant" or not isinstance(a["input"], fx.Node) or isinstance(a["value"], fx.Node):
        return None
    return Pad(node, a["input"], tuple(int(p) for p in a["pad"]), float(a["value"] or 0.0))


# ----------------------------------------------------------------------------- channel-wise maps that keep zero


_ZERO_KEEPING_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.hardswish, F.mish, torch.tanh, F.tanh,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d, F.dropout,
}
for _name in ("relu", "relu_", "relu6", "gelu", "silu", "silu_", "leaky_relu", "elu", "hardswish", "mish", "tanh",
              "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
              "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
              "dropout", "clone", "alias", "detach"):
    _ZERO_KEEPING_FUNCTIONS.update(_overloads(_name, "default"))
_ZERO_KEEPING_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Mish, nn.Tanh,
                         nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                         nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Dropout, nn.Identity)


def zero_keeping(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The input of ``node`` if it maps each channel on its own and an all-zero channel to an all-zero
    channel (ReLU-like activations, pooling, dropout in eval), else ``None``."""
    if node.op == "call_module":
        ok = isinstance(fetch_attr(gm, node.target), _ZERO_KEEPING_MODULES)
    elif node.op == "call_function":
        ok = node.target in _ZERO_KEEPING_FUNCTIONS
    elif node.op == "call_method":
        ok = node.target in ("relu", "relu_", "tanh", "clone", "detach")
    else:
        ok = False
    if not ok or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    return node.args[0] if not any(isinstance(a, fx.Node) for a in [*node.args[1:], *node.kwargs.values()]) else None


_FLATTEN = {torch.flatten, *_overloads("flatten", "using_ints")}


def flatten_start(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """The start dim of a full ``flatten(x, start)`` (to the last dim), else ``None``."""
    if node.op == "call_module":
        mod = fetch_attr(gm, node.target)
        return mod.start_dim if isinstance(mod, nn.Flatten) and mod.end_dim == -1 else None
    if node.op != "call_function" or node.target not in _FLATTEN:
        return None
    a = _bind(node, ("input", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
    return int(a["start_dim"]) if a["end_dim"] == -1 else None


def op_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """``"conv"``, ``"linear"``, ``"batch_norm"``, ``"add_sub"`` or ``"mul_div"`` by the op alone, whatever
    its weights are (computed in the graph or stored); ``None`` for anything else. Used to count work."""
    if node.op == "call_module":
        mod = fetch_attr(gm, node.target)
        for kind, classes in (("conv", _CONV_MODULES), ("linear", nn.Linear),
                              ("batch_norm", nn.modules.batchnorm._BatchNorm)):
            if isinstance(mod, classes):
                return kind
        return None
    if node.op == "call_function":
        if node.target in _CONV_TARGETS:
            return "conv"
        if node.target in _LINEAR_TARGETS:
            return "linear"
        if node.target in _BN_TARGETS or (
            node.target is operator.getitem and node.args[1] == 0
            and getattr(node.args[0], "target", None) in _BN_TUPLE_TARGETS
        ):
            return "batch_norm"
    b = binary(node)
    if b is not None:
        return "add_sub" if b.op in ("add", "sub") else "mul_div"
    return None

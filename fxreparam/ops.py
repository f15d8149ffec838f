"""Op recognizers: one reading of every form a graph arrives in.

A graph from ``torch.fx.symbolic_trace`` calls modules (``call_module`` on an
``nn.Conv2d``), a Dynamo graph calls torch functions (``torch.conv2d``), and a
``torch.export`` graph calls aten overloads (``aten.conv2d.default``,
``aten._native_batch_norm_legit_no_training.default``, ...). Each recognizer below takes a
node in any of these forms and returns one normalized description, or ``None``; passes are
written against these descriptions only. A node capture marked opaque (a module with hooks,
or one that overrides a standard layer's ``forward``) or one whose value may be written in
place (see :mod:`fxreparam.mutation`) is never recognized.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import algebra
from .meta import concrete_shape, fetch_attr, module_path, rank
from .spec import ConvSpec, Layer, LinearSpec

aten = torch.ops.aten

__all__ = [
    "AvgPool",
    "BatchNorm",
    "Binary",
    "ChannelAffine",
    "Pad",
    "avg_pool",
    "batch_norm",
    "binary",
    "channel_affine",
    "channel_average",
    "concat",
    "constant",
    "constant_pad",
    "conv",
    "flatten_start",
    "inference_identity",
    "last_axis_reshape",
    "linear",
    "mode_pad",
    "op_kind",
    "opaque",
    "reads_as_kernel",
    "shape_query",
    "sole_user",
    "symmetric_crop",
    "value_users",
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


def constant(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """The value of ``arg`` if it is known before the forward runs (a stored tensor or a number)."""
    if isinstance(arg, fx.Node):
        if arg.op == "get_attr" and not arg.meta.get("fxreparam_written"):
            value = fetch_attr(gm, arg.target)
            return value if isinstance(value, torch.Tensor) else None
        return None
    if isinstance(arg, bool) or not isinstance(arg, (int, float)):
        return None
    return torch.tensor(float(arg), dtype=torch.float64)


def opaque(node: fx.Node) -> str | None:
    """Why ``node`` must be kept as it is (capture marked it, or its value may be written in place), or None."""
    return node.meta.get("fxreparam_opaque") or node.meta.get("fxreparam_written")


def _standard_module(gm: fx.GraphModule, node: fx.Node, classes: tuple[type, ...] | type) -> nn.Module | None:
    """The module ``node`` calls if it is one of ``classes`` running that class's own ``forward``, no hooks."""
    mod = fetch_attr(gm, node.target)
    classes = classes if isinstance(classes, tuple) else (classes,)
    if not isinstance(mod, classes) or opaque(node):
        return None
    base = next(c for c in classes if isinstance(mod, c))
    if type(mod).forward is not base.forward:
        return None  # a subclass with its own forward (fake-quant, QAT, ...): not the plain layer
    if mod._forward_hooks or mod._forward_pre_hooks:
        return None
    return mod


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value) if len(value) == dims else tuple(int(value[0]) for _ in range(dims))
    return (int(value),) * dims


# ----------------------------------------------------------------------------- conv and linear


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


def conv(gm: fx.GraphModule, node: fx.Node) -> Layer | None:
    """Recognize a convolution whose weight and bias are stored constants."""
    if node.op == "call_module":
        mod = _standard_module(gm, node, _CONV_MODULES)
        if mod is None or len(node.args) != 1 or node.kwargs:
            return None
        transposed = isinstance(mod, nn.modules.conv._ConvTransposeNd)
        dims = mod.weight.dim() - 2
        padding = mod.padding
        if isinstance(padding, str):
            padding = _string_padding(padding, tuple(mod.kernel_size), tuple(mod.dilation))
            if padding is None:
                return None
        spec = ConvSpec(_tuple(mod.stride, dims), _tuple(padding, dims), _tuple(mod.dilation, dims), mod.groups,
                        transposed, _tuple(mod.output_padding, dims) if transposed else (), mod.padding_mode)
        return _through_mode_pad(Layer(node, node.args[0], spec, mod.weight, mod.bias, module_path(node)))
    if node.op != "call_function" or node.target not in _CONV_TARGETS:
        return None
    names, defaults, transposed = _CONV_TARGETS[node.target]
    a = _bind(node, names, defaults)
    weight = constant(gm, a["weight"])
    bias = constant(gm, a["bias"]) if a["bias"] is not None else None
    if weight is None or (a["bias"] is not None and bias is None) or not isinstance(a["input"], fx.Node):
        return None
    if weight.dim() < 3 or opaque(node):
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
    spec = ConvSpec(_tuple(a["stride"], dims), _tuple(padding, dims), dilation, int(a["groups"]), transposed, out_pad)
    return _through_mode_pad(Layer(node, a["input"], spec, weight, bias, module_path(node)))


def _through_mode_pad(layer: Layer) -> Layer:
    """``layer`` read as ``nn.ConvNd(padding_mode=...)`` where its input is a reflect, replicate or circular pad
    that pads its spatial dims symmetrically and that nothing else reads: ``torch.export`` splits such a conv
    into that pad and a conv with padding 0, and this reads them back as the one module (the same function)."""
    spec, pad = layer.spec, layer.input
    if not isinstance(spec, ConvSpec) or spec.transposed or any(spec.padding) or spec.padding_mode != "zeros":
        return layer
    found = mode_pad(pad)
    if found is None or len(pad.users) != 1 or opaque(pad) or opaque(found[0]):
        return layer
    source, pads, mode = found
    if len(pads) % 2 or len(pads) > 2 * spec.dims or any(pads[i] != pads[i + 1] for i in range(0, len(pads), 2)):
        return layer
    padding = (0,) * (spec.dims - len(pads) // 2) + tuple(reversed(pads[::2]))
    if not any(padding) or min(padding) < 0:
        return layer
    return dataclasses.replace(layer, input=source, spec=dataclasses.replace(spec, padding=padding,
                                                                             padding_mode=mode))


_LINEAR_TARGETS = {F.linear, *_overloads("linear", "default")}


def linear(gm: fx.GraphModule, node: fx.Node) -> Layer | None:
    """Recognize a linear layer whose weight and bias are stored constants."""
    if node.op == "call_module":
        mod = _standard_module(gm, node, nn.Linear)
        if mod is None or len(node.args) != 1 or node.kwargs:
            return None
        return Layer(node, node.args[0], LinearSpec(), mod.weight, mod.bias, module_path(node))
    if node.op != "call_function" or node.target not in _LINEAR_TARGETS:
        return None
    a = _bind(node, ("input", "weight", "bias"), {"bias": None})
    weight = constant(gm, a["weight"])
    bias = constant(gm, a["bias"]) if a["bias"] is not None else None
    if weight is None or weight.dim() != 2 or (a["bias"] is not None and bias is None):
        return None
    if not isinstance(a["input"], fx.Node) or opaque(node):
        return None
    return Layer(node, a["input"], LinearSpec(), weight, bias, module_path(node))


def reads_as_kernel(user: fx.Node, value: fx.Node) -> bool:
    """Whether ``user`` is a conv or linear op that reads ``value`` as its weight or bias only (not as its input)."""
    if user.op != "call_function" or (user.target not in _CONV_TARGETS and user.target not in _LINEAR_TARGETS):
        return False
    names = _CONV_TARGETS[user.target][0] if user.target in _CONV_TARGETS else ("input", "weight", "bias")
    a = _bind(user, names, {})
    return a.get("input") is not value and value in (a.get("weight"), a.get("bias"))


def weighted(gm: fx.GraphModule, node: fx.Node) -> Layer | None:
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
    mod = _standard_module(gm, node, nn.modules.batchnorm._BatchNorm)
    if mod is None or len(node.args) != 1 or node.kwargs:
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
    if affine is not None and not algebra.finite(*affine):
        affine = None
        why = "its scale or shift is not finite (a zero variance with eps=0?): a fold would turn inf into nan"
    return BatchNorm(node, input, affine, why, float(eps), weight, bias, mean, var, module_path(node))


_SHAPE_QUERIES = {*_overloads("sym_size", "int", "default"), *_overloads("sym_numel", "default"),
                  *_overloads("sym_stride", "int", "default"), *_overloads("size", "default", "int")}


def shape_query(node: fx.Node) -> bool:
    """Whether ``node`` reads only the shape of its input (``x.size(0)``, ``aten.sym_size``), not its values."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and (node.target in _SHAPE_QUERIES or (
        node.target is getattr and len(node.args) > 1 and node.args[1] in ("shape", "ndim")))


_AS_SHAPE_OF = {*_overloads("reshape_as", "default"), *_overloads("view_as", "default"),
                *_overloads("expand_as", "default")}


def _reads_shape_only(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` reads only ``node``'s shape: a shape query, or the template of ``y.reshape_as(node)``."""
    if shape_query(user):
        return True
    as_shape = (user.op == "call_function" and user.target in _AS_SHAPE_OF) or (
        user.op == "call_method" and user.target in ("reshape_as", "view_as", "expand_as"))
    return as_shape and len(user.args) == 2 and user.args[1] is node and user.args[0] is not node


def value_users(node: fx.Node) -> list[fx.Node]:
    """The ops that read ``node``'s values (shape queries and ``reshape_as`` templates left out: any tensor of
    the same shape serves them)."""
    return [u for u in node.users if not _reads_shape_only(u, node)]


def sole_user(node: fx.Node) -> fx.Node | None:
    """The one op reading ``node``, looking through a batch norm that returns a tuple to its item 0."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.target in _BN_TUPLE_TARGETS:
        items = [u for u in user.users if u.target is operator.getitem and u.args[1] == 0]
        return items[0] if len(items) == 1 else None
    return user


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
    if not isinstance(a["input"], fx.Node) or opaque(src) or opaque(node):
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
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"} or opaque(node):
        return None
    if isinstance(node.meta.get("val"), (int, float, torch.SymInt, torch.SymFloat)):
        return None  # arithmetic on sizes, not on tensors
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
        if not algebra.finite(self.scale, self.shift):
            return f"the {self.kind}'s constant is not finite: a fold would turn inf into nan"
        if self.on_dim1:
            if channel_dim != 1 or ndim < 2:
                return f"the {self.kind} normalizes dim 1, and the channels are dim {channel_dim} of {ndim}"
            if self.scale.numel() != channels:
                return f"the {self.kind} has {self.scale.numel()} channels, the tensor {channels}"
            return self.scale, self.shift
        if self.dtype is not None and self.dtype != dtype and self.dtype.is_floating_point:
            return f"the constant's dtype {self.dtype} would change the result's {dtype}"
        why = self._why_reshapes(ndim)
        if why is not None:
            return why
        out = []
        for t in (self.scale, self.shift):
            if t.dim() > ndim:
                return f"the constant of shape {tuple(t.shape)} broadcasts the {ndim}-d tensor up"
            shape = [1] * (ndim - t.dim()) + list(t.shape)
            if any(s != 1 for d, s in enumerate(shape) if d != channel_dim) or shape[channel_dim] not in (1, channels):
                return f"the constant of shape {tuple(t.shape)} is not per-channel along dim {channel_dim}"
            out.append(t.reshape(-1).expand(channels))
        return out[0], out[1]


    def _why_reshapes(self, ndim: int) -> str | None:
        """Why the constant's broadcast changes the input's shape (a rank up, a size-1 dim expanded), which a
        fold that removes this op would lose; ``ndim`` is the rank assumed where capture recorded none."""
        constants = [t for t in (self.scale, self.shift) if t.dim() > 0]
        shape = concrete_shape(self.input)
        if shape is None:
            big = next((t for t in constants if t.dim() >= ndim), None)
            return None if big is None else (
                f"the constant of shape {tuple(big.shape)} would broadcast an unbatched input up a rank, and the "
                "input's rank is unknown (pass example inputs)")
        try:
            out = tuple(torch.broadcast_shapes(shape, *(t.shape for t in constants)))
        except RuntimeError:
            return f"the constant does not broadcast with the input of shape {shape}"
        if out != shape:
            return f"the constant broadcasts the input of shape {list(shape)} to {list(out)}: a fold would lose that"
        return None


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
        mod = _standard_module(gm, node, tuple(_POOL_MODULES))
        dims = _POOL_MODULES.get(type(mod)) if mod is not None else None
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
    if not isinstance(a["input"], fx.Node) or opaque(node):
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


_PADDING_MODES = frozenset({"reflect", "replicate", "circular"})  # F.pad and nn.ConvNd spell them alike
_MODE_PAD_TARGETS: dict[Any, str] = {}
for _mode, _aten in (("reflect", "reflection_pad"), ("replicate", "replication_pad")):
    for _dims in (1, 2, 3):
        _MODE_PAD_TARGETS.update(dict.fromkeys(_overloads(f"{_aten}{_dims}d", "default"), _mode))
_MODE_PAD_TARGETS.update(dict.fromkeys(_overloads("_pad_circular", "default"), "circular"))


def mode_pad(node: fx.Node) -> tuple[fx.Node, tuple[int, ...], str] | None:
    """``(input, pads, padding_mode)`` of a reflect, replicate or circular padding (``F.pad`` order, last dim
    first; the mode as ``nn.ConvNd`` spells it), in any capture form; else ``None``."""
    if node.op != "call_function" or opaque(node):
        return None
    if node.target in _MODE_PAD_TARGETS:
        source, pads, mode = node.args[0], node.args[1] if len(node.args) > 1 else None, _MODE_PAD_TARGETS[node.target]
    elif node.target in _PAD_TARGETS and "mode" in _PAD_TARGETS[node.target]:
        a = _bind(node, _PAD_TARGETS[node.target], {"mode": "constant", "value": None})
        source, pads, mode = a["input"], a["pad"], a["mode"] if a["mode"] in _PADDING_MODES else None
    else:
        return None
    if mode is None or not isinstance(source, fx.Node) or not isinstance(pads, (list, tuple)):
        return None
    if not all(isinstance(p, int) for p in pads):
        return None
    return source, tuple(pads), mode


# ----------------------------------------------------------------------------- channel-wise maps that keep zero


_ELEMENTWISE_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.hardswish, F.mish,
                          torch.tanh, F.tanh, F.dropout}
for _name in ("relu", "relu_", "relu6", "gelu", "silu", "silu_", "leaky_relu", "elu", "hardswish", "mish", "tanh",
              "dropout", "clone", "alias", "detach"):
    _ELEMENTWISE_FUNCTIONS.update(_overloads(_name, "default"))
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Mish, nn.Tanh,
                        nn.Dropout, nn.Identity)
_POOLING_FUNCTIONS: dict[Any, int] = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1,
                                      F.avg_pool2d: 2, F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1,
                                      F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool2d: 2}
for _name, _dims in (("max_pool1d", 1), ("max_pool2d", 2), ("max_pool3d", 3), ("avg_pool1d", 1), ("avg_pool2d", 2),
                     ("avg_pool3d", 3), ("adaptive_avg_pool1d", 1), ("adaptive_avg_pool2d", 2),
                     ("adaptive_avg_pool3d", 3), ("_adaptive_avg_pool2d", 2)):
    _POOLING_FUNCTIONS.update(dict.fromkeys(_overloads(_name, "default"), _dims))
for _name, _dims in (("max_pool2d_with_indices", 2), ("max_pool3d_with_indices", 3)):
    _POOLING_FUNCTIONS.update(dict.fromkeys(_overloads(_name, "default"), _dims))
_POOLING_MODULES: dict[type, int] = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1,
                                     nn.AvgPool2d: 2, nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1,
                                     nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}


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


_FLATTEN = {torch.flatten, *_overloads("flatten", "using_ints")}
_RESHAPE_FUNCTIONS = {torch.reshape, *_overloads("view", "default"), *_overloads("reshape", "default"),
                      *_overloads("_unsafe_view", "default")}


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


_MEAN = {torch.mean, *_overloads("mean", "dim")}
_ADAPTIVE_AVG = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                 *[o for n in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
                               "_adaptive_avg_pool2d") for o in _overloads(n, "default")]}


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


_CAT = {torch.cat, torch.concat, *_overloads("cat", "default")}


def concat(node: fx.Node) -> tuple[list[Any], int] | None:
    """``(tensors, dim)`` of a concatenation ``torch.cat(tensors, dim)``, else ``None``."""
    if node.op != "call_function" or node.target not in _CAT or opaque(node):
        return None
    a = _bind(node, ("tensors", "dim"), {"dim": 0})
    return (list(a["tensors"]), int(a["dim"])) if isinstance(a["tensors"], (list, tuple)) else None


_SLICE = {*_overloads("slice", "Tensor")}
_TO_END = 2**63 - 1  # what ``x[a:]`` records as the end of a slice


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


_FUNCTIONAL_DROPOUT = (("input", "p", "training", "inplace"), {"p": 0.5, "training": True, "inplace": False})
_FUNCTIONAL_ALPHA_DROPOUT = (_FUNCTIONAL_DROPOUT[0], {**_FUNCTIONAL_DROPOUT[1], "training": False})  # their default
_ATEN_DROPOUT = (("input", "p", "train"), {})
_DROPOUT_FUNCTIONS: dict[Any, tuple[tuple[str, ...], dict[str, Any]]] = {
    **dict.fromkeys((F.dropout, F.dropout1d, F.dropout2d, F.dropout3d), _FUNCTIONAL_DROPOUT),
    **dict.fromkeys((F.alpha_dropout, F.feature_alpha_dropout), _FUNCTIONAL_ALPHA_DROPOUT),
    **dict.fromkeys((torch.dropout, torch.feature_dropout, torch.alpha_dropout, torch.feature_alpha_dropout),
                    _ATEN_DROPOUT),
}
for _name in ("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"):
    _DROPOUT_FUNCTIONS.update(dict.fromkeys(_overloads(_name, "default"), _ATEN_DROPOUT))
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


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

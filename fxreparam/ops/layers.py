"""Layer recognizers: conv, linear, batch norm, elementwise arithmetic, per-channel affine maps, pooling, padding.

Each takes a node in any capture form (module call, torch function, aten overload; see :mod:`.targets`)
and returns one normalized description (``spec.Layer``, :class:`BatchNorm`, :class:`ChannelAffine`, ...)
or ``None``; passes are written against these descriptions only.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .. import algebra
from ..meta import concrete_shape, export_value, module_path
from ..spec import ConvSpec, Layer, LinearSpec
from .targets import (
    _BINARY_METHODS,
    _BINARY_OPS,
    _BN_TARGETS,
    _BN_TUPLE_TARGETS,
    _CAT,
    _CONV_MODULES,
    _CONV_TARGETS,
    _INPLACE_METHODS,
    _INPLACE_OPS,
    _LINEAR_TARGETS,
    _MODE_PAD_TARGETS,
    _PAD_TARGETS,
    _PADDING_MODES,
    _POOL_ARGS,
    _POOL_MODULES,
    _POOL_TARGETS,
    _bind,
    _standard_module,
    _tuple,
    constant,
    opaque,
)

# ----------------------------------------------------------------------------- conv and linear


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
    if isinstance(export_value(node), (int, float, torch.SymInt, torch.SymFloat)):
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


def constant_pad(node: fx.Node) -> Pad | None:
    """Recognize a constant (zero or scalar) padding; other modes are not recognized."""
    if node.op != "call_function" or node.target not in _PAD_TARGETS:
        return None
    a = _bind(node, _PAD_TARGETS[node.target], {"mode": "constant", "value": None})
    if a["mode"] != "constant" or not isinstance(a["input"], fx.Node) or isinstance(a["value"], fx.Node):
        return None
    return Pad(node, a["input"], tuple(int(p) for p in a["pad"]), float(a["value"] or 0.0))


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


def concat(node: fx.Node) -> tuple[list[Any], int] | None:
    """``(tensors, dim)`` of a concatenation ``torch.cat(tensors, dim)``, else ``None``."""
    if node.op != "call_function" or node.target not in _CAT or opaque(node):
        return None
    a = _bind(node, ("tensors", "dim"), {"dim": 0})
    return (list(a["tensors"]), int(a["dim"])) if isinstance(a["tensors"], (list, tuple)) else None

"""Op tables: which torch functions, aten overloads and module types mean what, and how their arguments bind.

A graph from ``torch.fx.symbolic_trace`` calls modules, a Dynamo graph calls torch functions and a
``torch.export`` graph calls aten overloads; every table here maps all three spellings of one op to its
argument names and defaults, so the recognizers in :mod:`.layers`, :mod:`.flow` and :mod:`.uses` read
them alike. :func:`constant` and :func:`opaque` are the two questions every recognizer asks first.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..meta import fetch_attr, marked_opaque, written

aten = torch.ops.aten


# ----------------------------------------------------------------------------- helpers


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
        if arg.op == "get_attr" and not written(arg):
            value = fetch_attr(gm, arg.target)
            return value if isinstance(value, torch.Tensor) else None
        return None
    if isinstance(arg, bool) or not isinstance(arg, (int, float)):
        return None
    return torch.tensor(float(arg), dtype=torch.float64)


def opaque(node: fx.Node) -> str | None:
    """Why ``node`` must be kept as it is (capture marked it, or its value may be written in place), or None."""
    return marked_opaque(node) or written(node)


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


_LINEAR_TARGETS = {F.linear, *_overloads("linear", "default")}


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


_SHAPE_QUERIES = {*_overloads("sym_size", "int", "default"), *_overloads("sym_numel", "default"),
                  *_overloads("sym_stride", "int", "default"), *_overloads("size", "default", "int")}


_AS_SHAPE_OF = {*_overloads("reshape_as", "default"), *_overloads("view_as", "default"),
                *_overloads("expand_as", "default")}


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


_POOL_ARGS = (("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
              {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None})
_POOL_TARGETS: dict[Any, int] = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
for _dims in (1, 2, 3):
    for _t in _overloads(f"avg_pool{_dims}d", "default"):
        _POOL_TARGETS[_t] = _dims
_POOL_MODULES = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}


_PAD_TARGETS = {F.pad: ("input", "pad", "mode", "value"), torch.constant_pad_nd: ("input", "pad", "value")}
for _t in _overloads("pad", "default"):
    _PAD_TARGETS[_t] = ("input", "pad", "mode", "value")
for _t in _overloads("constant_pad_nd", "default"):
    _PAD_TARGETS[_t] = ("input", "pad", "value")


_PADDING_MODES = frozenset({"reflect", "replicate", "circular"})  # F.pad and nn.ConvNd spell them alike
_MODE_PAD_TARGETS: dict[Any, str] = {}
for _mode, _aten in (("reflect", "reflection_pad"), ("replicate", "replication_pad")):
    for _dims in (1, 2, 3):
        _MODE_PAD_TARGETS.update(dict.fromkeys(_overloads(f"{_aten}{_dims}d", "default"), _mode))
_MODE_PAD_TARGETS.update(dict.fromkeys(_overloads("_pad_circular", "default"), "circular"))


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


_FLATTEN = {torch.flatten, *_overloads("flatten", "using_ints")}
_RESHAPE_FUNCTIONS = {torch.reshape, *_overloads("view", "default"), *_overloads("reshape", "default"),
                      *_overloads("_unsafe_view", "default")}


_MEAN = {torch.mean, *_overloads("mean", "dim")}
_ADAPTIVE_AVG = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                 *[o for n in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
                               "_adaptive_avg_pool2d") for o in _overloads(n, "default")]}


_CAT = {torch.cat, torch.concat, *_overloads("cat", "default")}


_SLICE = {*_overloads("slice", "Tensor")}
_TO_END = 2**63 - 1  # what ``x[a:]`` records as the end of a slice


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

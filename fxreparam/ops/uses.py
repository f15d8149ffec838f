"""Uses: who reads a node and how (its values, its shape only, as a kernel), and what kind of work a node is.

:func:`value_users` decides whether a rewrite may drop or replace a value; :func:`op_kind` names the work
an op does whatever its weights are, for counting.
"""

from __future__ import annotations

import operator

from torch import fx, nn

from ..meta import fetch_attr
from .layers import binary
from .targets import (
    _AS_SHAPE_OF,
    _BN_TARGETS,
    _BN_TUPLE_TARGETS,
    _CONV_MODULES,
    _CONV_TARGETS,
    _LINEAR_TARGETS,
    _SHAPE_QUERIES,
    _bind,
    _tuple,
)


def shape_query(node: fx.Node) -> bool:
    """Whether ``node`` reads only the shape of its input (``x.size(0)``, ``aten.sym_size``), not its values."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and (node.target in _SHAPE_QUERIES or (
        node.target is getattr and len(node.args) > 1 and node.args[1] in ("shape", "ndim")))


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


def reads_as_kernel(user: fx.Node, value: fx.Node) -> bool:
    """Whether ``user`` is a conv or linear op that reads ``value`` as its weight or bias only (not as its input)."""
    if user.op != "call_function" or (user.target not in _CONV_TARGETS and user.target not in _LINEAR_TARGETS):
        return False
    names = _CONV_TARGETS[user.target][0] if user.target in _CONV_TARGETS else ("input", "weight", "bias")
    a = _bind(user, names, {})
    return a.get("input") is not value and value in (a.get("weight"), a.get("bias"))


def computed_kernel_conv(user: fx.Node, kernel: fx.Node, dims: int) -> tuple[fx.Node, tuple[int, ...], int] | None:
    """``(input, stride, groups)`` of ``user`` where it is a plain (not transposed) ``dims``-d conv reading
    ``kernel``, a value computed in the graph, as its weight: what ``ops.conv`` reads of a conv whose weight is
    not stored yet."""
    if user.op != "call_function" or user.target not in _CONV_TARGETS:
        return None
    names, defaults, transposed = _CONV_TARGETS[user.target]
    a = _bind(user, names, defaults)
    if a.get("weight") is not kernel or not isinstance(a.get("input"), fx.Node) or transposed is not False:
        return None
    return a["input"], _tuple(a["stride"], dims), int(a["groups"])


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

"""Effects and aliasing in graphs that are not functional (``symbolic_trace`` captures).

A ``torch.export`` capture is functionalized: writes are explicit data flow and nothing here
applies. A ``symbolic_trace`` graph keeps ``x.add_(1)``, ``x[..., 0] = 0`` and
``x.narrow(1, 0, 1).zero_()``, and a write through a view changes every tensor sharing its
storage. :func:`mark_written` flags every value that may be written in place, directly or
through an alias, and the recognizers then leave ops reading it alone. The analysis is
conservative: an op not known to return a fresh tensor is assumed to return a view of its input.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .meta import WRITTEN, module_path, set_written

# WRITTEN is meta.WRITTEN, kept importable here for the passes that still read the key by name.
__all__ = ["WRITTEN", "eliminate_dead_code", "erase_dead", "mark_written", "mutates_first_arg", "removable"]

_FRESH_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.GELU,
                  nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softmax,
                  nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                  nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
_FRESH_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub,
                    torch.mul, torch.div, torch.cat, torch.stack, torch.relu, torch.sigmoid, torch.tanh, torch.conv1d,
                    torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d, F.linear, F.batch_norm, F.relu,
                    F.relu6, F.gelu, F.silu, F.softmax, F.pad, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                    torch.zeros_like, torch.ones_like, torch.clone, torch.mean, torch.sum}
_FRESH_METHODS = {"add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "clone", "mean", "sum", "softmax", "pow",
                  "neg", "abs", "exp", "sqrt", "__add__", "__mul__", "__sub__", "__truediv__"}


def mutates_first_arg(node: fx.Node) -> bool:
    """Whether ``node`` writes into its first argument: ``relu(x, inplace=True)``, ``x.add_(y)``, ``x += y``,
    ``x[i] = v``, ``nn.ReLU(inplace=True)``, ``aten.relu_``. fx's own dead-code check misses most of these."""
    if node.op == "call_module":
        return bool(getattr(node.graph.owning_module.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("__")
    if node.op != "call_function":
        return False
    if node.kwargs.get("inplace") is True or node.target is operator.setitem:
        return True
    if node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.startswith("__")


def _fresh(node: fx.Node) -> bool:
    """Whether ``node`` returns a new tensor of the forward's own, never a view of an input."""
    if mutates_first_arg(node):
        return False
    if node.op == "call_module":
        return isinstance(node.graph.owning_module.get_submodule(str(node.target)), _FRESH_MODULES)
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    if node.op != "call_function":
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return not any(r.alias_info for r in schema.returns)
    return node.target in _FRESH_FUNCTIONS


def removable(node: fx.Node) -> bool:
    """Free of effects once unread: pure, or writing only into a fresh tensor that nothing else reads
    (``out += y`` on a fresh ``out``)."""
    if node.op in ("placeholder", "output"):
        return False
    if mutates_first_arg(node):
        first = node.args[0] if node.args else None
        return isinstance(first, fx.Node) and set(first.users) == {node} and _fresh(first)
    return not node.is_impure()


def _benign(write: fx.Node) -> bool:
    """A write into a fresh tensor that only the writer reads: the same as an out-of-place op."""
    first = write.args[0] if write.args else None
    return isinstance(first, fx.Node) and set(first.users) == {write} and _fresh(first)


def mark_written(gm: fx.GraphModule) -> list[tuple[fx.Node, str]]:
    """Flag (:func:`fxreparam.meta.set_written`) every value that may be written in place, itself or through
    a tensor sharing its storage; returns each tensor written, with why. Linear in graph size (union-find)."""
    parent: dict[fx.Node, fx.Node] = {}

    def find(n: fx.Node) -> fx.Node:
        root = n
        while parent.get(root, root) is not root:
            root = parent[root]
        while parent.get(n, n) is not root:
            parent[n], n = root, parent[n]
        return root

    writes: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if mutates_first_arg(node):
            if not _benign(node):
                writes.append(node)
        elif _fresh(node):
            continue
        first = next((a for a in node.args if isinstance(a, fx.Node)), None)
        if first is not None:  # the result may share storage with its first tensor argument
            parent[find(node)] = find(first)
    written = {find(w.args[0]) for w in writes if w.args and isinstance(w.args[0], fx.Node)}
    if not written:
        return []
    by_class: dict[fx.Node, fx.Node] = {find(w.args[0]): w for w in writes if isinstance(w.args[0], fx.Node)}
    for node in gm.graph.nodes:
        root = find(node)
        if root in written:
            writer = by_class[root]
            set_written(node, f"{node.name} may be written in place by {writer.name} ('{module_path(writer)}'), "
                                 "directly or through a view")
    return [(w.args[0], f"{w.args[0].name} is written in place by {w.name} ('{module_path(w)}'), directly or "
                        "through a view: folds that read it are blocked (pass example inputs: torch.export captures "
                        "a functional graph)") for w in writes if isinstance(w.args[0], fx.Node)]


def eliminate_dead_code(graph: fx.Graph) -> int:
    """Erase the nodes nothing reads and that have no effect, last to first; returns how many went."""
    erased = 0
    for node in reversed(list(graph.nodes)):
        if not node.users and removable(node):
            graph.erase_node(node)
            erased += 1
    return erased


def erase_dead(node: fx.Node) -> int:
    """Erase ``node`` if nothing reads it, then its producers that become unread; returns how many went."""
    gone: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in gone or n.users or not removable(n):
            continue
        inputs = n.all_input_nodes
        n.graph.erase_node(n)
        gone.add(n)
        stack.extend(inputs)
    return len(gone)

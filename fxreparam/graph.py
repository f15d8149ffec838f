"""Graph surgery shared by every pass: build a module for a folded kernel, splice it in, drop the dead.

Passes never mutate a tensor or module that is already in the graph (a module
called twice, or a weight shared by two branches, must keep serving its other
users); they emit a fresh module and rewire the consumers to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

from . import algebra
from .ops import Conv, Linear, binary, module_path, op_kind

__all__ = ["build_module", "call_module", "emit", "erase_dead", "insert_layer", "live_nodes", "replace"]

_CONV_CLASSES = {
    (1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
    (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d,
}
FOLDED_PREFIX = "_fxreparam_"


def build_module(spec: Conv | Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A plain ``nn.ConvNd``/``nn.ConvTransposeNd``/``nn.Linear`` holding ``weight`` and ``bias`` (no init work)."""
    like = spec.weight  # the model's dtype and device
    kw: dict[str, Any] = {"bias": bias is not None, "device": like.device, "dtype": like.dtype}
    if isinstance(spec, Linear):
        mod = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], **kw)
    else:
        cls = _CONV_CLASSES[(weight.dim() - 2, spec.transposed)]
        extra = {"output_padding": spec.output_padding} if spec.transposed else {"padding_mode": spec.padding_mode}
        out_ch = weight.shape[1] * spec.groups if spec.transposed else weight.shape[0]
        in_ch = weight.shape[0] if spec.transposed else weight.shape[1] * spec.groups
        mod = nn.utils.skip_init(cls, in_ch, out_ch, tuple(weight.shape[2:]), stride=spec.stride,
                                 padding=spec.padding, dilation=spec.dilation, groups=spec.groups, **extra, **kw)
    mod.weight = nn.Parameter(algebra.cast_like(weight, like), requires_grad=like.requires_grad)
    if bias is not None:
        mod.bias = nn.Parameter(algebra.cast_like(bias, like), requires_grad=like.requires_grad)
    return mod


def _fresh_name(gm: fx.GraphModule) -> str:
    counter = getattr(gm, "_fxreparam_counter", 0)
    while hasattr(gm, f"{FOLDED_PREFIX}{counter}"):
        counter += 1
    gm._fxreparam_counter = counter + 1
    return f"{FOLDED_PREFIX}{counter}"


def insert_layer(gm: fx.GraphModule, spec: Conv | Linear, weight: torch.Tensor, bias: torch.Tensor | None,
                 input: fx.Node, *, before: fx.Node, name: str | None = None) -> fx.Node:
    """A new layer like ``spec`` with the given kernel, reading ``input``, placed just before ``before``.

    It carries ``before``'s metadata and the path ``name`` (default: ``spec``'s) for the final module tree.
    """
    target = _shared_target(gm, spec, weight, bias)
    path = name or spec.name or module_path(spec.node)
    with gm.graph.inserting_before(before):
        new = call_module(gm.graph, target, input, path)
    new.meta.update(before.meta)
    new.meta["fxreparam_path"] = path
    return new


def emit(gm: fx.GraphModule, spec: Conv | Linear, weight: torch.Tensor, bias: torch.Tensor | None,
         input: fx.Node, replaces: fx.Node, *, at: fx.Node | None = None, name: str | None = None) -> fx.Node:
    """Replace ``replaces`` by a new layer like ``spec`` with the given kernel, reading ``input``.

    The new layer goes where the folded pattern first read ``input`` (``at``, default ``replaces``), so it
    reads the same value even where a later op writes into ``input`` in place.
    """
    new = insert_layer(gm, spec, weight, bias, input, before=at or replaces, name=name)
    replace(replaces, new)
    return new


def _shared_target(gm: fx.GraphModule, spec: Conv | Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """The submodule holding this kernel: an equal one emitted before (a module called twice folds the same
    way at each call) is reused, so folding never stores a kernel twice."""
    mod = build_module(spec, weight, bias)
    hyper = repr(mod)  # class and every hyperparameter
    bias_sum = None if bias is None else float(mod.bias.double().sum())
    key = (hyper, str(mod.weight.dtype), str(mod.weight.device), float(mod.weight.double().sum()), bias_sum)
    emitted: dict[tuple, list[str]] = gm.__dict__.setdefault("_fxreparam_emitted", {})
    for target in emitted.get(key, []):
        other = getattr(gm, target, None)
        if other is not None and torch.equal(other.weight, mod.weight) and (
            bias is None or torch.equal(other.bias, mod.bias)
        ):
            return target
    target = _fresh_name(gm)
    gm.add_submodule(target, mod)
    emitted.setdefault(key, []).append(target)
    return target


def call_module(graph: fx.Graph, target: str, input: fx.Node, path: str) -> fx.Node:
    """A ``call_module`` node on ``input`` named after the model path it stands for (``layer1_0_conv1``)."""
    return graph.create_node("call_module", target, (input,), name=path.replace(".", "_") or None)


def live_nodes(graph: fx.Graph) -> Iterator[fx.Node]:
    """The graph's nodes in order, skipping any that a rewrite erased while the sweep was under way."""
    for node in list(graph.nodes):
        if not getattr(node, "_erased", False):
            yield node


def replace(old: fx.Node, new: fx.Node) -> None:
    """Point every consumer of ``old`` at ``new`` and erase what is left without consumers."""
    old.replace_all_uses_with(new)
    erase_dead(old)


def _mutates_first_arg(node: fx.Node) -> bool:
    """Whether ``node`` writes into its first argument: ``relu(x, inplace=True)``, ``x.add_(y)``, ``x += y``,
    ``nn.ReLU(inplace=True)``, ``aten.relu_``. fx's own dead-code check misses most of these forms."""
    if node.op == "call_module":
        return bool(getattr(node.graph.owning_module.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("__")
    if node.op != "call_function":
        return False
    if node.kwargs.get("inplace") is True:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    name = getattr(node.target, "__name__", "")
    return (name.endswith("_") and not name.startswith("__")) or (binary(node) is not None and binary(node).inplace)


def written_in_place(node: fx.Node) -> bool:
    """Whether some op writes into ``node``'s tensor: then reading it earlier and later gives different values."""
    return any(u.args and u.args[0] is node and _mutates_first_arg(u) for u in node.users)


def _fresh(node: fx.Node) -> bool:
    """Whether ``node`` is a new tensor of the forward's own (not an input, a stored tensor or a view of one),
    so that writing into it is seen by its readers alone."""
    if node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if schema is not None:
            return not schema.is_mutable and not any(r.alias_info for r in schema.returns)
    b = binary(node)
    if b is not None:
        return not b.inplace
    gm = node.graph.owning_module
    return gm is not None and op_kind(gm, node) in ("conv", "linear", "batch_norm")


def _removable(node: fx.Node) -> bool:
    """Free of effects once unread: pure, or writing only into a fresh tensor that nothing else reads
    (``out += y`` on a fresh ``out``)."""
    if node.op in ("placeholder", "output"):
        return False
    if _mutates_first_arg(node):
        first = node.args[0] if node.args else None
        return isinstance(first, fx.Node) and set(first.users) == {node} and _fresh(first)
    return not node.is_impure()


def eliminate_dead_code(graph: fx.Graph) -> int:
    """Erase the nodes nothing reads and that have no effect, last to first; returns how many went."""
    erased = 0
    for node in reversed(list(graph.nodes)):
        if not node.users and _removable(node):
            graph.erase_node(node)
            erased += 1
    return erased


def erase_dead(node: fx.Node) -> int:
    """Erase ``node`` if nothing reads it, then its producers that become unread; returns how many went."""
    gone: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in gone or n.users or not _removable(n):
            continue
        inputs = n.all_input_nodes
        n.graph.erase_node(n)
        gone.add(n)
        stack.extend(inputs)
    return len(gone)

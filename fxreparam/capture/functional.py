"""Functionalization, for both ways into the engine. An exported program's graph (:func:`_to_graph`): in-place
writes become out-of-place ops (directly where the written tensor is one the forward made, or a select/slice/diagonal
view of one; else through ``run_decompositions``, which traces the whole program again), metadata asserts go. A graph
Dynamo captured for the ``"fxreparam"`` backend (:func:`functionalize_traced`): ``torch.func.functionalize`` and a
re-trace with ``make_fx``, on the region's inputs or, under symbolic sizes, on the fake tensors Dynamo traced with."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from ..meta import dynamo_value
from .guard import GUARD, _flatten_by_spec, guarded_module

__all__ = ["functionalize_traced"]

log = logging.getLogger("fxreparam")


def _strip_metadata_asserts(gm: fx.GraphModule) -> bool:
    """Remove ``aten._assert_tensor_metadata``: dtype/device checks left by ``.float()``/``.to()`` in forward
    that would reject a float64 copy of the graph (they assert, they compute nothing); whether there were any."""
    target = getattr(getattr(torch.ops.aten, "_assert_tensor_metadata", None), "default", None)
    found = [n for n in gm.graph.nodes if n.op == "call_function" and target is not None and n.target == target
             and not n.users]
    for node in found:
        gm.graph.erase_node(node)
    return bool(found)


def _out_of_place(target: Any) -> Any:
    """The out-of-place twin of an aten op that writes only into its first argument (``relu_`` -> ``relu``)."""
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.is_mutable or not schema.arguments:
        return None
    first, *rest = schema.arguments
    if first.alias_info is None or not first.alias_info.is_write or any(
            a.alias_info is not None and a.alias_info.is_write for a in rest):
        return None
    name = schema.name.split("::")[-1]
    if not name.endswith("_") or name.endswith("__"):
        return None
    return getattr(getattr(torch.ops.aten, name[:-1], None), target._overloadname, None)


def _schema(node: fx.Node) -> Any:
    return getattr(node.target, "_schema", None) if node.op == "call_function" else None


def _fresh(node: fx.Node) -> bool:
    """A tensor the forward made itself: no input, no stored tensor, no view of another."""
    schema = _schema(node)
    return schema is not None and not schema.is_mutable and not any(r.alias_info for r in schema.returns)


def _view(node: fx.Node) -> bool | None:
    """Whether ``node`` is a view of its first argument: True (one tensor), None (a list: ``split``), else False."""
    schema = _schema(node)
    if schema is None or schema.is_mutable or not any(r.alias_info for r in schema.returns):
        return False
    single = len(schema.returns) == 1 and isinstance(schema.returns[0].type, torch.TensorType)
    return True if single else None


_SCATTERS = {"select.int": "select_scatter", "slice.Tensor": "slice_scatter", "diagonal.default": "diagonal_scatter"}


def _scatter(target: Any) -> Any:
    """The op that writes a :data:`_SCATTERS` view back into its base (``select`` -> ``select_scatter``)."""
    name = _SCATTERS.get(f"{target._schema.name.split('::')[-1]}.{target._overloadname or 'default'}")
    return None if name is None else getattr(torch.ops.aten, name).default


class _Writes:
    """The state of :func:`_rewrite_in_place`'s walk: per fresh tensor its current value, per view its base and the
    chain of views from it, so a read after a write reads the written value (views made again where stale)."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self.current: dict[fx.Node, fx.Node] = {}  # fresh tensor -> the node holding its value now
        self.version: dict[fx.Node, int] = {}
        self.views: dict[fx.Node, tuple[fx.Node, list[fx.Node], int]] = {}  # view -> base, chain, base's version
        self.alias: dict[fx.Node, fx.Node] = {}  # an in-place op's result -> the tensor it wrote
        self.remade: dict[tuple[fx.Node, int], fx.Node] = {}

    def _call(self, target: Any, args: tuple, kwargs: dict, like: fx.Node) -> fx.Node:
        new = self.graph.call_function(target, args, kwargs)
        new.meta.update(like.meta)
        return new

    def value(self, node: Any) -> Any:
        """The node that holds ``node``'s value at this point of the walk (inserted before the current node)."""
        if not isinstance(node, fx.Node):
            return node
        node = self.alias.get(node, node)
        if node in self.current:
            return self.current[node]
        if node not in self.views:
            return node
        base, chain, version = self.views[node]
        if self.version[base] == version:
            return node
        key = (node, self.version[base])
        if key not in self.remade:
            value = self.current[base]
            for view in chain:
                value = self._call(view.target, (value, *view.args[1:]), view.kwargs, view)
            self.remade[key] = value
        return self.remade[key]

    def see(self, node: fx.Node) -> bool:
        """Read ``node``'s inputs at their current values and track it; False where its writes or views are not
        ones this walk can express (the caller functionalizes the program for real)."""
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        source = self.alias.get(first, first) if first is not None else None  # as written, before reading it now
        tracked = source is not None and (source in self.current or source in self.views)
        with self.graph.inserting_before(node):
            node.args = fx.node.map_arg(node.args, self.value)
            node.kwargs = fx.node.map_arg(node.kwargs, self.value)
            if _fresh(node):
                self.current[node], self.version[node] = node, 0
                return True
            is_view = _view(node)
            if is_view and tracked:
                base, chain = (source, []) if source in self.current else self.views[source][:2]
                self.views[node] = (base, [*chain, node], self.version[base])
                return True
            if is_view is None and tracked:
                return False  # a list of views (split, unbind)
            schema = _schema(node)
            if schema is None or not schema.is_mutable:
                return True
            return tracked and self._write(node, source)

    def _write(self, node: fx.Node, written: fx.Node) -> bool:
        """Express the in-place ``node`` (into ``written``, a fresh tensor or a view of one) out of place."""
        pure = _out_of_place(node.target)
        if pure is None:
            return False
        base, chain = (written, []) if written in self.current else self.views[written][:2]
        scatters = [_scatter(view.target) for view in chain]
        if any(s is None for s in scatters):
            return False
        values = [self.current[base]]
        for view in chain:  # the view as it reads now (its node may predate an earlier write)
            values.append(self._call(view.target, (values[-1], *view.args[1:]), view.kwargs, view))
        new = self._call(pure, (values[-1], *node.args[1:]), node.kwargs, node)
        for view, scatter, under in reversed(list(zip(chain, scatters, values))):
            new = self._call(scatter, (under, new, *view.args[1:]), view.kwargs, under)
        self.current[base] = new
        self.version[base] += 1
        self.alias[node] = written
        return True


def _rewrite_in_place(gm: fx.GraphModule) -> bool | None:
    """Turn each in-place write into a tensor the forward made (``relu_`` after a conv) or into a ``select``,
    ``slice`` or ``diagonal`` view of one (``mask[:, 0, 1] = 2``) into its out-of-place twin and scatters back
    into the base, later readers reading the result: functionalization without re-tracing the program.

    Returns False where a write is left for the caller to functionalize for real (a write into an input or a
    buffer, through another kind of view), else whether anything changed."""
    walk = _Writes(gm.graph)
    nodes = list(gm.graph.nodes)
    for node in nodes:
        if not walk.see(node):
            return False
    if not walk.alias:
        return None
    for node in reversed(nodes):
        if node in walk.alias or (node in walk.views and not node.users):
            if node.users:
                return False
            gm.graph.erase_node(node)
    return True


def _functional_module(program: Any, shapes: list[tuple[int, ...] | None] | None) -> fx.GraphModule:
    """The guarded graph module of ``program`` with no in-place write left: rewritten directly where every
    write is into a tensor nothing aliases (most models), else through ``run_decompositions`` (slower: it
    traces the program again)."""
    gm = guarded_module(program, shapes)
    changed = _strip_metadata_asserts(gm)
    rewritten = _rewrite_in_place(gm)
    if rewritten is False:
        gm = guarded_module(program.run_decompositions({}), shapes)
        changed = _strip_metadata_asserts(gm)
    if changed or rewritten:  # guarded_module compiled it already: once more only where the graph changed
        gm.recompile()
    return gm


def _to_graph(program: Any, args: tuple, kwargs: dict) -> tuple[fx.GraphModule, list, list, list]:
    """The functional, guarded graph module of an exported program, and per flat user input (in
    ``pytree.tree_leaves((args, kwargs))`` order): example shape, dynamic dims, name."""
    leaves, user_spec = pytree.tree_flatten((args, kwargs))
    shapes: list[tuple[int, ...] | None] = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in leaves]
    # Which user input each placeholder is: flatten the inputs' positions the way the program does.
    index_args, index_kwargs = pytree.tree_unflatten(list(range(len(leaves))), user_spec)
    order = _flatten_by_spec(index_args, index_kwargs, program.call_spec.in_spec)
    gm = _functional_module(program, [shapes[i] for i in order] if len(order) == len(leaves) else None)
    guard = getattr(gm, GUARD)
    dynamic: list[dict[int, tuple[int, int | None]]] = [{} for _ in leaves]
    names = [f"input {i}" for i in range(len(leaves))]
    if len(order) == len(guard.names):
        for i, name, dims in zip(order, guard.names, guard.dynamic):
            names[i], dynamic[i] = name, dims
    return gm, shapes, dynamic, names


def functionalize_traced(gm: fx.GraphModule, placeholders: list[fx.Node], inputs: Sequence[Any], *,
                         writes: Callable[[fx.GraphModule], Any]) -> tuple[fx.GraphModule, bool]:
    """``gm`` (a graph Dynamo captured) with its in-place writes turned into data flow, and whether it changed.

    Dynamo's graphs keep ``x += y`` and ``relu_``, which block every fold that reads the written value; a write into
    an input becomes one copy into it at the end. ``writes`` flags the values ``gm`` writes in place and returns them
    (``mutation.mark_written``, passed in: it lies a layer above capture); ``gm`` itself comes back where it writes
    nothing, or where functionalization fails (logged: the folds that read the writes are then refused and reported).
    Traced on real copies of ``inputs``, or, where ``placeholders`` were traced with symbolic sizes, on the tensors
    Dynamo traced with, so the result keeps the symbolic shapes.
    """
    if not writes(gm):
        return gm, False
    from torch.fx.experimental.proxy_tensor import make_fx

    fn = torch.func.functionalize(gm, remove="mutations_and_views")
    try:
        with torch.no_grad():
            if all(isinstance(x, torch.Tensor) for x in inputs) and not _symbolic(placeholders):
                return make_fx(fn)(*[x.detach().clone() for x in inputs]), True
            return _symbolic_trace(fn, [dynamo_value(p) for p in placeholders]), True
    except Exception as err:  # leave the writes in place: the folds that read them are refused and reported
        log.info("fxreparam backend: region not functionalized (%s: %s)", type(err).__name__, err)
        return gm, False


def _symbolic(placeholders: list[fx.Node]) -> bool:
    """Whether Dynamo traced any of these inputs with a symbolic size."""
    return any(isinstance(n, torch.SymInt) for p in placeholders for n in getattr(dynamo_value(p), "shape", ()))


def _symbolic_trace(fn: Callable[..., Any], fakes: list[Any]) -> fx.GraphModule:
    """``fn`` traced on the tensors Dynamo traced with, in its fake mode: the graph keeps the symbolic sizes."""
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import make_fx

    mode = detect_fake_mode(fakes)
    allowed, mode.allow_non_fake_inputs = mode.allow_non_fake_inputs, True  # the frozen weights are real tensors
    try:
        return make_fx(fn, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*fakes)
    finally:
        mode.allow_non_fake_inputs = allowed

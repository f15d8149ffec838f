"""Functionalization of an exported program's graph: in-place writes become out-of-place ops (directly where
nothing aliases the written tensor, else through ``run_decompositions``), metadata asserts go."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .guard import GUARD, _flatten_by_spec, guarded_module


def _strip_metadata_asserts(gm: fx.GraphModule) -> None:
    """Remove ``aten._assert_tensor_metadata``: dtype/device checks left by ``.float()``/``.to()`` in forward
    that would reject a float64 copy of the graph (they assert, they compute nothing)."""
    target = getattr(getattr(torch.ops.aten, "_assert_tensor_metadata", None), "default", None)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and target is not None and node.target == target and not node.users:
            gm.graph.erase_node(node)


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


def _fresh_unaliased(node: Any, writer: fx.Node) -> bool:
    """A tensor the forward made itself (no input, no stored tensor, no view) that nothing but ``writer``
    reads through an alias (a view, or another in-place op)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is None or schema.is_mutable or any(r.alias_info for r in schema.returns):
        return False
    return all(u is writer or u.op == "output" or not any(
        r.alias_info for r in getattr(getattr(u.target, "_schema", None), "returns", ())) for u in node.users)


def _rewrite_in_place(gm: fx.GraphModule) -> bool:
    """Turn each in-place write into a tensor nothing else aliases (``relu_`` after a conv) into its out-of-place
    twin, later readers reading the result: functionalization for the common case, without re-tracing.

    Returns whether no write is left; where one is (a write through a view, into an input), the caller
    functionalizes the program for real."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not getattr(getattr(node.target, "_schema", None), "is_mutable", False):
            continue
        pure, written = _out_of_place(node.target), node.args[0] if node.args else None
        if pure is None or not _fresh_unaliased(written, node):
            return False
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(pure, node.args, node.kwargs)
        new.meta.update(node.meta)
        order[new] = order[node]
        for user in list(written.users):  # later readers see the written value
            if user is not node and order[user] > order[node]:
                user.replace_input_with(written, new)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    return True


def _functional_module(program: Any, shapes: list[tuple[int, ...] | None] | None) -> fx.GraphModule:
    """The guarded graph module of ``program`` with no in-place write left: rewritten directly where every
    write is into a tensor nothing aliases (most models), else through ``run_decompositions`` (slower: it
    traces the program again)."""
    gm = guarded_module(program, shapes)
    _strip_metadata_asserts(gm)
    if not _rewrite_in_place(gm):
        gm = guarded_module(program.run_decompositions({}), shapes)
        _strip_metadata_asserts(gm)
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

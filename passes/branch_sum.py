"""``branch_sum`` and ``identity``: parallel branches that read one tensor and are summed, as one conv.

RepVGG (3x3-BN + 1x1-BN + BN), ACNet (3x3 + 1x3 + 3x1), MobileOne (k convs + 1x1 + BN) and
DBB's final sum are add/sub trees whose terms are convs of the same input; REPARAM §3-4 gives
when their kernels add up exactly. ``branch_sum`` merges the conv, BN and avg-pool terms;
``identity`` then folds bare ``x`` terms (``x + f(x)``) as Dirac kernels.
"""

from __future__ import annotations

import operator
from typing import Any

from torch import fx

from fxreparam import branches, ops
from fxreparam.graph import insert_layer, live_nodes, replace, written_in_place
from fxreparam.registry import PassContext, register_pass


def _read_terms(ctx: PassContext, terms: list[tuple[Any, float]], with_identity: bool
                ) -> tuple[dict[fx.Node, list[tuple[int, branches.Branch, bool]]], dict[fx.Node, list[str]]]:
    """Each term as a branch, grouped by the tensor it reads; and why some terms could not join a group."""
    groups: dict[fx.Node, list[tuple[int, branches.Branch, bool]]] = {}
    blocked: dict[fx.Node, list[str]] = {}
    for i, (term, coef) in enumerate(terms):
        if not isinstance(term, fx.Node):
            continue  # a constant term stays as it is
        branch = branches.as_branch(ctx.gm, term)
        if branch is not None and len(term.users) > 1:
            blocked.setdefault(branch.input, []).append(f"{branch.label}: its output has another consumer")
            branch = None
        is_identity = branch is None
        if is_identity:
            like = ops.like(term)
            branch = branches.identity_branch(term, like) if with_identity and like is not None else None
        if branch is not None:
            groups.setdefault(branch.input, []).append((i, branch.scaled(coef), is_identity))
    return groups, blocked


def _position(node: fx.Node) -> int:
    """A node's place in its graph (fx keeps a per-node sort key in recent versions; counted otherwise)."""
    key = getattr(node, "_sort_key", None)
    if key is not None:
        return key
    return next(i for i, n in enumerate(node.graph.nodes) if n is node)


def _build_sum(graph: fx.Graph, parts: list[tuple[Any, float]], before: fx.Node) -> fx.Node:
    """``sum(coef * term)`` as add/sub/mul nodes placed before ``before``; the first part has coef 1."""
    with graph.inserting_before(before):
        acc = parts[0][0]
        for term, coef in parts[1:]:
            op = operator.sub if coef < 0 else operator.add
            if abs(coef) != 1.0:
                term = graph.call_function(operator.mul, (term, abs(coef)))
            acc = graph.call_function(op, (acc, term))
            acc.meta.update(before.meta)
    return acc


def fold_sum(ctx: PassContext, root: fx.Node, *, with_identity: bool) -> int:
    """Merge the aligned branches of the sum at ``root``; with ``with_identity`` only groups holding an identity."""
    terms = branches.sum_terms(root)
    if len(terms) < 2:
        return 0
    groups, blocked = _read_terms(ctx, terms, with_identity)
    where = ctx.label(root, "sum")
    rewrites = 0
    merged_terms: set[int] = set()
    new_parts: list[tuple[Any, float]] = []
    for source, members in groups.items():
        for reason in blocked.get(source, []) if len(members) >= 1 else []:
            ctx.refuse(root, f"{where}: {reason}")
        if len(members) < 2 or (with_identity and not any(ident for _, _, ident in members)):
            continue
        if not any(b.from_conv for _, b, _ in members):
            continue  # x + x or bn(x) + x: elementwise ops are cheaper than the conv they would become
        if written_in_place(source):
            ctx.refuse(root, f"{where}: its branches read {source.name}, which an op modifies in place")
            continue
        merged, refused = branches.merge([b for _, b, _ in members])
        for b, why in refused:
            ctx.refuse(root, f"{where}: {b.label} not merged: {why}")
        if merged is None:
            continue
        kept = {id(b) for b, _ in refused}
        merged_terms.update(i for i, b, _ in members if id(b) not in kept)
        spec = branches.as_conv_spec(merged, root)
        first_read = min((u for u in source.users), key=_position)  # where the branches first read it
        new_parts.append((insert_layer(ctx.gm, spec, merged.weight, merged.bias, source,
                                       before=first_read if _position(first_read) < _position(root) else root,
                                       name=merged.name), 1.0))
        rewrites += 1
    if not rewrites:
        return 0
    parts = new_parts + [t for i, t in enumerate(terms) if i not in merged_terms]
    replace(root, _build_sum(ctx.graph, parts, root))
    return rewrites


@register_pass("branch_sum", "merge summed conv, BN and avg-pool branches that read one tensor into one conv",
               order=40)
def branch_sum(ctx: PassContext) -> int:
    return sum(fold_sum(ctx, n, with_identity=False) for n in live_nodes(ctx.graph) if branches.sum_root(n))


@register_pass("identity", "fold x + f(x) into f's conv: the identity is a Dirac kernel", order=45)
def identity(ctx: PassContext) -> int:
    return sum(fold_sum(ctx, n, with_identity=True) for n in live_nodes(ctx.graph) if branches.sum_root(n))

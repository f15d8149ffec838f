"""``branch_sum``: parallel conv, BN and average-pool branches that read one tensor and are summed, as one conv.

RepVGG (3x3-BN + 1x1-BN + BN), ACNet (3x3 + 1x3 + 3x1), MobileOne (k convs + 1x1 + BN) and
DBB's final sum are add/sub trees whose terms are convs of the same input; REPARAM §3 gives
when their kernels add up exactly. Bare ``x`` terms are left to the ``identity`` pass, which
runs :func:`fold_sum` too; a merge that would store more weights or do more work than the
branches it replaces is declined, and the terms whose kernels lie inside a larger one merge into it instead
(SLaK's 5x5 into its 51x5: no weight or MAC added). Summed linear layers of one input become one linear.
"""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any

import torch
from torch import fx

from fxreparam import algebra, cost, ops
from fxreparam.branches import (
    Branch,
    as_branch,
    common_path,
    identity_branch,
    merge,
    merge_within,
    sum_root,
    sum_terms,
    why_reads_differ,
)
from fxreparam.graph import insert_layer, position
from fxreparam.graph import replace as replace_node
from fxreparam.registry import PassContext, register_pass
from fxreparam.spec import Layer

__all__ = ["branch_sum", "fold_sum"]


def _read_terms(gm: fx.GraphModule, terms: list[tuple[Any, float]], with_identity: bool
                ) -> tuple[dict[fx.Node, list[tuple[int, Branch, bool]]], dict[fx.Node, list[str]]]:
    """Each term as a branch, grouped by the tensor it reads; and why some terms could not join a group.

    Bare tensors (and affine maps of shared ones) are read as identity branches only where their group
    has a conv, whose spatial rank they then take.
    """
    groups: dict[fx.Node, list[tuple[int, Branch, bool]]] = {}
    blocked: dict[fx.Node, list[str]] = {}
    pending: list[tuple[int, fx.Node, float]] = []
    for i, (term, coef) in enumerate(terms):
        if not isinstance(term, fx.Node):
            continue  # a constant term stays as it is
        branch = as_branch(gm, term)
        if branch is not None and len(term.users) > 1:  # read elsewhere too: it can only be an identity term
            blocked.setdefault(branch.input, []).append(f"{branch.label}: its output has another consumer")
            branch = None
        if branch is not None and branch.unread_crop is not None:
            crop = branch.unread_crop
            blocked.setdefault(crop.source, []).append(f"{branch.label} not merged: {crop.why_not}")
        if branch is None:
            pending.append((i, term, coef))
        else:
            groups.setdefault(branch.input, []).append((i, branch.scaled(coef), False))
    for i, term, coef in pending:
        affine = ops.channel_affine(gm, term)
        source = affine.input if affine is not None and len(affine.input.users) > 1 else term
        convs = [b for _, b, _ in groups.get(source, []) if b.from_conv]
        if not convs:
            continue
        is_identity = source is term
        if is_identity and not with_identity:
            continue
        dims = convs[0].spec.dims
        branch = identity_branch(term, dims) if is_identity else as_branch(gm, term, dims)
        if branch is not None:
            groups[source].append((i, branch.scaled(coef), is_identity))
    return groups, blocked


def _linear_terms(gm: fx.GraphModule, terms: list[tuple[Any, float]]) -> dict[fx.Node, list[tuple[int, Layer, float]]]:
    """The terms that are linear layers read by nothing else, grouped by the tensor they read."""
    groups: dict[fx.Node, list[tuple[int, Layer, float]]] = {}
    for i, (term, coef) in enumerate(terms):
        layer = ops.linear(gm, term) if isinstance(term, fx.Node) and len(term.users) == 1 else None
        if layer is not None:
            groups.setdefault(layer.input, []).append((i, layer, coef))
    return groups


def _sum_linears(members: list[tuple[int, Layer, float]], width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kernel and bias of ``sum(coef * linear(x))``, ``width`` outputs wide: the scaled weights and biases added,
    one-output layers' rows repeated as the sum broadcasts them."""
    kernels = [_widened(algebra.exact(layer.weight) * coef, None if layer.bias is None else
                        algebra.exact(layer.bias) * coef, width) for _, layer, coef in members]
    biases = [b for _, b in kernels if b is not None]
    return algebra.sum_kernels([w for w, _ in kernels]), algebra.sum_kernels(biases) if biases else None


def _broadcast_width(widths: list[int]) -> int | None:
    """The width that summed outputs of ``widths`` broadcast to (a width of 1 repeats), or ``None`` if they do not."""
    wide = set(widths) - {1}
    return None if len(wide) > 1 else max(wide, default=1)


def _widened(weight: torch.Tensor, bias: torch.Tensor | None, width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A one-output kernel with its row repeated ``width`` times: the same values as its output broadcast in a sum."""
    if weight.shape[0] == width:
        return weight, bias
    return weight.expand(width, *weight.shape[1:]).clone(), None if bias is None else bias.expand(width).clone()


def _broadcast_branches(members: list[tuple[int, Branch, bool]]) -> list[tuple[int, Branch, bool]] | str:
    """``members`` with each one-channel branch widened to the channels the sum broadcasts it to; or why their
    channels do not broadcast."""
    width = _broadcast_width([b.out_channels for _, b, _ in members])
    if width is None:
        return f"output channels {sorted({b.out_channels for _, b, _ in members})} do not broadcast"
    widened = [(i, b, ident, *_widened(b.weight, b.bias, width)) for i, b, ident in members]
    return [(i, replace(b, weight=weight, bias=bias), ident) for i, b, ident, weight, bias in widened]


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


_Merged = tuple[fx.Node, list[int]]  # the new layer's node and the indices of the terms it replaces
_Notes = list[tuple[str, bool]]  # why parts of a sum stay, each with whether it is a decline for cost


def _place(ctx: PassContext, root: fx.Node, source: fx.Node, merged: Branch, notes: _Notes) -> fx.Node | None:
    """``merged`` as a conv of ``source`` placed at its first read; ``None`` (and why in ``notes``) where its
    branches crop more than it can pad."""
    if min(merged.spec.padding) < 0:
        return notes.append((f"merging {merged.label}: the merged conv would need padding {merged.spec.padding} "
                             "(its branches crop more than the largest pads)", False))
    first_read = min(source.users, key=position)
    before = first_read if position(first_read) < position(root) else root
    return insert_layer(ctx.gm, merged.spec, merged.weight, merged.bias, input=source, before=before,
                        storage=merged.storage, name=merged.name, like=root)


def _sized(b: Branch) -> str:
    """``b``'s label with its kernel size (``3x3 conv 'a'``), as the reasons of a partial merge name terms."""
    return f"{'x'.join(map(str, b.kernel_size))} {b.label}"


def _merge_within(ctx: PassContext, root: fx.Node, source: fx.Node, widened: list[tuple[int, Branch, bool]],
                  given: dict[int, Branch], notes: _Notes, declined: bool) -> list[_Merged]:
    """Of branches that do not merge whole, each merged with those whose kernels lie inside it (no weight or MAC
    added, REPARAM §3), the rest kept; which merged into which, and why the others stay, go to ``notes``."""
    index = {id(b): i for i, b, _ in widened}
    placed: list[_Merged] = []
    for merged, taken in merge_within([b for _, b, _ in widened]):
        indices = [index[id(b)] for b in taken]
        why = cost.why_costlier([given[i].cost() for i in indices], merged.cost())
        if why is not None:
            notes.append((f"merging {merged.label}: {why}", True))
            continue
        node = _place(ctx, root, source, merged, notes)
        if node is not None:
            placed.append((node, indices))
            notes.append((f"{_PARTLY}{', '.join(_sized(b) for b in taken[1:])} into {_sized(taken[0])}", declined))
    done = {i for _, indices in placed for i in indices}
    if declined:
        notes += [(f"{_sized(b)} kept: no other term's kernel holds it, so merging it would grow one", True)
                  for i, b, _ in widened if i not in done]
    return placed


def _merge_branches(ctx: PassContext, root: fx.Node, source: fx.Node, members: list[tuple[int, Branch, bool]],
                    notes: _Notes) -> list[_Merged]:
    """One conv for the branches of ``source`` that align (REPARAM §3) and cost no more, placed at their first
    read of it; where they do not merge whole, the terms that fit inside a larger one merged into it; why the rest
    stay goes to ``notes``."""
    if why_reads_differ(source):
        notes.append((why_reads_differ(source), False))
        return []
    given = {i: b for i, b, _ in members}  # costs are the branches' own, before any widening
    widened = _broadcast_branches(members)
    if isinstance(widened, str):
        notes.append((widened, False))
        return []
    merged, refused = merge([b for _, b, _ in widened])
    notes += [(f"{b.label} not merged: {why}", False) for b, why in refused]
    if merged is None:
        return _merge_within(ctx, root, source, widened, given, notes, declined=False)
    kept = {id(b) for b, _ in refused}
    taken = [i for i, b, _ in widened if id(b) not in kept]
    why = cost.why_costlier([given[i].cost() for i in taken], merged.cost())
    if why is not None:
        notes.append((f"merging {merged.label}: {why}", True))
        return _merge_within(ctx, root, source, widened, given, notes, declined=True)
    node = _place(ctx, root, source, merged, notes)
    return [] if node is None else [(node, taken)]


def _merge_linears(ctx: PassContext, root: fx.Node, source: fx.Node, members: list[tuple[int, Layer, float]],
                   notes: _Notes) -> _Merged | None:
    """One linear layer for the summed linear layers of ``source``, placed at the first of them."""
    width = _broadcast_width([layer.out_channels for _, layer, _ in members])
    why = why_reads_differ(source) or (None if width else "their output widths do not broadcast")
    if why is not None:
        return notes.append((f"linear layers of {source.name} not merged: {why}", False))
    weight, bias = _sum_linears(members, width)
    first = min((layer.node for _, layer, _ in members), key=position)
    name = common_path([layer.name for _, layer, _ in members]) or members[0][1].name
    return insert_layer(ctx.gm, members[0][1].spec, weight, bias, input=source, before=first,
                        storage=members[0][1].storage, name=name, like=root), [i for i, _, _ in members]


def _worth_merging(members: list[tuple[int, Branch, bool]], with_identity: bool) -> bool:
    """Whether a group of branches is this pass's to merge: two or more, a conv among them (``bn(x) + bn(x)`` and
    ``x + x`` are cheaper elementwise), and with ``with_identity`` an identity term."""
    return (len(members) >= 2 and any(b.from_conv for _, b, _ in members)
            and (not with_identity or any(ident for _, _, ident in members)))


_PARTLY = "partly merged: "  # the note of a partial merge, which a later round's restatement does not replace


def _report(ctx: PassContext, root: fx.Node, notes: _Notes) -> None:
    """All of a sum's reasons as one refusal (the report keeps one per node): a decline only if every one is. A sum
    left by a partial merge keeps that merge's account (which terms merged into which) over a later round's."""
    prior = ctx.refusals.get((ctx.pass_name, root.name))
    if notes and (prior is None or _PARTLY not in prior.reason or any(_PARTLY in why for why, _ in notes)):
        ctx.refuse(root, f"{ctx.label(root, 'sum')}: " + "; ".join(why for why, _ in notes),
                   costlier=all(costlier for _, costlier in notes))


def fold_sum(ctx: PassContext, root: fx.Node, *, with_identity: bool) -> bool:
    """Merge the aligned branches of the sum at ``root`` into convs; with ``with_identity`` only groups that hold
    a bare-tensor (identity) term. Refusals are recorded in ``ctx``; returns whether anything merged."""
    terms = sum_terms(root)
    if len(terms) < 2:
        return False
    groups, blocked = _read_terms(ctx.gm, terms, with_identity)
    read = set(groups) | {t for t, _ in terms if isinstance(t, fx.Node)}  # what other terms read or are
    notes: _Notes = [(reason, False) for source in read for reason in blocked.get(source, [])]
    merged: list[_Merged | None] = [m for source, members in groups.items() if _worth_merging(members, with_identity)
                                    for m in _merge_branches(ctx, root, source, members, notes)]
    if not with_identity:
        merged += [_merge_linears(ctx, root, source, members, notes)
                   for source, members in _linear_terms(ctx.gm, terms).items() if len(members) >= 2]
    merged = [m for m in merged if m is not None]
    partly = any(_PARTLY in why for why, _ in notes)
    if not partly:
        _report(ctx, root, notes)
    if not merged:
        return False
    replaced = {i for _, indices in merged for i in indices}
    parts = [(node, 1.0) for node, _ in merged] + [t for i, t in enumerate(terms) if i not in replaced]
    result = _build_sum(ctx.graph, parts, root)
    replace_node(root, result)
    if partly:  # on the sum that stays, where the report keeps it
        _report(ctx, result, notes)
    return True


@register_pass("branch_sum", "merge summed conv, BN and avg-pool branches that read one tensor into one conv")
def branch_sum(ctx: PassContext, node: fx.Node) -> bool:
    return sum_root(node) and fold_sum(ctx, node, with_identity=False)

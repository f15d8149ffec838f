"""``channel_slices``: layers on channel slices of one tensor, concatenated or summed, as one layer (REPARAM §15).

RMNet keeps ``x[:, :r]`` as it is and computes the other channels from ``x``, with a BN on ``x[:, r:]``
summed into them. Three forms, each over one tensor ``x`` and its channel axis:

* **Per-channel cat** (case A): ``cat([f_1(x[:, s_1]), ..., f_n(x[:, s_n])])`` with every ``f_i`` the identity
  or a per-channel affine (BN in eval, a constant scale/shift, or a chain of them) and the slices covering
  ``x``'s channels in order is one per-channel affine of ``x`` (scale 1, shift 0 on the identity parts). It is
  folded into ``x``'s conv or linear producer (REPARAM §1) where the slices are that layer's only readers, else
  into the one conv or linear layer reading the cat where exact (REPARAM §2); elsewhere it would leave a mul
  and an add for the BNs it removes, and is declined.
* **Block cat** (case B): where some parts are convs (of a slice, or of all of ``x``), the cat is one conv of
  ``x`` whose kernel stacks the parts (REPARAM §10), identity and affine parts as (scaled) Dirac columns
  selecting their channels, a conv of a slice as its kernel on those input channels, zero elsewhere. Folded
  only where that kernel, stored at its coarsest grouping (REPARAM §9), is not costlier than the parts.
* **Sum** : a term ``f(x[:, s])`` (identity or per-channel affine of a slice) of a sum that also holds a conv of
  ``x`` joins that conv as a Dirac kernel on the slice's input channels (REPARAM §4 on a slice).

Exact under: slices of unit step on the channel axis (1 batched, 0 unbatched; the last for a linear producer),
every term and slice of a cat read by nothing else, BNs in eval with finite statistics.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx

from fxreparam import algebra, branches, cost, ops
from fxreparam.graph import emit, emit_refolded, erase_dead, position
from fxreparam.meta import concrete_shape, rank, storage
from fxreparam.ops.targets import _SLICE, _TO_END, _bind, opaque
from fxreparam.registry import Costlier, NotExact, PassContext, register_pass
from fxreparam.spec import ConvSpec

from .bn_conv import _why_not_exact as why_not_before

__all__ = ["SliceRead", "channel_slice", "channel_slices"]

_NARROW = {torch.narrow, torch.ops.aten.narrow.default}


@dataclass(frozen=True)
class SliceRead:
    """``source[..., start:stop, ...]`` on axis ``dim`` (unit step), as the node ``node``."""

    node: fx.Node
    source: fx.Node
    dim: int
    start: int
    stop: int
    reader: fx.Node | None = None  # the node of the chain that reads ``source`` (``node`` if None)

    @property
    def channels(self) -> int:
        return self.stop - self.start


def _bounds(start: Any, stop: Any, size: int) -> tuple[int, int] | None:
    """``start:stop`` as Python clamps it on a dim of ``size``, or ``None`` where either is not a plain int."""
    if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (start, stop)):
        return None
    begin, end, _ = slice(start, None if stop is None or stop >= _TO_END else stop).indices(size)
    return begin, max(begin, end)


def _getitem_slice(node: fx.Node) -> tuple[fx.Node, int, Any, Any] | None:
    """``(source, dim, start, stop)`` of ``x[:, a:b]`` written with ``getitem`` (a ``symbolic_trace`` graph)."""
    source, index = node.args
    if not isinstance(source, fx.Node) or not isinstance(index, tuple):
        return None
    narrowed = [d for d, s in enumerate(index) if s != slice(None)]
    if len(narrowed) != 1 or not all(isinstance(s, slice) for s in index):
        return None
    s = index[narrowed[0]]
    return (source, narrowed[0], s.start, s.stop) if s.step in (None, 1) else None


def channel_slice(node: Any) -> SliceRead | None:
    """Read ``node`` as a unit-step slice of one axis of a tensor whose shape capture recorded, else ``None``;
    full-range slices of other axes around it (``torch.export`` writes ``x[:, a:b]`` as two slices) are looked
    through where nothing else reads them."""
    found = _one_slice(node)
    if found is None:
        return None
    full = found.start == 0 and found.stop == concrete_shape(found.source)[found.dim]
    inner = _one_slice(found.source) if len(found.source.users) == 1 else None
    if full and inner is not None:
        got = channel_slice(found.source) or inner
        return replace(got, node=node, reader=got.reader or got.node)
    while inner is not None and inner.start == 0 and inner.stop == concrete_shape(inner.source)[inner.dim]:
        found = replace(found, source=inner.source, reader=inner.node)
        inner = _one_slice(inner.source) if len(inner.source.users) == 1 else None
    return found


def _one_slice(node: Any) -> SliceRead | None:
    """``node`` as one unit-step slice of one axis, else ``None``."""
    if not isinstance(node, fx.Node) or opaque(node):
        return None
    if node.op == "call_function" and node.target in _SLICE:
        a = _bind(node, ("input", "dim", "start", "end", "step"), {"dim": 0, "start": None, "end": None, "step": 1})
        if a["step"] != 1:
            return None
        found = (a["input"], a["dim"], a["start"], a["end"])
    elif (node.op == "call_function" and node.target in _NARROW) or (node.op == "call_method"
                                                                       and node.target == "narrow"):
        a = _bind(node, ("input", "dim", "start", "length"), {})
        if not all(isinstance(a.get(k), int) for k in ("dim", "start", "length")) or a["start"] < 0:
            return None
        found = (a["input"], a["dim"], a["start"], a["start"] + a["length"])
    elif node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
        found = _getitem_slice(node)
    else:
        return None
    if found is None or not isinstance(found[0], fx.Node) or not isinstance(found[1], int):
        return None
    shape = concrete_shape(found[0])
    if shape is None or not shape:
        return None
    dim = found[1] % len(shape)
    bounds = _bounds(found[2], found[3], shape[dim])
    return None if bounds is None else SliceRead(node, found[0], dim, *bounds)


@dataclass(frozen=True)
class Part:
    """One operand of a cat (or term of a sum): ``f(x[s])`` with f the identity, a per-channel affine, or a conv;
    or (``whole``) a conv of all of ``x``."""

    node: fx.Node
    slice: SliceRead | None
    affine: ops.ChannelAffine | None = None  # the outermost of ``chain``
    chain: tuple[ops.ChannelAffine, ...] = ()  # per-channel affine maps from the slice out (a BN, then a scale)
    whole: branches.Branch | None = None
    layer: Any = None  # a conv of the slice (``spec.Layer``)


def _slice_part(gm: fx.GraphModule, node: fx.Node) -> Part | None:
    """``node`` as the identity, a per-channel affine or a conv of a channel slice, else ``None``."""
    found = channel_slice(node)
    if found is not None:
        return Part(node, found)
    chain, inner = [], node
    while (affine := ops.channel_affine(gm, inner)) is not None and (inner is node or len(inner.users) == 1):
        chain.append(affine)
        inner = affine.input
    if chain:
        found = channel_slice(inner)
        return Part(node, found, affine=chain[0], chain=tuple(reversed(chain))) if found is not None else None
    layer = ops.conv(gm, node)
    if layer is not None and not layer.transposed:
        found = channel_slice(layer.input)
        return Part(node, found, layer=layer) if found is not None else None
    return None


def _label(ctx: PassContext, part: Part) -> str:
    s = part.slice
    what = f"{s.source.name}[{s.start}:{s.stop}]" if s is not None else part.whole.label
    if part.affine is not None:
        return f"{ctx.label(part.affine.node, 'bn' if part.affine.kind == 'batch norm' else part.affine.kind)} " \
               f"of {what}"
    if part.layer is not None:
        return f"{ctx.label(part.layer.node, 'conv')} of {what}"
    return what


def _vectors(part: Part, ndim: int, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The part's scale and shift over its channels (1 and 0 for the identity), or why it has none."""
    c = part.slice.channels
    if part.affine is None:
        return torch.ones(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    scale, shift = torch.ones(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    for affine in part.chain:  # a(s x + t) + b = (a s) x + (a t + b)
        found = affine.vectors(c, ndim, dim, dtype)
        if isinstance(found, str):
            return found
        a, b = algebra.exact(found[0]).to(torch.float64), algebra.exact(found[1]).to(torch.float64)
        scale, shift = a * scale, a * shift + b
    return scale, shift


def _affine_cost(part: Part) -> cost.Cost:
    """What a part's per-channel affine stores (its scale and shift); nothing for the identity."""
    if part.affine is None:
        return cost.Cost(0, 0)
    return cost.Cost(sum(a.scale.numel() + a.shift.numel() for a in part.chain), 0)


# ----------------------------------------------------------------------------- selection kernels


def _selection(read: SliceRead, channels: int, dims: int, scale: torch.Tensor, shift: torch.Tensor | None,
               stored, label: str, name: str) -> branches.Branch:
    """``scale * x[start:stop] + shift`` as a 1x1 conv of all ``channels`` of ``x``: a Dirac kernel on the slice's
    input channels, scaled per output (REPARAM §4, §15)."""
    weight = torch.zeros(read.channels, channels, *(1,) * dims, dtype=torch.float64)
    o = torch.arange(read.channels)
    weight[(o, o + read.start, *(0,) * dims)] = scale
    bias = shift if shift is not None and bool(shift.any()) else None
    spec = ConvSpec((1,) * dims, (0,) * dims, (1,) * dims)
    return branches.Branch(read.source, spec, weight, bias, stored, label, name)


def _embedded(layer, read: SliceRead, channels: int) -> branches.Branch:
    """A conv of ``x[start:stop]`` as a conv of all ``channels`` of ``x``: its kernel on those input channels."""
    dense = algebra.regroup(layer.weight, layer.groups, 1)
    weight = torch.zeros(dense.shape[0], channels, *dense.shape[2:], dtype=dense.dtype)
    weight[:, read.start:read.stop] = dense
    spec = replace(layer.spec, groups=1)
    bias = algebra.exact(layer.bias) if layer.bias is not None else None
    return branches.Branch(read.source, spec, weight, bias, layer.storage, f"conv '{layer.name}'", layer.name, True)


def _part_branch(ctx: PassContext, part: Part, channels: int, dims: int, ndim: int, dim: int, stored
                 ) -> tuple[branches.Branch, cost.Cost] | str:
    """``part`` as a conv of all of ``x`` and what the part itself costs, or why it is not one."""
    if part.whole is not None:
        return part.whole, part.whole.cost()
    if part.layer is not None:
        layer = part.layer
        return _embedded(layer, part.slice, channels), cost.kernel_cost(layer.weight, layer.bias, 1)
    vectors = _vectors(part, ndim, dim, stored[0])
    if isinstance(vectors, str):
        return f"{_label(ctx, part)}: {vectors}"
    name = part.affine.name if part.affine is not None else part.slice.source.name
    return _selection(part.slice, channels, dims, *vectors, stored, _label(ctx, part), name), _affine_cost(part)


# ----------------------------------------------------------------------------- the cat forms


def _read_parts(ctx: PassContext, tensors: list[Any]) -> list[Part] | None:
    """The cat's operands as parts over one tensor, or ``None`` where no operand is a slice (not this rule)."""
    parts: list[Part | None] = [_slice_part(ctx.gm, t) if isinstance(t, fx.Node) else None for t in tensors]
    sliced = [p for p in parts if p is not None]
    if not sliced:
        return None
    source = sliced[0].slice.source
    for i, t in enumerate(tensors):
        if parts[i] is None and isinstance(t, fx.Node):
            whole = branches.as_branch(ctx.gm, t)
            if whole is not None and whole.from_conv and whole.input is source and whole.unread_crop is None:
                parts[i] = Part(t, None, whole=whole)
    if any(p is None for p in parts) or any(p.slice is not None and p.slice.source is not source for p in parts):
        return None  # an operand this rule does not read, or slices of different tensors
    return parts


def _why_not_read_once(ctx: PassContext, parts: list[Part]) -> str | None:
    """Why a part cannot be folded away: it, or the slice it reads, has another reader."""
    for p in parts:
        inner = [p.node, *(a.input for a in p.chain)] if p.chain else [p.node]
        inner += [p.slice.node] if p.slice is not None and p.slice.node not in inner else []
        for n in inner:
            if len(ops.value_users(n)) != 1 or len(n.users) != 1:
                return f"{_label(ctx, p)}: {n.name} is read elsewhere too"
    return None


def _as_affine(ctx: PassContext, node: fx.Node, parts: list[Part], ndim: int, dim: int, where: str) -> bool:
    """Case A: the cat of identity and per-channel affine parts is one affine of ``x``, folded into its producer or
    into the one layer that reads the cat."""
    source = parts[0].slice.source
    channels = concrete_shape(source)[dim]
    bounds = [(p.slice.start, p.slice.stop) for p in parts]
    covers = bounds[0][0] == 0 and bounds[-1][1] == channels and all(
        a[1] == b[0] for a, b in itertools.pairwise(bounds)) and all(a < b for a, b in bounds)
    if not covers:
        raise NotExact(f"{where}: the slices {bounds} do not cover the {channels} channels of {source.name} in order, "
                       "so the cat is not a per-channel map of it")
    if all(p.affine is None for p in parts):
        node.replace_all_uses_with(source)  # the slices put x back together
        erase_dead(node)
        return True
    stored = storage(source)
    if stored is None:
        raise NotExact(f"{where}: the dtype of {source.name} is unknown (pass example inputs)")
    scale, shift = _cat_vectors(ctx, parts, ndim, dim, stored[0], where)
    layer = ops.weighted(ctx.gm, source)
    readers = {p.slice.reader or p.slice.node for p in parts}
    if layer is not None and set(ops.value_users(source)) == readers:
        return _into_producer(ctx, node, layer, (scale, shift), ndim, dim, where)
    users = ops.value_users(node)
    after = ops.weighted(ctx.gm, users[0]) if len(users) == 1 else None
    if after is not None and after.input is node:
        return _into_consumer(ctx, node, source, after, (scale, shift), ndim, dim, where)
    why = ("is read elsewhere too" if layer is not None else "is not a conv or linear layer's output")
    raise Costlier(f"{where}: it is one per-channel affine of {source.name}, which {why}, and no conv or linear layer "
                   "reads the cat alone: a mul and an add would replace its affine maps")


def _cat_vectors(ctx: PassContext, parts: list[Part], ndim: int, dim: int, dtype: torch.dtype, where: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and shift over all of ``x``'s channels that the cat of ``parts`` applies (REPARAM §15)."""
    scales, shifts = [], []
    for p in parts:
        vectors = _vectors(p, ndim, dim, dtype)
        if isinstance(vectors, str):
            raise NotExact(f"{where}: {_label(ctx, p)}: {vectors}")
        scales.append(vectors[0])
        shifts.append(vectors[1])
    return torch.cat(scales), torch.cat(shifts)


def _into_producer(ctx: PassContext, node: fx.Node, layer, affine, ndim: int, dim: int, where: str) -> bool:
    """The cat's affine folded into the conv or linear layer whose output it slices (REPARAM §1)."""
    if layer.spec.channel_dim(ndim) != dim:
        raise NotExact(f"{where}: the cat is on dim {dim}, and {ctx.label(layer.node, layer.kind)}'s channels are "
                       f"dim {layer.spec.channel_dim(ndim)}")
    weight, bias = algebra.affine_after(layer.weight, layer.bias, affine, groups=layer.groups,
                                        transposed=layer.transposed, dtype=layer.storage[0])
    emit_refolded(ctx.gm, layer, weight, bias, replaces=node)
    return True


def _into_consumer(ctx: PassContext, node: fx.Node, source: fx.Node, layer, affine, ndim: int, dim: int,
                   where: str) -> bool:
    """The cat's affine folded into the conv or linear layer that alone reads the cat (REPARAM §2), where exact."""
    here = f"{where}, before {ctx.label(layer.node, layer.kind)}"
    if layer.spec.channel_dim(ndim) != dim:
        raise NotExact(f"{here}: the cat is on dim {dim}, and the layer's channels are dim "
                       f"{layer.spec.channel_dim(ndim)}")
    why = why_not_before(layer, affine[1], "per-channel affine")
    if why is not None:
        raise NotExact(f"{here}: {why}")
    weight, bias = algebra.affine_before(layer.weight, layer.bias, affine, groups=layer.groups,
                                         dtype=layer.storage[0])
    for user in list(node.users):  # shape queries read x instead: it has the cat's shape
        if user is not layer.node:
            user.replace_input_with(node, source)
    emit(ctx.gm, layer.spec, weight, bias, input=source, replaces=layer.node, storage=layer.storage,
         name=layer.name)
    return True


def _as_block_conv(ctx: PassContext, node: fx.Node, parts: list[Part], ndim: int, dim: int, where: str) -> bool:
    """Case B: the cat with convs among its parts is one conv of ``x`` with a block-structured kernel."""
    source = next(p.slice.source if p.slice is not None else p.whole.input for p in parts)
    convs = [p.whole.spec if p.whole is not None else p.layer.spec for p in parts if p.slice is None or p.layer]
    dims = convs[0].dims
    stored = storage(source)
    if ndim not in (dims + 1, dims + 2) or convs[0].channel_dim(ndim) != dim or stored is None:
        raise NotExact(f"{where}: the cat is on dim {dim} of a {ndim}-d tensor, not the convs' channel axis")
    channels = concrete_shape(source)[dim]
    read = [_part_branch(ctx, p, channels, dims, ndim, dim, stored) for p in parts]
    why = next((r for r in read if isinstance(r, str)), None)
    if why is not None:
        raise NotExact(f"{where}: {why}")
    if branches.why_reads_differ(source):
        raise NotExact(f"{where}: {branches.why_reads_differ(source)}")
    merged, why = branches.stack([b for b, _ in read])
    if merged is None:
        raise NotExact(f"{where}: {why}")
    if min(merged.spec.padding) < 0:
        raise NotExact(f"{where}: the block conv would need padding {merged.spec.padding}")
    grouped, _ = algebra.coarsest_groups(merged.weight, merged.spec.groups)
    why = cost.why_costlier([c for _, c in read], cost.kernel_cost(grouped, merged.bias, 1))
    if why is not None:
        raise Costlier(f"{where}: as one conv of {source.name} with a block kernel, {why}")
    first_read = min(source.users, key=position)
    emit(ctx.gm, merged.spec, merged.weight, merged.bias, input=source, replaces=node, storage=merged.storage,
         name=merged.name, at=first_read if position(first_read) < position(node) else node)
    return True


def _fold_cat(ctx: PassContext, node: fx.Node) -> bool:
    cat = ops.concat(node)
    ndim = rank(node)
    if cat is None or ndim is None or len(cat[0]) < 2:
        return False
    parts = _read_parts(ctx, list(cat[0]))
    if parts is None:
        return False
    dim = cat[1] % ndim
    if any(p.slice is not None and p.slice.dim != dim for p in parts):
        return False  # slices of another axis than the cat's
    where = f"{ctx.label(node, 'concatenation')} of {len(parts)} channel slices and layers"
    why = _why_not_read_once(ctx, parts)
    if why is not None:
        raise NotExact(f"{where}: {why}")
    if all(p.whole is None and p.layer is None for p in parts):
        return _as_affine(ctx, node, parts, ndim, dim, where)
    return _as_block_conv(ctx, node, parts, ndim, dim, where)


# ----------------------------------------------------------------------------- the sum form


def _drop_term(term: fx.Node) -> bool:
    """Remove ``term`` from the add/sub that reads it (``u + t``, ``t + u``, ``u - t`` become ``u``), if it can."""
    parent = next(iter(term.users))
    b = ops.binary(parent)
    if b is None or b.op not in ("add", "sub") or (b.lhs is term) == (b.rhs is term):
        return False
    if b.lhs is term and (b.op == "sub" or b.alpha != 1 or b.inplace):
        return False  # ``t - u`` is ``-u``, ``t + a u`` is ``a u``, and ``t += u`` writes into t
    other = b.rhs if b.lhs is term else b.lhs
    if not isinstance(other, fx.Node):
        return False
    parent.replace_all_uses_with(other)
    erase_dead(parent)
    return True


def _fold_sum(ctx: PassContext, node: fx.Node) -> bool:
    terms = branches.sum_terms(node)
    for term, coef in terms:
        if not isinstance(term, fx.Node) or len(term.users) != 1:
            continue
        part = _slice_part(ctx.gm, term)
        if part is None or part.layer is not None:
            continue
        source = part.slice.source
        convs = [(t, c, b) for t, c in terms if isinstance(t, fx.Node) and t is not term and len(t.users) == 1
                 and (b := branches.as_branch(ctx.gm, t)) is not None and b.from_conv and b.input is source
                 and b.unread_crop is None]
        if not convs:
            continue
        where = f"{ctx.label(node, 'sum')}: {_label(ctx, part)}"
        ndim = rank(term)
        stored = storage(source)
        dims = convs[0][2].spec.dims
        if ndim is None or stored is None or convs[0][2].spec.channel_dim(ndim) != part.slice.dim:
            raise NotExact(f"{where}: the slice is not on the convs' channel axis (or the rank is unknown)")
        vectors = _vectors(part, ndim, part.slice.dim, stored[0])
        if isinstance(vectors, str):
            raise NotExact(f"{where}: {vectors}")
        if branches.why_reads_differ(source):
            raise NotExact(f"{where}: {branches.why_reads_differ(source)}")
        channels = concrete_shape(source)[part.slice.dim]
        name = part.affine.name if part.affine is not None else source.name
        dirac = _selection(part.slice, channels, dims, *vectors, stored, _label(ctx, part), name)
        reasons = []
        for conv_term, conv_coef, conv in convs:
            merged, refused = branches.merge([conv, dirac.scaled(coef / conv_coef)])
            if merged is None:
                reasons += [why for _, why in refused]
                continue
            grouped, _ = algebra.coarsest_groups(merged.weight, merged.spec.groups)
            why = cost.why_costlier([conv.cost(), _affine_cost(part)], cost.kernel_cost(grouped, merged.bias, 1))
            if why is not None:
                reasons.append(f"into {conv.label}, {why}")
                continue
            if not _drop_term(term):
                return False
            emit(ctx.gm, merged.spec, merged.weight, merged.bias, input=source, replaces=conv_term,
                 storage=conv.storage, name=conv.name)
            return True
        kind = Costlier if reasons and all("would" in r for r in reasons) else NotExact
        raise kind(f"{where} not merged into a conv of {source.name}: {'; '.join(reasons)}")
    return False


@register_pass("channel_slices", "identity, BN and conv parts on channel slices of one tensor, concatenated or "
                                 "summed, as one layer (RMNet's pass-through channels)")
def channel_slices(ctx: PassContext, node: fx.Node) -> bool:
    if ops.concat(node) is not None:
        return _fold_cat(ctx, node)
    return branches.sum_root(node) and _fold_sum(ctx, node)

"""``linear_combination``: ``sum_i c_i * f_i(x) + c`` over affine layers of one input, as one layer (REPARAM §13).

DoRA (peft ``use_dora``) computes ``y + (m - 1) * (y - b) + m * s * B(A(x))`` with ``y = base(x)`` read three
times and ``m`` a per-channel vector that ``fold_constants`` has already precomputed from the parameters. At the
root of a tree of add/sub nodes and per-channel affine maps (a mul, div, add or sub by a constant, a BN) the tree
is expanded into terms ``coef * leaf`` plus a constant, each coefficient a vector over the output channels. Leaves
that are conv or linear layers (or a chain of two, composed with :func:`fxreparam.algebra.compose` where another
layer of the chain's input is in the sum to absorb it) are summed per input into one layer, with
:func:`fxreparam.branches.merge`'s alignment rules for convs; other leaves stay as terms with a scalar
coefficient. A layer also read outside the tree stays; the fold must then still cost no more than the layers it
removes (:func:`fxreparam.cost.why_costlier`). Plain sums of single-use layers are ``branch_sum``'s and
``identity``'s: this pass takes trees where a leaf is read more than once or a chain is composed.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace

import torch
from torch import fx

from fxreparam import algebra, cost, ops
from fxreparam.branches import Branch, as_branch, common_path, merge, why_reads_differ
from fxreparam.graph import insert_layer, position
from fxreparam.graph import replace as replace_node
from fxreparam.meta import concrete_shape
from fxreparam.registry import Costlier, NotExact, PassContext, register_pass
from fxreparam.spec import Layer, Spec

__all__ = ["linear_combination"]


def _layer(gm: fx.GraphModule, node: fx.Node) -> Layer | None:
    """A non-transposed conv or a linear layer with stored weights."""
    layer = ops.conv(gm, node) or ops.linear(gm, node)
    return layer if layer is not None and not layer.transposed else None


def _children(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node] | None:
    """The tensor operands of an add/sub of two tensors, or the input of a per-channel affine map; else None."""
    b = ops.binary(node)
    if b is not None and b.inplace and not (isinstance(b.lhs, fx.Node) and set(b.lhs.users) == {node}):
        return None  # ``a += b`` where someone else still reads ``a``
    if (b is not None and b.op in ("add", "sub") and isinstance(b.lhs, fx.Node) and isinstance(b.rhs, fx.Node)
            and ops.constant(gm, b.lhs) is None and ops.constant(gm, b.rhs) is None):
        return [b.lhs, b.rhs]
    affine = ops.channel_affine(gm, node)
    return [affine.input] if affine is not None else None


def _expands(gm: fx.GraphModule, parent: fx.Node, child: fx.Node) -> bool:
    """Whether ``child`` is an inner node of ``parent``'s tree: read by it alone, of its shape, itself a tree op."""
    shape = concrete_shape(child)
    return (len(child.users) == 1 and shape is not None and shape == concrete_shape(parent)
            and _layer(gm, child) is None and _children(gm, child) is not None)


def _is_root(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` tops a tree (a tree op that no larger tree expands into), with a known shape."""
    if concrete_shape(node) is None or _children(gm, node) is None or _layer(gm, node) is not None:
        return False
    users = list(node.users)
    return not (len(users) == 1 and node in (_children(gm, users[0]) or []) and _expands(gm, users[0], node))


def _walk(gm: fx.GraphModule, root: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """The tree's inner nodes (the root first) and its leaves, each as often as the tree reads it."""
    inner, leaves, stack = [], [], [root]
    while stack:
        node = stack.pop()
        inner.append(node)
        for child in _children(gm, node) or []:
            (stack if _expands(gm, node, child) else leaves).append(child)
    return inner, leaves


@dataclass
class _Combination:
    """The tree as ``sum_leaf coefs[leaf] * leaf + const``, coefficients and constant ``[C]`` over the channels."""

    coefs: dict[fx.Node, torch.Tensor]
    const: torch.Tensor


def _expand(ctx: PassContext, root: fx.Node, channels: int, channel_dim: int, dtype: torch.dtype) -> _Combination:
    """Distribute the tree's coefficients down to its leaves (distributivity, REPARAM §13); per-channel constants
    must broadcast on ``channel_dim`` only, else NotExact."""
    gm, ndim = ctx.gm, len(concrete_shape(root))
    coefs: dict[fx.Node, torch.Tensor] = {}
    const = torch.zeros(channels, dtype=torch.float64)
    stack = [(root, torch.ones(channels, dtype=torch.float64))]
    while stack:
        node, coef = stack.pop()
        children = _children(gm, node)
        if len(children) == 2:
            b = ops.binary(node)
            parts = [(b.lhs, coef), (b.rhs, coef * (b.alpha * (-1.0 if b.op == "sub" else 1.0)))]
        else:
            affine = ops.channel_affine(gm, node)
            vectors = affine.vectors(channels, ndim, channel_dim, dtype)
            if isinstance(vectors, str):
                raise NotExact(f"{ctx.label(root, 'sum')}: {ctx.label(node, affine.kind)} is not a per-channel "
                               f"coefficient of the layers' outputs: {vectors}", root)
            scale, shift = (algebra.exact(v) for v in vectors)
            const = const + coef * shift
            parts = [(affine.input, coef * scale)]
        for child, c in parts:
            if _expands(gm, node, child):
                stack.append((child, c))
            else:
                coefs[child] = coefs[child] + c if child in coefs else c
    return _Combination(coefs, const)


@dataclass(frozen=True)
class _Term:
    """One layer leaf as a kernel of ``source``: the leaf node, the layers it stands for (a chain's inner first)."""

    leaf: fx.Node
    source: fx.Node
    layers: tuple[Layer, ...]
    branch: Branch | None = None  # a conv's kernel (with its alignment), None for a linear layer


def _direct(gm: fx.GraphModule, leaf: fx.Node, layer: Layer) -> _Term:
    """A layer leaf read as a kernel of its own input (a conv through a symmetric crop, REPARAM §10)."""
    if not layer.is_conv:
        return _Term(leaf, layer.input, (layer,))
    branch = as_branch(gm, leaf)
    return _Term(leaf, branch.input, (layer,), branch)


def _composed(gm: fx.GraphModule, term: _Term) -> _Term | None:
    """``term``'s layer after the layer it reads, as one kernel of the inner layer's input where that is exact
    (REPARAM §6: one of two convs pointwise; no zero padding reads a non-zero inner bias), else None."""
    outer, mid = term.layers[0], term.source
    inner = _layer(gm, mid) if len(mid.users) == 1 and mid is outer.input else None
    if inner is None or inner.is_conv != outer.is_conv:
        return None
    if not outer.is_conv:
        return _Term(term.leaf, inner.input, (inner, outer))
    first = as_branch(gm, mid)
    if inner.spec.dims != outer.spec.dims:
        return None
    if outer.spec.pointwise(outer.kernel_size):
        spec = first.spec
    elif first.spec.pointwise(first.kernel_size) and not (
            any(outer.spec.padding) and outer.spec.padding_mode == "zeros" and first.bias is not None
            and bool(first.bias.any())):
        spec = outer.spec
    else:
        return None
    weight, groups = algebra.compose(outer.weight, outer.groups, first.weight, first.spec.groups)
    bias = algebra.compose_bias(outer.weight, outer.bias, outer.groups, first.bias)
    branch = Branch(first.input, replace(spec, groups=groups), weight, bias, outer.storage,
                    f"conv '{outer.name}' after {first.label}", outer.name, True)
    return _Term(term.leaf, first.input, (inner, outer), branch)


def _terms(gm: fx.GraphModule, leaves: list[fx.Node], shape: tuple[int, ...]) -> list[_Term]:
    """The leaves that are layers of the tree's shape, each as a kernel of its input; a chain of two layers is
    composed where another layer of the chain's input is in the tree to absorb it."""
    direct = [_direct(gm, leaf, layer) for leaf in leaves
              if concrete_shape(leaf) == shape and (layer := _layer(gm, leaf)) is not None]
    terms = []
    for term in direct:
        chain = _composed(gm, term)
        absorbed = chain is not None and any(t.source is chain.source for t in direct if t is not term)
        terms.append(chain if absorbed else term)
    return terms


def _channel_dim(terms: list[_Term], ndim: int) -> int | str:
    """The output channel axis all layer terms share, or why they do not share one."""
    dims = {t.layers[-1].spec.channel_dim(ndim) for t in terms}
    return dims.pop() if len(dims) == 1 else f"its layers put their channels on different dims {sorted(dims)}"


def _scaled(term: _Term, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, Branch | None]:
    """Kernel and bias of ``coef * term`` (REPARAM §1: output channel ``o`` scaled by ``coef[o]``)."""
    if term.branch is not None:
        b = term.branch
        bias = None if b.bias is None else algebra.exact(b.bias) * coef
        weight = algebra.scale_output_channels(b.weight, coef, groups=b.spec.groups)
        return weight, bias, replace(b, weight=weight, bias=bias)
    if len(term.layers) == 2:
        inner, outer = term.layers
        weight, _ = algebra.compose(outer.weight, 1, inner.weight, 1)
        bias = algebra.compose_bias(outer.weight, outer.bias, 1, inner.bias)
    else:
        weight, bias = term.layers[0].weight, term.layers[0].bias
    scaled_bias = None if bias is None else algebra.exact(bias) * coef
    return algebra.scale_output_channels(weight, coef), scaled_bias, None


@dataclass(frozen=True)
class _Merged:
    """The one layer a group of terms of one input becomes."""

    source: fx.Node
    spec: Spec
    weight: torch.Tensor
    bias: torch.Tensor | None
    terms: tuple[_Term, ...]

    @property
    def name(self) -> str:
        return common_path([t.layers[-1].name for t in self.terms]) or self.terms[0].layers[-1].name


def _merge_group(ctx: PassContext, root: fx.Node, source: fx.Node, group: list[_Term],
                 coefs: dict[fx.Node, torch.Tensor]) -> _Merged:
    """The terms of ``source`` summed into one kernel (convs aligned as REPARAM §3 aligns them), or NotExact."""
    where = ctx.label(root, "sum")
    why = why_reads_differ(source)
    if why is not None:
        raise NotExact(f"{where}: {why}", root)
    if len({t.branch is None for t in group}) > 1:
        raise NotExact(f"{where}: convs and linear layers of {source.name} do not share one kernel", root)
    scaled = [_scaled(t, coefs[t.leaf]) for t in group]
    if group[0].branch is None:
        biases = [b for _, b, _ in scaled if b is not None]
        weight = algebra.sum_kernels([w for w, _, _ in scaled])
        return _Merged(source, group[0].layers[-1].spec, weight, algebra.sum_kernels(biases) if biases else None,
                       tuple(group))
    parts = [b for _, _, b in scaled]
    merged, refused = merge(parts) if len(parts) > 1 else (parts[0], [])
    if refused:
        raise NotExact(f"{where}: " + "; ".join(f"{b.label} not merged: {why}" for b, why in refused), root)
    if min(merged.spec.padding) < 0:
        raise NotExact(f"{where}: the merged conv would need padding {merged.spec.padding}", root)
    return _Merged(source, merged.spec, merged.weight, merged.bias, tuple(group))


def _removed(inner: set[fx.Node], terms: list[_Term]) -> list[fx.Node]:
    """The layer nodes that the fold leaves unread: a leaf read by the tree alone, and a chain's inner layer."""
    gone: list[fx.Node] = []
    for t in terms:
        if all(u in inner for u in t.leaf.users):
            gone += [layer.node for layer in t.layers]
    return list(dict.fromkeys(gone))


def _positions(node: fx.Node, channel_dim: int) -> int:
    """Output positions per sample of a layer's value (1 for a linear layer: its channels are the last dim)."""
    return cost.node_positions(node, channel_dim)


def _layer_cost(gm: fx.GraphModule, node: fx.Node) -> cost.Cost:
    layer = _layer(gm, node)
    shape = concrete_shape(node)
    positions = _positions(node, layer.spec.channel_dim(len(shape))) if shape is not None else 1
    return cost.kernel_cost(layer.weight, layer.bias, positions)


def _build_sum(graph: fx.Graph, parts: list[tuple[fx.Node, float]], before: fx.Node) -> fx.Node:
    """``sum(coef * term)`` as add/sub/mul nodes placed before ``before``; the first part has coef 1."""
    with graph.inserting_before(before):
        acc = parts[0][0]
        for term, coef in parts[1:]:
            if abs(coef) != 1.0:
                term = graph.call_function(operator.mul, (term, abs(coef)))
                term.meta.update(before.meta)
            acc = graph.call_function(operator.sub if coef < 0 else operator.add, (acc, term))
            acc.meta.update(before.meta)
    return acc


def _others(leaves: dict[fx.Node, torch.Tensor], terms: list[_Term], root: fx.Node, ctx: PassContext
            ) -> list[tuple[fx.Node, float]]:
    """The leaves that are not layer terms, each with its scalar coefficient (one that varies per channel only a
    layer absorbs: NotExact)."""
    taken = {t.leaf for t in terms}
    out = []
    for leaf, coef in leaves.items():
        if leaf in taken:
            continue
        if not bool((coef == coef[0]).all()):
            raise NotExact(f"{ctx.label(root, 'sum')}: the term {leaf.name} is not a layer, and its coefficient "
                           "varies per channel", root)
        out.append((leaf, float(coef[0])))  # kept at 0 too: 0 * inf is nan, as the tree computes it
    return out


def fold_combination(ctx: PassContext, root: fx.Node) -> bool:
    """Fold the tree at ``root`` into one layer per input plus its non-layer terms; returns whether it did."""
    gm, shape = ctx.gm, concrete_shape(root)
    inner, leaves = _walk(gm, root)
    terms = _terms(gm, list(dict.fromkeys(leaves)), shape)
    reused = len(leaves) > len(set(leaves))
    if not terms or not (reused or any(len(t.layers) == 2 for t in terms)):
        return False  # a plain sum of single-use layers: branch_sum's and identity's
    channel_dim = _channel_dim(terms, len(shape))
    if isinstance(channel_dim, str):
        raise NotExact(f"{ctx.label(root, 'sum')}: {channel_dim}", root)
    channels = shape[channel_dim]
    combination = _expand(ctx, root, channels, channel_dim, terms[0].layers[-1].storage[0])
    others = _others(combination.coefs, terms, root, ctx)
    groups: dict[fx.Node, list[_Term]] = {}
    for t in terms:
        groups.setdefault(t.source, []).append(t)
    merged = [_merge_group(ctx, root, source, group, combination.coefs) for source, group in groups.items()]
    first = merged[0]
    bias = combination.const if first.bias is None else algebra.exact(first.bias) + combination.const
    merged[0] = replace(first, bias=bias if bool(bias.any()) or first.bias is not None else None)
    removed = _removed(set(inner), terms)
    parts = len(merged) + len(others)  # the new layers and kept terms, summed by parts - 1 adds
    new_ops = len(merged) + parts - 1 + sum(abs(c) != 1.0 for _, c in others)
    if new_ops >= len(set(inner)) + len(removed):
        return False  # nothing to gain in executed ops (the tree is already one layer per input)
    positions = _positions(root, channel_dim)
    why = cost.why_costlier([_layer_cost(gm, n) for n in removed],
                            sum((cost.kernel_cost(m.weight, m.bias, positions) for m in merged), cost.Cost(0, 0)))
    if why is not None:
        raise Costlier(f"{ctx.label(root, 'sum')}: not folded into one layer: {why}", root)
    storage = terms[0].layers[-1].storage
    nodes = []
    for m in merged:
        first_read = min(m.source.users, key=position)
        before = first_read if position(first_read) < position(root) else root
        nodes.append(insert_layer(gm, m.spec, m.weight, m.bias, input=m.source, before=before, storage=storage,
                                  name=m.name, like=root))
    replace_node(root, _build_sum(ctx.graph, [(n, 1.0) for n in nodes] + others, root))
    return True


@register_pass("linear_combination", "fold sums of scaled outputs of affine layers of one input (a layer read "
                                     "several times, DoRA) into one layer")
def linear_combination(ctx: PassContext, node: fx.Node) -> bool:
    return _is_root(ctx.gm, node) and fold_combination(ctx, node)

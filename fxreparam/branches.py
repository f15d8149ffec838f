"""Sums of branches: read each term of a sum as a convolution of some input, and merge those that align.

RepVGG, ACNet, DBB and MobileOne blocks are sums whose terms are convs, BN-only branches and
the identity, all reading one tensor. :func:`sum_terms` flattens an add/sub tree into signed
terms; :func:`as_branch` reads a term as a conv of an input (a conv, a BN or per-channel affine
of something, an exact average pool, or the bare input itself); :func:`merge` checks
REPARAM §3's conditions and builds the single kernel with :mod:`fxreparam.algebra`; the
``branch_sum`` and ``identity`` passes rewrite the sums (``passes/branch_sum.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx

from . import algebra, cost, crops, ops
from .meta import Storage, concrete_shape, module_path, rank, storage
from .spec import ConvSpec, Layer

__all__ = ["Branch", "as_branch", "common_path", "identity_branch", "merge", "merge_within", "on_common_grid",
           "pool_as_conv", "stack", "sum_root", "sum_terms", "why_reads_differ"]


@dataclass(frozen=True)
class Branch:
    """``conv(input; weight, bias, spec)`` with a float64 kernel, standing for one term of a sum."""

    input: fx.Node
    spec: ConvSpec
    weight: torch.Tensor
    bias: torch.Tensor | None
    storage: Storage
    label: str
    name: str
    from_conv: bool = False  # a real conv of the model (not an identity, BN-only or pooling branch)
    unread_crop: crops.CropRead | None = None  # a crop of ``input`` that could not be read through (REPARAM §10)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.spec.groups

    def offset(self, d: int) -> int:
        """Twice the position of the kernel center relative to the output pixel's input origin."""
        return 2 * self.spec.padding[d] - self.spec.dilation[d] * (self.kernel_size[d] - 1)

    def scaled(self, coef: float) -> Branch:
        if coef == 1:
            return self
        return replace(self, weight=self.weight * coef, bias=None if self.bias is None else self.bias * coef)

    def cost(self) -> cost.Cost:
        """Weights and MACs per output position."""
        return cost.kernel_cost(self.weight, self.bias, 1)


def _channel_axis(node: fx.Node, dims: int) -> tuple[int, int] | None:
    """(channels, channel axis) of a node's value read by a ``dims``-d conv, where capture recorded its shape."""
    shape = concrete_shape(node)
    if shape is None or len(shape) not in (dims + 1, dims + 2):
        return None
    axis = 1 if len(shape) == dims + 2 else 0
    return shape[axis], axis


def identity_branch(node: fx.Node, dims: int) -> Branch | None:
    """The identity on ``node`` as a depthwise 1x1 conv with weight 1 (REPARAM §4), if its shape is known."""
    found, stored = _channel_axis(node, dims), storage(node)
    if found is None or stored is None:
        return None
    channels = found[0]
    spec = ConvSpec((1,) * dims, (0,) * dims, (1,) * dims, groups=channels)
    weight = algebra.identity_kernel(channels, 1, (1,) * dims)
    return Branch(node, spec, weight, None, stored, f"identity of {node.name}", module_path(node))


def pool_as_conv(gm: fx.GraphModule, node: fx.Node) -> Layer | None:
    """An exact average pool (REPARAM §7) as a depthwise conv with weight ``1/prod(k)``, if its channels are known."""
    pool = ops.avg_pool(gm, node)
    stored = storage(node)
    if pool is None or pool.why_not_conv or stored is None:
        return None
    dims = len(pool.kernel_size)
    found = _channel_axis(pool.input, dims)
    if found is None:
        return None
    channels = found[0]
    weight = algebra.cast_to(algebra.avg_pool_kernel(channels, pool.kernel_size), *stored)
    spec = ConvSpec(pool.stride, pool.padding, (1,) * dims, groups=channels)
    return Layer(node, pool.input, spec, weight, None, pool.name)


def _uncropped(branch: Branch) -> Branch:
    """``branch`` read through the symmetric crop of its input, where crop and padding compose into one padding
    (REPARAM §10); else as it is, noting why."""
    read = crops.read_through_crop(branch.input, branch.spec.padding)
    if read is None:
        return branch
    if read.padding is None:
        return replace(branch, unread_crop=read)
    return replace(branch, input=read.source, spec=replace(branch.spec, padding=read.padding))


def as_branch(gm: fx.GraphModule, node: fx.Node, dims: int | None = None) -> Branch | None:
    """Read ``node`` as a convolution of an earlier tensor: a conv, an exact average pool, or a BN or
    per-channel affine of a single-consumer branch (or, given the conv ``dims``, of a bare tensor)."""
    layer = ops.conv(gm, node) or pool_as_conv(gm, node)
    if layer is not None:
        if layer.transposed:
            return None
        is_conv = ops.conv(gm, node) is not None
        bias = algebra.exact(layer.bias) if layer.bias is not None else None
        kind = "conv" if is_conv else "avg-pool"
        branch = Branch(layer.input, layer.spec, algebra.exact(layer.weight), bias, layer.storage,
                        f"{kind} '{layer.name}'", layer.name, is_conv)
        return _uncropped(branch)
    affine = ops.channel_affine(gm, node)
    if affine is None:
        return None
    inner = as_branch(gm, affine.input, dims) if len(affine.input.users) == 1 else None
    if inner is None:
        if dims is None and affine.on_dim1 and rank(affine.node) is not None:
            dims = rank(affine.node) - 2  # a batch norm normalizes dim 1: a batched tensor
        inner = identity_branch(affine.input, dims) if dims is not None and dims > 0 else None
        if inner is None:
            return None
    ndim = rank(affine.node) or inner.spec.dims + 2
    vectors = affine.vectors(inner.out_channels, ndim, inner.spec.channel_dim(ndim), inner.storage[0])
    if isinstance(vectors, str):
        return None
    weight, bias = algebra.affine_after(inner.weight, inner.bias, vectors, groups=inner.spec.groups)
    kind = "bn" if affine.kind == "batch norm" else affine.kind
    return replace(inner, weight=weight, bias=bias, label=f"{kind} '{affine.name}' of {inner.label}", name=affine.name)


def why_reads_differ(source: fx.Node) -> str | None:
    """Why reads of ``source`` may not be merged into one read or moved to the first: it may be written in place
    between them (a ``symbolic_trace`` graph, REPARAM's effects); ``None`` where every read sees one value."""
    why = ops.opaque(source)
    return f"its branches read {source.name} at different points: {why}" if why else None


# ----------------------------------------------------------------------------- sums


def _absorbable(node: Any, *, root: bool) -> ops.Binary | None:
    """The add/sub at ``node`` if it can be flattened into its parent sum (or is the root of one)."""
    if not isinstance(node, fx.Node):
        return None
    b = ops.binary(node)
    if b is None or b.op not in ("add", "sub"):
        return None
    if not root and len(node.users) != 1:
        return None
    if b.inplace and not (isinstance(b.lhs, fx.Node) and set(b.lhs.users) == {node}):
        return None  # ``a += b`` where someone else still reads ``a``
    return b


def sum_root(node: fx.Node) -> bool:
    """Whether ``node`` is the top of an add/sub tree (not itself a term of a larger one)."""
    if _absorbable(node, root=True) is None:
        return False
    return not (len(node.users) == 1 and _absorbable(next(iter(node.users)), root=False) is not None)


def sum_terms(root: fx.Node) -> list[tuple[Any, float]]:
    """The terms of the add/sub tree at ``root`` with their coefficients (``a - 2*b`` gives (a, 1), (b, -2))."""
    terms: list[tuple[Any, float]] = []
    stack: list[tuple[Any, float, bool]] = [(root, 1.0, True)]
    while stack:
        node, coef, is_root = stack.pop()
        b = _absorbable(node, root=is_root)
        if b is None:
            terms.append((node, coef))
            continue
        stack.append((b.rhs, coef * b.alpha * (-1.0 if b.op == "sub" else 1.0), False))
        stack.append((b.lhs, coef, False))
    return terms


# ----------------------------------------------------------------------------- merging


def summed_with(node: fx.Node, fits: Callable[[fx.Node], bool]) -> bool:
    """Whether ``node`` is a term of a sum that also holds a term ``fits`` accepts: a layer that a rewrite of
    ``node`` will merge into at no cost (``branch_sum``; docs/identities.md s3)."""
    root = node
    while len(root.users) == 1 and (b := ops.binary(next(iter(root.users)))) is not None and b.op in ("add", "sub"):
        root = next(iter(root.users))
    if root is node or not sum_root(root):
        return False
    return any(isinstance(term, fx.Node) and term is not node and fits(term) for term, _ in sum_terms(root))


def conv_absorbs(gm: fx.GraphModule, source: fx.Node, kernel_size: tuple[int, ...], stride: tuple[int, ...],
                 groups: int) -> Callable[[fx.Node], bool]:
    """A sum term that is a conv of ``source`` at least as large as ``kernel_size``, of the same ``stride``, its
    groups dividing ``groups``: a conv of that kernel merges into it without growing it."""
    def fits(term: fx.Node) -> bool:
        b = as_branch(gm, term)
        return (b is not None and b.from_conv and b.input is source and b.spec.stride == tuple(stride)
                and groups % b.spec.groups == 0 and all(k >= c for k, c in zip(b.kernel_size, kernel_size)))
    return fits


def _why_incompatible(a: Branch, b: Branch, *, same_outputs: bool = True) -> str | None:
    """Why ``b`` cannot share one kernel with ``a`` (summed, REPARAM §3; or stacked on output channels with
    ``same_outputs=False``, REPARAM §10), or ``None``."""
    if len(a.kernel_size) != len(b.kernel_size):
        return "they have different spatial ranks"
    if a.in_channels != b.in_channels or (same_outputs and a.out_channels != b.out_channels):
        return f"channels differ ({a.in_channels}->{a.out_channels} vs {b.in_channels}->{b.out_channels})"
    if a.spec.stride != b.spec.stride:
        return f"strides differ ({a.spec.stride} vs {b.spec.stride})"
    for d in range(len(a.kernel_size)):
        if a.offset(d) != b.offset(d):
            return (f"their kernels do not share a center (padding {a.spec.padding} with kernel {a.kernel_size} vs "
                    f"padding {b.spec.padding} with kernel {b.kernel_size})")
        if (a.kernel_size[d] - b.kernel_size[d]) % 2:
            return f"kernel sizes {a.kernel_size} and {b.kernel_size} differ in parity: no common center"
    if any(a.spec.padding) and any(b.spec.padding) and a.spec.padding_mode != b.spec.padding_mode:
        return f"padding modes differ ({a.spec.padding_mode} vs {b.spec.padding_mode})"
    return None


def merge(branches: list[Branch]) -> tuple[Branch | None, list[tuple[Branch, str]]]:
    """Sum as many branches as align with the largest into one kernel; the rest come back with reasons.

    Branches merge at the coarsest dilation that holds all their taps (:func:`on_common_grid`): a dilated kxk
    with a 1x1, identity or BN branch stays dilated; different dilations spread to their gcd, each kernel with
    zeros between its taps (REPARAM §10: UniRepLKNet's small dilated kernels summed into a large one).
    Returns ``(merged, refused)``; ``merged`` is ``None`` unless at least two branches merged.
    """
    given = branches
    branches = on_common_grid(branches)
    original = {id(b): g for b, g in zip(branches, given)}  # refusals name the caller's own branches
    ordered = sorted(branches, key=lambda b: -math.prod(b.kernel_size))
    taken: list[Branch] = [ordered[0]]
    refused: list[tuple[Branch, str]] = []
    for b in ordered[1:]:
        why = next((w for t in taken if (w := _why_incompatible(t, b))), None)
        if why is None:
            taken.append(b)
        else:
            refused.append((original[id(b)], why))
    if len(taken) < 2:
        return None, refused
    big = taken[0]
    dims = range(len(big.kernel_size))
    groups = math.gcd(*[t.spec.groups for t in taken])
    kernel = tuple(max(t.kernel_size[d] for t in taken) for d in dims)  # 1x3 + 3x1 -> 3x3
    dilation = tuple(next((t.spec.dilation[d] for t in taken if t.kernel_size[d] > 1), 1) for d in dims)
    padding = tuple((big.offset(d) + dilation[d] * (kernel[d] - 1)) // 2 for d in dims)
    weight = algebra.sum_centered([(t.weight, t.spec.groups) for t in taken], groups, kernel)
    biases = [t.bias for t in taken if t.bias is not None]
    bias = algebra.sum_kernels(biases) if biases else None
    mode = next((t.spec.padding_mode for t in taken if any(t.spec.padding)), "zeros")
    spec = ConvSpec(big.spec.stride, padding, dilation, groups, padding_mode=mode)
    stored = next((t.storage for t in taken if t.from_conv), big.storage)
    name = common_path([t.name for t in taken]) or big.name
    label = " + ".join(t.label for t in taken)
    return Branch(big.input, spec, weight, bias, stored, label, name, any(t.from_conv for t in taken)), refused


def _span(b: Branch, d: int) -> int:
    """The input pixels ``b``'s kernel covers along spatial dim ``d`` (its dilated extent)."""
    return b.spec.dilation[d] * (b.kernel_size[d] - 1) + 1


def _holds(host: Branch, b: Branch) -> bool:
    """Whether ``b``'s kernel lies inside ``host``'s: no wider on any dim, its taps on ``host``'s grid, its groups a
    multiple of ``host``'s, and the two aligned (REPARAM §3); summed into ``host`` it adds no weight and no MAC."""
    if host.spec.dims != b.spec.dims or b.spec.groups % host.spec.groups:
        return False
    for d in range(host.spec.dims):
        if _span(b, d) > _span(host, d) or (b.kernel_size[d] > 1 and b.spec.dilation[d] % host.spec.dilation[d]):
            return False
    return _why_incompatible(*on_common_grid([host, b])) is None


def merge_within(branches: list[Branch]) -> list[tuple[Branch, list[Branch]]]:
    """Of a sum that does not merge whole, each branch merged with those whose kernels lie inside it (REPARAM §3),
    largest host first, each branch merged at most once: ``(merged, the branches it sums, host first)`` per host
    that absorbed any; the other branches stay as they are."""
    ordered = sorted(branches, key=lambda b: -math.prod(_span(b, d) for d in range(b.spec.dims)))
    hosts: list[list[Branch]] = []
    for b in ordered:
        group = next((g for g in hosts if _holds(g[0], b)), None)
        if group is None:
            hosts.append([b])
        else:
            group.append(b)
    found = []
    for group in (g for g in hosts if len(g) > 1):
        merged, refused = merge(group)
        if merged is not None:
            found.append((merged, [b for b in group if all(b is not r for r, _ in refused)]))
    return found


def stack(parts: list[Branch]) -> tuple[Branch | None, str | None]:
    """The one conv whose output channels are ``parts``' stacked in order (DBB's concatenation, REPARAM §10):
    kernels center-padded to the largest; or why the parts cannot share one conv."""
    parts = on_common_grid(parts)
    if any(b.spec.groups != 1 for b in parts):
        return None, "grouped convs do not stack into one conv's groups"
    big = max(parts, key=lambda b: math.prod(b.kernel_size))
    why = next((w for b in parts if (w := _why_incompatible(big, b, same_outputs=False))), None)
    if why is not None:
        return None, why
    dims = range(len(big.kernel_size))
    kernel = tuple(max(b.kernel_size[d] for b in parts) for d in dims)
    dilation = tuple(next((b.spec.dilation[d] for b in parts if b.kernel_size[d] > 1), 1) for d in dims)
    padding = tuple((big.offset(d) + dilation[d] * (kernel[d] - 1)) // 2 for d in dims)
    weight = torch.cat([algebra.center_pad(b.weight, kernel) for b in parts])
    bias = None if all(b.bias is None for b in parts) else torch.cat(
        [b.bias if b.bias is not None else b.weight.new_zeros(b.out_channels) for b in parts])
    mode = next((b.spec.padding_mode for b in parts if any(b.spec.padding)), "zeros")
    spec = ConvSpec(big.spec.stride, padding, dilation, 1, padding_mode=mode)
    name = common_path([b.name for b in parts]) or big.name
    return Branch(big.input, spec, weight, bias, big.storage, " | ".join(b.label for b in parts), name, True), None


def _grid(branches: list[Branch]) -> tuple[int, ...]:
    """Per dim, the coarsest dilation whose grid holds every branch's taps: the gcd of the dilations of the
    kernels wider than one tap there (a 1x1, identity or BN branch is a centre tap on any grid)."""
    dims = range(len(branches[0].kernel_size))
    return tuple(math.gcd(*[b.spec.dilation[d] for b in branches if b.kernel_size[d] > 1]) or 1 for d in dims)


def _on_grid(b: Branch, grid: tuple[int, ...]) -> Branch:
    """``b`` as a conv at dilation ``grid`` (same function, same kernel center): its taps spread by
    ``dilation / grid`` with zeros between them (REPARAM §10)."""
    spread = tuple(d // g if k > 1 else 1 for d, g, k in zip(b.spec.dilation, grid, b.kernel_size))
    weight = algebra.undilate(b.weight, spread) if any(s > 1 for s in spread) else b.weight
    return replace(b, spec=replace(b.spec, dilation=grid), weight=weight)


def on_common_grid(branches: list[Branch]) -> list[Branch]:
    """``branches`` re-expressed at one dilation per spatial rank, the coarsest that fits them all (UniRepLKNet's
    mixed dilations spread to their gcd; a dilated kxk with a 1x1 or identity stays dilated)."""
    grids = {dims: _grid([b for b in branches if b.spec.dims == dims]) for dims in {b.spec.dims for b in branches}}
    return [_on_grid(b, grids[b.spec.dims]) for b in branches]


def common_path(paths: list[str]) -> str:
    """The longest dotted module path that ``paths`` all start with (the merged layer's name)."""
    parts = [p.split(".") for p in paths]
    common: list[str] = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return ".".join(common)

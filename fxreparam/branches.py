"""Sums of branches: read each term of a sum as a convolution of some input, and merge those that align.

RepVGG, ACNet, DBB and MobileOne blocks are sums whose terms are convs, BN-only branches and
the identity, all reading one tensor. :func:`sum_terms` flattens an add/sub tree into signed
terms; :func:`as_branch` reads a term as a conv of an input (a conv, a BN or per-channel affine
of something, an exact average pool, or the bare input itself); :func:`merge` checks
REPARAM §3's conditions and builds the single kernel with :mod:`fxreparam.algebra`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from . import algebra, ops

__all__ = ["Branch", "as_branch", "as_conv_spec", "identity_branch", "merge", "pool_as_conv", "sum_root",
           "sum_terms"]


@dataclass(frozen=True)
class Branch:
    """``conv(input; weight, bias, ...)`` in float64, standing for one term of a sum."""

    input: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    label: str
    name: str
    like: torch.Tensor  # a tensor of the model's dtype and device, to store the merged kernel as
    from_conv: bool = False  # a real conv of the model (not an identity, BN-only or pooling branch)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    def offset(self, d: int) -> int:
        """Twice the position of the kernel center relative to the output pixel's input origin."""
        return 2 * self.padding[d] - self.dilation[d] * (self.kernel_size[d] - 1)

    def scaled(self, coef: float) -> Branch:
        bias = None if self.bias is None else self.bias * coef
        return _replace(self, weight=self.weight * coef, bias=bias)


def _replace(b: Branch, **changes: Any) -> Branch:
    return Branch(**{**b.__dict__, **changes})


def _channels(node: fx.Node) -> tuple[int, int] | None:
    """(channels, rank) of a node's value, where capture recorded its shape."""
    shape = ops.concrete_shape(node)
    if shape is None or len(shape) < 3:
        return None
    return int(shape[1]), len(shape)


def identity_branch(node: fx.Node, like: torch.Tensor) -> Branch | None:
    """The identity on ``node`` as a depthwise 1x1 conv with weight 1 (REPARAM §4), if its shape is known."""
    found = _channels(node)
    if found is None:
        return None
    channels, rank = found
    dims = rank - 2
    weight = torch.ones(channels, 1, *[1] * dims, dtype=torch.float64)
    return Branch(node, weight, None, (1,) * dims, (0,) * dims, (1,) * dims, channels, "zeros",
                  f"identity of {node.name}", ops.module_path(node), like)


def as_branch(gm: fx.GraphModule, node: fx.Node) -> Branch | None:
    """Read ``node`` as a convolution of an earlier tensor: a conv, a BN or per-channel affine of a
    single-consumer branch (or of a tensor: a Dirac kernel), or an exact average pool; else ``None``."""
    conv = ops.conv(gm, node)
    if conv is not None:
        if conv.transposed:
            return None
        bias = algebra.exact(conv.bias) if conv.bias is not None else None
        return Branch(conv.input, algebra.exact(conv.weight), bias, conv.stride, conv.padding, conv.dilation,
                      conv.groups, conv.padding_mode, f"conv '{conv.name}'", conv.name, conv.weight, True)
    pool = pool_as_conv(gm, node)
    if pool is not None:
        like = torch.empty(0, dtype=pool.weight.dtype, device=pool.weight.device)
        return Branch(pool.input, algebra.exact(pool.weight), None, pool.stride, pool.padding, pool.dilation,
                      pool.groups, "zeros", f"avg-pool '{pool.name}'", pool.name, like)
    affine = ops.channel_affine(gm, node)
    if affine is None:
        return None
    inner = as_branch(gm, affine.input) if len(affine.input.users) == 1 else None
    if inner is None:
        like = ops.like(affine.node)
        inner = identity_branch(affine.input, like) if like is not None else None
        if inner is None:
            return None
    found = _channels(affine.input) if inner.label.startswith("identity") else None
    ndim = found[1] if found else inner.weight.dim()
    vectors = affine.vectors(inner.out_channels, ndim, 1, inner.like.dtype)
    if isinstance(vectors, str):
        return None
    scale, shift = vectors
    weight, bias = algebra.affine_after(inner.weight, inner.bias, (scale, shift), groups=inner.groups)
    kind = "bn" if affine.kind == "batch norm" else affine.kind
    return _replace(inner, weight=weight, bias=bias, label=f"{kind} '{affine.name}' of {inner.label}",
                    name=affine.name)


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


def _why_incompatible(a: Branch, b: Branch) -> str | None:
    """Why ``b`` cannot be summed into the same kernel as ``a`` (REPARAM §3), or ``None``."""
    if len(a.kernel_size) != len(b.kernel_size):
        return "they have different spatial ranks"
    if (a.out_channels, a.in_channels) != (b.out_channels, b.in_channels):
        return (f"channels differ ({a.in_channels}->{a.out_channels} vs {b.in_channels}->{b.out_channels})")
    if a.stride != b.stride:
        return f"strides differ ({a.stride} vs {b.stride})"
    for d in range(len(a.kernel_size)):
        if a.kernel_size[d] > 1 and b.kernel_size[d] > 1 and a.dilation[d] != b.dilation[d]:
            return f"dilations differ ({a.dilation} vs {b.dilation})"
        if a.offset(d) != b.offset(d):
            return (f"their kernels do not share a center (padding {a.padding} with kernel {a.kernel_size} vs "
                    f"padding {b.padding} with kernel {b.kernel_size})")
        if (a.kernel_size[d] - b.kernel_size[d]) % 2:
            return f"kernel sizes {a.kernel_size} and {b.kernel_size} differ in parity: no common center"
    if any(a.padding) and any(b.padding) and a.padding_mode != b.padding_mode:
        return f"padding modes differ ({a.padding_mode} vs {b.padding_mode})"
    return None


def merge(branches: list[Branch]) -> tuple[Branch | None, list[tuple[Branch, str]]]:
    """Sum as many branches as align with the largest into one kernel; the rest come back with reasons.

    Returns ``(merged, refused)``; ``merged`` is ``None`` unless at least two branches merged.
    """
    ordered = sorted(branches, key=lambda b: -math.prod(b.kernel_size))
    taken: list[Branch] = [ordered[0]]
    refused: list[tuple[Branch, str]] = []
    for b in ordered[1:]:
        why = next((w for t in taken if (w := _why_incompatible(t, b))), None)
        if why is None:
            taken.append(b)
        else:
            refused.append((b, why))
    if len(taken) < 2:
        return None, refused
    big = taken[0]
    dims = range(len(big.kernel_size))
    groups = math.gcd(*[t.groups for t in taken])
    kernel = tuple(max(t.kernel_size[d] for t in taken) for d in dims)  # 1x3 + 3x1 -> 3x3
    dilation = tuple(next((t.dilation[d] for t in taken if t.kernel_size[d] > 1), 1) for d in dims)
    padding = tuple((big.offset(d) + dilation[d] * (kernel[d] - 1)) // 2 for d in dims)
    weight = algebra.sum_kernels([algebra.center_pad(algebra.regroup(t.weight, t.groups, groups), kernel)
                                  for t in taken])
    biases = [t.bias for t in taken if t.bias is not None]
    bias = algebra.sum_kernels(biases) if biases else None
    mode = next((t.padding_mode for t in taken if any(t.padding)), "zeros")
    like = next((t.like for t in taken if t.like.numel()), big.like)
    name = _common_path([t.name for t in taken]) or big.name
    label = " + ".join(t.label for t in taken)
    from_conv = any(t.from_conv for t in taken)
    return Branch(big.input, weight, bias, big.stride, padding, dilation, groups, mode, label, name, like,
                  from_conv), refused


def _common_path(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common: list[str] = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return ".".join(common)


def as_conv_spec(branch: Branch, node: fx.Node) -> ops.Conv:
    """The merged branch as a conv description that :func:`fxreparam.graph.insert_layer` can build."""
    return ops.Conv(node, branch.input, branch.like, branch.bias, branch.stride, branch.padding, branch.dilation,
                    branch.groups, False, (), branch.padding_mode, branch.name)


def pool_as_conv(gm: fx.GraphModule, node: fx.Node) -> ops.Conv | None:
    """An exact average pool (REPARAM §7) as a depthwise conv with weight ``1/prod(k)``, if its channels are known."""
    pool = ops.avg_pool(gm, node)
    if pool is None or pool.why_not_conv:
        return None
    found = _channels(pool.input)
    if found is None or found[1] - 2 != len(pool.kernel_size):
        return None
    like = ops.like(node)
    if like is None:
        like = torch.empty(0)
    weight = torch.full((found[0], 1, *pool.kernel_size), 1.0 / math.prod(pool.kernel_size), dtype=like.dtype,
                        device=like.device)
    dims = len(pool.kernel_size)
    return ops.Conv(node, pool.input, weight, None, pool.stride, pool.padding, (1,) * dims, found[0], False, (),
                    "zeros", pool.name)

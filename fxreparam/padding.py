"""Recognize a tensor padded with per-channel constants, by its values (DBB's BN-and-pad).

DBB pads a BN output with zeros and then writes the BN's shift into the border through
slice assignments; in a graph that is a constant pad followed by in-place copies into views
of it. Rather than match one spelling, :func:`padded_by_value` accepts any chain of pure
data-movement ops (views, slices, copies, fills of constants) applied to a constant pad, and
runs it on two probes: zeros give the border, distinct random values prove every interior
element is the source element. Data-movement ops cannot compute, so two probes are a proof.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from . import ops

__all__ = ["BorderPad", "padded_by_value"]

_VIEW_OPS = {"slice", "select", "narrow", "view", "expand", "unsqueeze", "squeeze", "alias", "getitem"}
_FILL_OPS = {"copy_", "fill_", "setitem"}
_SOURCE_OPS = _VIEW_OPS | {"expand_as", "reshape", "detach", "clone", "to"}


def _int_value(node: fx.Node) -> int | None:
    """The example value of a shape query (``x.size(0)``, ``aten.sym_size``), from capture's metadata."""
    val = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(val, int) and not isinstance(val, bool):
        return val
    if isinstance(val, torch.SymInt):
        return val.node.hint
    return None


def _constant_source(node: fx.Node, sources: set[fx.Node]) -> bool:
    """Whether ``node`` is built from stored constants and shape queries by view-like ops alone."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n in sources:
            continue
        if n.op == "get_attr" or _int_value(n) is not None:
            sources.add(n)
        elif n.op in ("call_function", "call_method") and _name(n) in _SOURCE_OPS:
            sources.add(n)
            stack.extend(n.all_input_nodes)
        else:
            return False
    return True


@dataclass(frozen=True)
class BorderPad:
    """``node`` equals ``input`` zero-padded by ``pads`` (F.pad order) with ``border[c]`` written in the border."""

    node: fx.Node
    input: fx.Node
    pads: tuple[int, ...]
    border: torch.Tensor
    mutators: tuple[fx.Node, ...]  # the in-place writes, to erase with the pad once it is folded away


def _name(node: fx.Node) -> str:
    target = node.target
    if target is operator.getitem:
        return "getitem"
    if target is operator.setitem:
        return "setitem"
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _mutation_chain(pad: fx.Node, reader: fx.Node, sources: set[fx.Node]) -> list[fx.Node] | None:
    """Every node besides ``reader`` that touches ``pad``: views of it ending in fills of constants
    (whose inputs, built from constants and shape queries, are collected in ``sources``)."""
    chain: list[fx.Node] = []
    stack = [u for u in pad.users if u is not reader]
    while stack:
        n = stack.pop()
        kind = _name(n)
        if n.op not in ("call_function", "call_method") or kind not in _VIEW_OPS | _FILL_OPS:
            return None
        if not all(i is pad or i in chain or _constant_source(i, sources) for i in n.all_input_nodes):
            return None  # something besides constants and views of the pad feeds it
        chain.append(n)
        if kind in _VIEW_OPS:
            stack.extend(n.users)
        elif n.users:
            return None
    return chain


def padded_by_value(gm: fx.GraphModule, node: fx.Node, reader: fx.Node) -> BorderPad | None:
    """Recognize ``node`` (read by ``reader``) as its source padded with a per-channel constant border."""
    pad = ops.constant_pad(node)
    if pad is None:
        return None
    sources: set[fx.Node] = set()
    chain = _mutation_chain(node, reader, sources)
    shape = ops.concrete_shape(pad.input)
    if chain is None or shape is None or len(shape) < 3 or len(pad.pads) != 2 * (len(shape) - 2):
        return None
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    if any(order[n] > order[reader] for n in chain):
        return None  # a write after the read does not shape what the reader sees
    dtype = torch.float64  # probes hold distinct integers exactly whatever the model's dtype
    zeros = torch.zeros(shape, dtype=dtype)
    probe = torch.randperm(zeros.numel()).reshape(shape).to(dtype) + 1  # distinct, nonzero values
    out_zero, out_probe = (_run(gm, pad, [*sources, *chain], x, order) for x in (zeros, probe))
    if out_zero is None or out_probe is None:
        return None
    mask = F.pad(torch.zeros(shape, dtype=torch.bool), list(pad.pads), value=True)
    border = out_zero[(0, slice(None), *([0] * (len(shape) - 2)))].clone()
    expected_zero = torch.where(mask, border.view(1, -1, *[1] * (len(shape) - 2)).expand_as(out_zero), 0)
    if not torch.equal(out_zero, expected_zero.to(out_zero.dtype)):
        return None
    if not torch.equal(out_probe, F.pad(probe, list(pad.pads)) + expected_zero.to(dtype)):
        return None
    return BorderPad(node, pad.input, pad.pads, border.to(torch.float64), tuple(chain))


def _run(gm: fx.GraphModule, pad: ops.Pad, nodes: list[fx.Node], x: torch.Tensor,
         order: dict[fx.Node, int]) -> torch.Tensor | None:
    """Evaluate the pad, its constant sources and its in-place writes on ``x``; the padded tensor afterwards."""
    env: dict[fx.Node, object] = {}
    try:
        env[pad.node] = F.pad(x, list(pad.pads), value=pad.value)
        for n in sorted(nodes, key=order.__getitem__):
            if n.op == "get_attr":
                env[n] = ops.fetch_attr(gm, n.target)
                continue
            if _int_value(n) is not None:
                env[n] = _int_value(n)
                continue
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
            if n.op == "call_method":
                env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                env[n] = n.target(*args, **kwargs)
    except Exception:
        return None
    return env[pad.node]

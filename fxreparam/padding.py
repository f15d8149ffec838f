"""Recognize a tensor padded with per-channel constants, by its values (DBB's BN-and-pad).

DBB pads a BN output with zeros and then writes the BN's shift into the border through slice
assignments; in a functional graph that is a constant pad followed by ``slice_scatter``/``copy``
data flow. Rather than match one spelling, :func:`padded_by_value` accepts any subgraph of pure
data-movement ops (views, slices, scatters, copies, fills of constants) between one constant pad
and the tensor a conv reads, and runs it on two probes: zeros give the border, distinct values
prove every interior element is the source element. Data-movement ops cannot compute, so two
probes are a proof.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from . import evaluate, ops
from .graph import position
from .meta import concrete_shape, recorded_value

__all__ = ["BorderPad", "padded_by_value"]

_DATA_MOVEMENT = {"slice", "select", "narrow", "view", "expand", "unsqueeze", "squeeze", "alias", "getitem",
                  "slice_scatter", "select_scatter", "copy", "fill", "clone", "expand_as", "reshape", "detach",
                  "lift_fresh_copy", "_to_copy", "to", "contiguous"}


def _int_value(node: fx.Node) -> int | None:
    """The example value of a shape query (``x.size(0)``, ``aten.sym_size``), from capture's metadata."""
    val = recorded_value(node)
    if isinstance(val, int) and not isinstance(val, bool):
        return val
    if isinstance(val, torch.SymInt):
        return val.node.hint
    return None


def _name(node: fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    name = getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0]


@dataclass(frozen=True)
class BorderPad:
    """``node`` equals ``input`` zero-padded by ``pads`` (F.pad order) with ``border[c]`` written in the border."""

    node: fx.Node
    input: fx.Node
    pads: tuple[int, ...]
    border: torch.Tensor


def _subgraph(node: fx.Node) -> tuple[ops.Pad, list[fx.Node], list[fx.Node]] | None:
    """The one constant pad that ``node`` is built from, the data-movement ops in between, and the stored
    constants and shape queries they read; ``None`` if anything else feeds ``node``."""
    pad: ops.Pad | None = None
    between: list[fx.Node] = []
    leaves: list[fx.Node] = []
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if ops.opaque(n):
            return None
        found = ops.constant_pad(n)
        if found is not None:
            if pad is not None and pad.node is not n:
                return None
            pad = found
        elif n.op == "get_attr" or _int_value(n) is not None:
            leaves.append(n)
        elif n.op in ("call_function", "call_method") and _name(n) in _DATA_MOVEMENT and evaluate.deterministic(n):
            between.append(n)
            stack.extend(n.all_input_nodes)
        else:
            return None
    return (pad, between, leaves) if pad is not None else None


def padded_by_value(gm: fx.GraphModule, node: fx.Node, reader: fx.Node) -> BorderPad | None:
    """Recognize ``node`` (read by ``reader`` alone) as a tensor padded with a per-channel constant border."""
    found = _subgraph(node)
    if found is None:
        return None
    pad, between, leaves = found
    allowed = {*between, reader}
    if any(not set(n.users) <= allowed for n in [pad.node, *between]):
        return None  # part of the padded tensor is read elsewhere too
    shape = concrete_shape(pad.input)
    if shape is None or len(shape) < 3 or len(pad.pads) != 2 * (len(shape) - 2) or any(p < 0 for p in pad.pads):
        return None
    if 0 in shape:
        shape = tuple(s or 1 for s in shape)  # an empty example: probe one element per empty dim
    dtype = torch.float64  # probes hold distinct integers exactly whatever the model's dtype
    zeros = torch.zeros(shape, dtype=dtype)
    probe = torch.randperm(zeros.numel()).reshape(shape).to(dtype) + 1  # distinct, nonzero values
    out_zero, out_probe = (_run(gm, pad, node, [*leaves, *between], x) for x in (zeros, probe))
    if out_zero is None or out_probe is None or out_zero.shape != F.pad(zeros, list(pad.pads)).shape:
        return None
    mask = F.pad(torch.zeros(shape, dtype=torch.bool), list(pad.pads), value=True)
    border = out_zero[(0, slice(None), *([0] * (len(shape) - 2)))].clone()
    expected_zero = torch.where(mask, border.view(1, -1, *[1] * (len(shape) - 2)).expand_as(out_zero), 0)
    if not torch.equal(out_zero, expected_zero.to(out_zero.dtype)):
        return None
    if not torch.equal(out_probe, F.pad(probe, list(pad.pads)) + expected_zero.to(dtype)):
        return None
    return BorderPad(node, pad.input, pad.pads, border.to(torch.float64))


def _run(gm: fx.GraphModule, pad: ops.Pad, node: fx.Node, nodes: list[fx.Node], x: torch.Tensor
         ) -> torch.Tensor | None:
    """Evaluate the pad of ``x`` and the ops after it up to ``node``; ``node``'s value."""
    env: dict[fx.Node, object] = {pad.node: F.pad(x, list(pad.pads), value=pad.value)}
    env.update((n, _int_value(n)) for n in nodes if n.op != "get_attr" and _int_value(n) is not None)
    try:
        evaluate.run(gm, sorted(nodes, key=position), env)
        value = env[node]
    except Exception:
        return None
    return value.to(torch.float64) if isinstance(value, torch.Tensor) else None

"""One evaluator for values known before the forward runs: constant subgraphs and padded borders.

``fold_constants`` evaluates subgraphs that read only stored tensors, and the border-pad
recognizer runs a pad and its writes on probe tensors; both run nodes through :func:`run`.
Whether a node may be evaluated ahead of time is read from the op itself (``node.is_impure()``,
schema mutability, ``torch.Tag.nondeterministic_seeded``), not from its name.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

from .meta import fetch_attr

__all__ = ["deterministic", "run"]

_SAFE_MODULES = (torch, torch.nn.functional, torch.Tensor, operator, builtins, math)


def _aten_overloads(name: str) -> list[Any]:
    """The aten overloads of an op spelled ``name`` (a torch function or Tensor method), if aten has it."""
    packet = getattr(torch.ops.aten, name, None)
    if packet is None or not hasattr(packet, "overloads"):
        return []
    return [getattr(packet, o) for o in packet.overloads()]


def deterministic(node: fx.Node) -> bool:
    """Whether running ``node`` ahead of time gives the value the forward would: pure, not random, no effect."""
    if node.op not in ("call_function", "call_method") or node.is_impure():
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags
    if isinstance(target, torch._ops.OpOverloadPacket):
        overloads = [getattr(target, o) for o in target.overloads()]
    else:
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        if not isinstance(target, str) and not any(getattr(m, name, None) is target for m in _SAFE_MODULES):
            return False  # a Python function of the user's: it may do anything
        if name.endswith("_") and not name.endswith("__"):
            return False  # writes in place
        if "rand" in name or name.startswith("_assert"):
            return False
        overloads = _aten_overloads(name)
    # A torch function or method stands for all its overloads (their out= forms write, but this call does not).
    return not any(torch.Tag.nondeterministic_seeded in op.tags for op in overloads)


def run(gm: fx.GraphModule, nodes: Iterable[fx.Node], env: dict[fx.Node, Any]) -> dict[fx.Node, Any]:
    """Evaluate ``nodes`` (in graph order) into ``env``, whose entries give the values of their inputs."""
    for node in nodes:
        if node in env:
            continue
        if node.op == "get_attr":
            env[node] = fetch_attr(gm, node.target)
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
        if node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            raise ValueError(f"cannot evaluate {node.op} node {node.name} ahead of time")
    return env

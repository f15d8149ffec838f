"""One evaluator for values known before the forward runs: constant subgraphs and padded borders.

``fold_constants`` evaluates subgraphs that read only stored tensors, and the border-pad
recognizer runs a pad and its writes on probe tensors; both run nodes through :func:`run`.
A node is evaluated ahead of time only where its op is known to be deterministic and pure (an
allowlist, not "not tagged random"): an aten op whose schema is functional, not tagged
``nondeterministic_seeded`` and not of a random or uninitialized-memory family; a torch function
or Tensor method that resolves to such aten ops; pure Python operators. Anything unknown runs in
the forward. :func:`run` checks the aten ops each evaluation dispatches against the same list,
so a torch function written in Python (``F.normalize``, ``F.gumbel_softmax``) is judged by what it does.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .meta import fetch_attr

__all__ = ["NotDeterministic", "deterministic", "run"]

# Name parts of aten ops that draw random numbers or return uninitialized memory, whether or not they carry the
# tag (``aten.empty_like`` carries none), and of ops that exist for their effect.
_RANDOM_FAMILIES = frozenset({
    "rand", "randn", "randint", "randperm", "bernoulli", "poisson", "normal", "multinomial", "binomial", "dropout",
    "uniform", "exponential", "cauchy", "geometric", "random", "rrelu", "noise", "gamma", "dirichlet", "gumbel",
    "empty", "seed", "assert", "print",
})
_UNSAFE_TAGS = (torch.Tag.nondeterministic_seeded, torch.Tag.inplace_view)
_PURE_OPERATORS = frozenset({
    operator.getitem, operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
    operator.pow, operator.neg, operator.pos, operator.abs, operator.matmul, operator.eq, operator.ne, operator.lt,
    operator.le, operator.gt, operator.ge, operator.and_, operator.or_, operator.xor, operator.invert, operator.not_,
    builtins.getattr, builtins.len, builtins.int, builtins.float, builtins.bool, builtins.min, builtins.max,
    builtins.abs, builtins.round, builtins.sum, builtins.tuple, builtins.list, builtins.slice,
})
# Tensor methods that have no aten op of their own name and only convert (their aten ops are checked in run).
_CONVERSION_METHODS = frozenset({"float", "double", "half", "bfloat16", "int", "long", "short", "bool", "byte",
                                 "char", "type"})
_PYTHON_TORCH_MODULES = ("torch.nn.functional", "torch.functional")


class NotDeterministic(RuntimeError):
    """An evaluation ahead of time dispatched an op that is not known deterministic and pure."""


def _random_family(name: str) -> bool:
    return not _RANDOM_FAMILIES.isdisjoint(name.lower().strip("_").split("_"))


def _pure_overload(op: torch._ops.OpOverload, *, allow_out: bool = False) -> bool:
    """Whether an aten overload is functional, unseeded-deterministic and of no random or effect family."""
    if op.namespace != "aten" or any(tag in op.tags for tag in _UNSAFE_TAGS):
        return False
    return (allow_out or not op._schema.is_mutable) and not _random_family(op._schema.name.split("::")[-1])


def _pure_packet(name: str) -> bool:
    """Whether the aten op spelled ``name`` exists and every overload is pure (their ``out=`` forms write, but a
    call without ``out=`` does not)."""
    packet = getattr(torch.ops.aten, name, None)
    if packet is None or not hasattr(packet, "overloads") or not packet.overloads():
        return False
    return all(_pure_overload(getattr(packet, o), allow_out=True) for o in packet.overloads())


def _torch_function_name(target: Any) -> str | None:
    """The name of ``target`` if it is torch's own function (top level, ``torch.nn.functional``, a Tensor method)."""
    name = getattr(target, "__name__", "")
    homes = (torch, torch.nn.functional, torch.Tensor, torch.linalg, torch.special, torch.fft)
    return name if name and any(getattr(home, name, None) is target for home in homes) else None


def deterministic(node: fx.Node) -> bool:
    """Whether running ``node`` ahead of time gives the value the forward would: pure, not random, no effect."""
    if node.op not in ("call_function", "call_method") or node.is_impure() or node.kwargs.get("out") is not None:
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return _pure_overload(target)
    if isinstance(target, torch._ops.OpOverloadPacket):
        return _pure_packet(target.__name__)
    if node.op == "call_method":
        return not target.endswith("_") and (_pure_packet(target) or target in _CONVERSION_METHODS)
    if target in _PURE_OPERATORS or getattr(target, "__module__", None) == "math":
        return True
    name = _torch_function_name(target)
    if name is None or name.endswith("_") or _random_family(name):
        return False  # a Python function of the user's (it may do anything), or one that writes or draws
    return _pure_packet(name) or getattr(target, "__module__", None) in _PYTHON_TORCH_MODULES


def _written(func: torch._ops.OpOverload, args: tuple, kwargs: dict[str, Any]) -> list[Any]:
    """The arguments an aten call writes in place: its schema's mutable ones."""
    bound = dict(zip((a.name for a in func._schema.arguments), args))
    bound.update(kwargs)
    return [bound.get(a.name) for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write]


class _OnlyPure(TorchDispatchMode):
    """Raises :class:`NotDeterministic` at the first aten op that is not pure, or that writes a tensor the
    evaluation did not create (an in-place op on a fresh result is pure)."""

    def __init__(self) -> None:
        super().__init__()
        self.fresh: dict[int, torch.Tensor] = {}  # by id, holding them so no id is reused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _pure_overload(func, allow_out=True):
            raise NotDeterministic(f"{func} is not known to be deterministic and pure")
        if any(isinstance(t, torch.Tensor) and id(t) not in self.fresh for t in _written(func, args, kwargs)):
            raise NotDeterministic(f"{func} writes a tensor in place")
        out = func(*args, **kwargs)
        self.fresh.update((id(t), t) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def run(gm: fx.GraphModule, nodes: Iterable[fx.Node], env: dict[fx.Node, Any]) -> dict[fx.Node, Any]:
    """Evaluate ``nodes`` (in graph order) into ``env``, whose entries give the values of their inputs; raises
    :class:`NotDeterministic` where an op dispatches anything but pure, deterministic aten ops."""
    for node in nodes:
        if node in env:
            continue
        if node.op == "get_attr":
            env[node] = fetch_attr(gm, node.target)
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
        with _OnlyPure():
            if node.op == "call_function":
                env[node] = node.target(*args, **kwargs)
            elif node.op == "call_method":
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                raise ValueError(f"cannot evaluate {node.op} node {node.name} ahead of time")
    return env

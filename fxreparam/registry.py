"""The pass registry: a decorator names a rewrite pass, describes it in a line and places it in the order.

Built-in passes live in ``fxreparam.passes`` and register on import; a user registers
their own the same way::

    @fxreparam.register_pass("my_fold", "fold my op into the conv before it", order=45)
    def my_fold(ctx: fxreparam.PassContext) -> int:
        ...  # rewrite ctx.gm.graph, call ctx.refuse(node, why) where a match is not exact
        return rewrites
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from .ops import module_path

__all__ = ["Pass", "PassContext", "Refusal", "get_pass", "list_passes", "register_pass", "unregister_pass"]


@dataclass(frozen=True)
class Refusal:
    """A match a pass declined to fold because the fold would not be exact, with the reason."""

    pass_name: str
    node: str
    reason: str

    def __str__(self) -> str:
        return f"[{self.pass_name}] {self.reason}"


@dataclass
class PassContext:
    """What a pass sees: the graph module to rewrite, and a place to report refusals."""

    gm: fx.GraphModule
    pass_name: str = ""
    refusals: dict[tuple[str, str], Refusal] = field(default_factory=dict)

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def refuse(self, node: fx.Node, reason: str) -> None:
        """Record that ``node`` matched but was left alone, and why (shown in the report)."""
        self.refusals[(self.pass_name, node.name)] = Refusal(self.pass_name, node.name, reason)

    def label(self, node: fx.Node, kind: str | None = None) -> str:
        """``kind 'model.path'``: how messages name a node."""
        return f"{kind or node.name} '{module_path(node)}'"


PassFn = Callable[[PassContext], int]


@dataclass(frozen=True)
class Pass:
    """A registered rewrite: ``fn(ctx)`` rewrites ``ctx.gm`` in place and returns its number of rewrites."""

    name: str
    description: str
    fn: PassFn
    order: int

    def __call__(self, ctx: PassContext) -> int:
        ctx.pass_name = self.name
        with torch.no_grad():
            return int(self.fn(ctx))


_REGISTRY: dict[str, Pass] = {}


def register_pass(name: str, description: str, *, order: int = 100, replace: bool = False
                  ) -> Callable[[PassFn], PassFn]:
    """Register ``fn`` as the pass ``name``; passes run by ascending ``order``, to a fixpoint."""

    def decorate(fn: PassFn) -> PassFn:
        if name in _REGISTRY and not replace and _REGISTRY[name].fn is not fn:
            raise ValueError(f"a pass named {name!r} is already registered (pass replace=True to override)")
        _REGISTRY[name] = Pass(name, description, fn, order)
        return fn

    return decorate


def unregister_pass(name: str) -> None:
    """Remove a registered pass."""
    _REGISTRY.pop(name, None)


def get_pass(name: str) -> Pass:
    """The pass registered as ``name``; a ``KeyError`` lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no pass named {name!r}; registered: {', '.join(p.name for p in list_passes())}") from None


def list_passes() -> list[Pass]:
    """Every registered pass, in the order the pass manager runs them."""
    return sorted(_REGISTRY.values(), key=lambda p: (p.order, p.name))

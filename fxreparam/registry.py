"""The pass registry: a decorator names a rewrite, describes it in a line and makes it selectable.

A pass is usually a *rule*: ``fn(ctx, node) -> bool`` tries one node and returns whether it
rewrote the graph there; the runner sweeps the graph once per round and calls it on every live
node. A rule that matches but would not be exact raises :class:`NotExact`, which the runner
records as a refusal in the report. A pass that needs the whole graph at once takes only
``ctx`` and returns its number of rewrites. The order of the built-in passes is one list in
:mod:`fxreparam.passes` (``BUILTIN_ORDER``, declared here with :func:`set_builtin_order`); a user's pass
runs where ``after=`` places it (default: before ``cleanup``)::

    @fxreparam.register_pass("my_fold", "fold my op into the conv before it", after="conv_bn")
    def my_fold(ctx: fxreparam.PassContext, node: torch.fx.Node) -> bool:
        ...  # match, raise NotExact(why) where the fold would not be exact, emit, return True
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import fx

from .errors import FxReparamError
from .graph import live_nodes
from .meta import module_path

__all__ = [
    "Costlier",
    "NotExact",
    "Pass",
    "PassContext",
    "PassError",
    "Refusal",
    "builtin_order",
    "get_pass",
    "list_passes",
    "ordered",
    "register_pass",
    "resolve",
    "set_builtin_order",
    "unregister_pass",
]


class NotExact(Exception):
    """A rule matched but refuses to fold: the fold would not be exact (the reason says why)."""

    kind = "refused"

    def __init__(self, reason: str, node: fx.Node | None = None) -> None:
        super().__init__(reason)
        self.node = node


class Costlier(NotExact):
    """A rule matched and the fold would be exact, but it declines it: the result would cost more (the reason
    says what). Reported as "declined (costlier)", apart from the refusals for exactness."""

    kind = "declined"


class PassError(FxReparamError):
    """A pass crashed: the message names the pass and the node it was rewriting."""

    def __init__(self, message: str, *, pass_name: str, node: str | None) -> None:
        super().__init__(message)
        self.pass_name = pass_name
        self.node = node


@dataclass(frozen=True)
class Refusal:
    """A match a pass left alone, with the reason: ``kind`` is ``"refused"`` (the fold would not be exact) or
    ``"declined"`` (exact, but costlier than what it replaces)."""

    pass_name: str
    node: str
    reason: str
    kind: str = "refused"

    @property
    def declined(self) -> bool:
        """Whether the fold was exact and declined for its cost (not refused for exactness)."""
        return self.kind == "declined"

    def __str__(self) -> str:
        return f"[{self.pass_name}] {self.reason}"


@dataclass
class PassContext:
    """What a pass sees: the graph module to rewrite, and a place to report refusals.

    Attributes:
        gm: the graph module, rewritten in place.
        pass_name: the pass now running (set by the runner).
        refusals: one :class:`Refusal` per (pass, node), the latest reason kept.
    """

    gm: fx.GraphModule
    pass_name: str = ""
    refusals: dict[tuple[str, str], Refusal] = field(default_factory=dict)

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def refuse(self, node: fx.Node, reason: str, *, costlier: bool = False) -> None:
        """Record that ``node`` matched but was left alone, and why (shown in the report); ``costlier``: the fold
        was exact and declined for its cost."""
        kind = "declined" if costlier else "refused"
        self.refusals[(self.pass_name, node.name)] = Refusal(self.pass_name, node.name, reason, kind)

    def label(self, node: fx.Node, kind: str | None = None) -> str:
        """``kind 'model.path'``: how messages name a node."""
        return f"{kind or node.name} '{module_path(node)}'"


RuleFn = Callable[[PassContext, fx.Node], bool]
GraphPassFn = Callable[[PassContext], int]


@dataclass(frozen=True)
class Pass:
    """A registered rewrite: a per-node rule, or a whole-graph pass; calling it rewrites ``ctx.gm`` in place.

    Returns the number of rewrites. Refusals (:class:`NotExact`) are recorded in ``ctx``; any other
    exception is re-raised as a :class:`PassError` naming the pass and the node.
    """

    name: str
    description: str
    fn: RuleFn | GraphPassFn
    per_node: bool
    after: str | None = None

    def __call__(self, ctx: PassContext) -> int:
        ctx.pass_name = self.name
        with torch.no_grad():
            if not self.per_node:
                return self._guarded(lambda: int(self.fn(ctx)), None)
            rewrites = 0
            for node in live_nodes(ctx.graph):
                rewrites += self._guarded(lambda n=node: self._try(ctx, n), node)
            return rewrites

    def _try(self, ctx: PassContext, node: fx.Node) -> int:
        try:
            return int(bool(self.fn(ctx, node)))
        except NotExact as why:
            ctx.refuse(why.node or node, str(why), costlier=why.kind == "declined")
            return 0

    def _guarded(self, run: Callable[[], int], node: fx.Node | None) -> int:
        try:
            return run()
        except (FxReparamError, KeyboardInterrupt):
            raise
        except Exception as err:
            where = f" at node {node.name} ('{module_path(node)}')" if node is not None else ""
            raise PassError(f"pass {self.name!r} crashed{where}: {type(err).__name__}: {err}. Run again with "
                            f"skip=[{self.name!r}] to optimize without it, and please report the model.",
                            pass_name=self.name, node=node.name if node is not None else None) from err


_BUILTIN_ORDER: tuple[str, ...] = ()


def set_builtin_order(names: Iterable[str]) -> None:
    """Declare the order the built-in passes run in, each round: :mod:`fxreparam.passes` holds that one list and
    declares it here, so the registry never imports the rules it orders."""
    global _BUILTIN_ORDER
    _BUILTIN_ORDER = tuple(names)


def builtin_order() -> tuple[str, ...]:
    """The built-in passes' order, as :mod:`fxreparam.passes` declared it."""
    return _BUILTIN_ORDER


def ordered(passes: list[Pass]) -> list[Pass]:
    """``passes`` in pipeline order: the built-ins by :func:`builtin_order`, each user pass right after the
    pass its ``after`` names (default: before ``cleanup``), user passes in registration order."""
    by_name = {p.name: p for p in passes}
    result = [by_name[n] for n in _BUILTIN_ORDER if n in by_name]
    for p in passes:
        if p.name in _BUILTIN_ORDER:
            continue
        anchor = p.after if p.after in {q.name for q in result} else None
        if anchor is None:
            at = next((i for i, q in enumerate(result) if q.name == "cleanup"), len(result))
        else:
            at = next(i for i, q in enumerate(result) if q.name == anchor) + 1
            while at < len(result) and result[at].name not in _BUILTIN_ORDER and result[at].after == anchor:
                at += 1  # after earlier user passes anchored at the same place
        result.insert(at, p)
    return result


_REGISTRY: dict[str, Pass] = {}
_ALIASES: dict[str, tuple[str, ...]] = {}


def _is_rule(fn: Callable) -> bool:
    """Whether ``fn`` takes ``(ctx, node)`` (a per-node rule) rather than ``(ctx)`` (a whole-graph pass)."""
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(params) >= 2


def register_pass(name: str, description: str, *, after: str | None = None, aliases: Iterable[str] = (),
                  replace: bool = False) -> Callable[[Callable], Callable]:
    """Register a rewrite under ``name`` (a decorator).

    Args:
        name: the pass's name, as ``optimize(passes=..., skip=...)`` and the report spell it.
        description: one line for ``fxreparam passes`` and the README.
        after: a user pass runs right after this pass (default: last before ``cleanup``); a built-in pass
            takes none: its place is ``fxreparam.passes.BUILTIN_ORDER``, the one list of the built-in order.
        aliases: former names that still select this pass.
        replace: allow replacing a pass registered under the same name.

    Returns:
        The decorator; it returns the function unchanged.
    """

    def decorate(fn: Callable) -> Callable:
        if name in _REGISTRY and not replace and _REGISTRY[name].fn is not fn:
            raise ValueError(f"a pass named {name!r} is already registered (pass replace=True to override)")
        _REGISTRY[name] = Pass(name, description, fn, _is_rule(fn), after)
        for alias in aliases:
            _ALIASES[alias] = (*[a for a in _ALIASES.get(alias, ()) if a != name], name)
        return fn

    return decorate


def unregister_pass(name: str) -> None:
    """Remove a registered pass."""
    _REGISTRY.pop(name, None)


def get_pass(name: str) -> Pass:
    """The pass registered as ``name`` (or the one an alias names); a ``KeyError`` lists the known ones."""
    found = resolve(name)
    if len(found) != 1:
        raise KeyError(f"{name!r} names the passes {[p.name for p in found]}, not one")
    return found[0]


def resolve(names: str | Pass | Iterable[str | Pass]) -> list[Pass]:
    """The passes that one name, an alias, a :class:`Pass` or a list of them select, in pipeline order."""
    items = [names] if isinstance(names, (str, Pass)) else list(names)
    chosen: dict[str, Pass] = {}
    for item in items:
        if isinstance(item, Pass):
            chosen[item.name] = item
        elif item in _REGISTRY:
            chosen[item] = _REGISTRY[item]
        elif item in _ALIASES:
            chosen.update((n, _REGISTRY[n]) for n in _ALIASES[item] if n in _REGISTRY)
        else:
            known = [p.name for p in list_passes()]
            raise KeyError(f"no pass named {item!r}; registered: {', '.join(known)}"
                           + (f" (former names: {', '.join(sorted(_ALIASES))})" if _ALIASES else ""))
    order = {p.name: i for i, p in enumerate(list_passes())}
    return sorted(chosen.values(), key=lambda p: order.get(p.name, len(order)))


def list_passes() -> list[Pass]:
    """Every registered pass, in the order the pipeline runs them."""
    return ordered(list(_REGISTRY.values()))

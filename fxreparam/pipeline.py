"""The pipeline: the runner that takes a graph to a fixpoint through the passes in the order the registry keeps
(the built-ins' order is ``fxreparam.passes.BUILTIN_ORDER``).

One fold can expose another (a folded constant makes a conv whose BN can then fold), so the
passes repeat, round after round, until none rewrites anything. Every pass sweeps the graph
once per round and rewrites all its matches in that sweep, so a round is linear in graph size
and the number of rounds is bounded by how deeply folds nest. After every pass that rewrote
something the graph is linted, as ``torch.fx``'s ``PassManager(run_checks_after_each_pass=True)``
does, so a pass that corrupts the graph is named at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from torch import fx

from .graph import eliminate_dead_code
from .mutation import mark_written
from .registry import Pass, PassContext, PassError, Refusal, ordered

__all__ = ["MAX_ROUNDS", "PassLog", "PassStat", "ordered", "replay", "run_passes"]

MAX_ROUNDS = 32


@dataclass
class PassStat:
    """How often one pass ran, how many rewrites it made, and the time it took."""

    name: str
    runs: int = 0
    rewrites: int = 0
    seconds: float = 0.0


@dataclass
class PassLog:
    """The outcome of one pipeline: stats per pass, refusals still standing, and the rewriting schedule."""

    stats: dict[str, PassStat] = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)
    schedule: list[str] = field(default_factory=list)  # passes in the order they ran, one entry per run
    rounds: int = 0
    unsettled: list[str] = field(default_factory=list)  # passes still rewriting when the round limit was reached


def _run_one(p: Pass, ctx: PassContext) -> int:
    """Run one pass; after a rewrite drop dead code and lint the graph, naming the pass if it is broken."""
    n = p(ctx)
    if n:
        eliminate_dead_code(ctx.graph)  # code is generated once, by finalize, not per pass
        try:
            ctx.graph.lint()
        except Exception as err:
            raise PassError(f"pass {p.name!r} left an invalid graph: {err}", pass_name=p.name, node=None) from err
    return n


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass], *, max_rounds: int = MAX_ROUNDS,
               on_pass: Callable[[int, str], None] | None = None) -> PassLog:
    """Rewrite ``gm`` in place with ``passes`` (in the order given) to a fixpoint.

    ``on_pass(round, name)`` is called before each pass runs (progress display). Returns the :class:`PassLog`;
    refusals of nodes that a later fold removed are dropped from it.
    """
    log = PassLog(stats={p.name: PassStat(p.name) for p in passes})
    ctx = PassContext(gm, pass_name="in-place writes")
    for node, why in mark_written(gm):  # symbolic_trace graphs only: an export capture is functional
        ctx.refuse(node, why)
    for _ in range(max_rounds):
        log.rounds += 1
        changed: list[str] = []
        for p in passes:
            if on_pass is not None:
                on_pass(log.rounds, p.name)
            start = time.perf_counter()
            n = _run_one(p, ctx)
            stat = log.stats[p.name]
            stat.runs += 1
            stat.rewrites += n
            stat.seconds += time.perf_counter() - start
            log.schedule.append(p.name)
            if n:
                changed.append(p.name)
        if not changed:
            break
    else:
        log.unsettled = changed
    alive = {n.name for n in gm.graph.nodes}
    seen: set[tuple[str, str]] = set()
    for r in ctx.refusals.values():  # one entry per node and reason, from the first pass that gave it
        if r.node in alive and (r.node, r.reason) not in seen:
            seen.add((r.node, r.reason))
            log.refusals.append(r)
    return log


def replay(gm: fx.GraphModule, schedule: Sequence[Pass]) -> Iterator[Pass]:
    """Run ``schedule`` one pass at a time, yielding after each so a caller can check the graph."""
    mark_written(gm)
    ctx = PassContext(gm)
    for p in schedule:
        if _run_one(p, ctx):
            gm.recompile()
        yield p

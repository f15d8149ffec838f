"""The pass manager: run the selected passes in order, round after round, until none rewrites anything.

One fold can expose another (a constant-folded Dirac weight makes a conv whose BN can
then fold), so the pipeline repeats to a fixpoint. Every pass sweeps the graph once per
round and rewrites all its matches in that sweep, so a round is linear in graph size and
the number of rounds is bounded by how deeply folds nest, not by the size of the model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import fx

from .graph import eliminate_dead_code
from .registry import Pass, PassContext, Refusal

__all__ = ["PassLog", "PassStat", "run_passes"]

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


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass], *, max_rounds: int = MAX_ROUNDS) -> PassLog:
    """Rewrite ``gm`` in place with ``passes`` to a fixpoint; refusals of nodes folded later are dropped."""
    log = PassLog(stats={p.name: PassStat(p.name) for p in passes})
    ctx = PassContext(gm)
    for _ in range(max_rounds):
        log.rounds += 1
        changed = 0
        for p in passes:
            start = time.perf_counter()
            n = p(ctx)
            if n:
                eliminate_dead_code(gm.graph)  # code is generated once, by finalize, not per pass
            stat = log.stats[p.name]
            stat.runs += 1
            stat.rewrites += n
            stat.seconds += time.perf_counter() - start
            log.schedule.append(p.name)
            changed += n
        if not changed:
            break
    alive = {n.name for n in gm.graph.nodes}
    seen: set[tuple[str, str]] = set()
    for r in ctx.refusals.values():  # one entry per node and reason, from the first pass that gave it
        if r.node in alive and (r.node, r.reason) not in seen:
            seen.add((r.node, r.reason))
            log.refusals.append(r)
    return log


def replay(gm: fx.GraphModule, schedule: Sequence[Pass]):
    """Run ``schedule`` one pass at a time, yielding after each so a caller can check the graph."""
    ctx = PassContext(gm)
    for p in schedule:
        if p(ctx):
            eliminate_dead_code(gm.graph)
            gm.recompile()
        yield p

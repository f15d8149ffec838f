"""The fold-and-verify core that :func:`fxreparam.optimize` and the torch.compile backend share.

One function takes a captured graph through the passes to a fixpoint, finalizes it, verifies it against a
:class:`~fxreparam.verify.Reference` made before any pass ran, names the pass to blame where the check fails, and
writes the report. Callers keep only their policy: what to capture, and what to do with a failure (``optimize``
raises :class:`~fxreparam.errors.VerificationError`; the backend drops the culprit pass and folds again).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from .cost import footprint, result_costlier
from .finalize import finalize
from .passes.fold_constants import precomputed_elements
from .passes.provisional import undo_provisional
from .pipeline import PassLog, replay, run_passes
from .registry import Pass
from .report import Report, count_ops
from .verify import Verification

__all__ = ["Check", "Outcome", "Source", "blame", "fold"]

Check = Callable[[Callable[..., Any]], Verification]
"""A verification of a candidate module against the original (a :meth:`~fxreparam.verify.Reference.check`),
made from outputs computed before any pass ran."""


@dataclass
class Outcome:
    """What one fold made: the finalized module, its report and, where verification failed, the pass to blame
    (``"capture"`` where the graph differed before any pass, ``"finalize"`` where every pass kept the outputs)
    with the check that showed it."""

    module: fx.GraphModule
    report: Report
    passlog: PassLog
    verification: Verification | None
    culprit: str | None = None
    culprit_check: Verification | None = None

    @property
    def failed(self) -> bool:
        """Whether the result was checked and found (or left) unverifiable or wrong."""
        return self.verification is not None and not self.verification.ok


@dataclass
class Source:
    """The graph to fold and how it was captured, as the report tells it; ``fresh`` makes the same graph again,
    unfolded, for the culprit search (None: no search, the failure is blamed on nobody)."""

    gm: fx.GraphModule
    model: str
    capture: str
    capture_seconds: float = 0.0
    fresh: Callable[[], fx.GraphModule] | None = None
    notes: list[str] = field(default_factory=list)


def fold(source: Source, passes: Sequence[Pass], *, class_name: str, check: Check | None = None,
         verification_note: str = "", on_pass: Callable[[int, str], None] | None = None,
         verify_seconds: float = 0.0) -> Outcome:
    """Run ``passes`` on ``source.gm`` (rewritten in place) to a fixpoint, finalize, verify with ``check``
    (None: unverified, ``verification_note`` says why) and blame; the report times each step (``verify_seconds``:
    the reference's own making, already spent)."""
    start = time.perf_counter()
    before, input_cost = count_ops(source.gm), footprint(source.gm)
    passlog = run_passes(source.gm, list(passes), on_pass=on_pass)
    undo_provisional(source.gm)  # compositions made for a sum that did not fold (also where settle_provisional
    # was not among the passes): never costlier than the input
    precomputed = precomputed_elements(source.gm)
    folded = finalize(source.gm, class_name=class_name)
    costlier = result_costlier(input_cost, folded, precomputed=precomputed)
    if costlier is not None:
        warnings.warn(f"fxreparam: the folded {source.model} {costlier.removeprefix('the result ')}; please report "
                      "the model", UserWarning, stacklevel=3)
    fold_seconds = time.perf_counter() - start
    verification = culprit = step = None
    if check is not None:
        tick = time.perf_counter()
        verification = check(folded)
        if verification.checked and not verification.ok and source.fresh is not None:
            by_name = {p.name: p for p in passes}
            culprit, step = blame(source.fresh, check, [by_name[n] for n in passlog.schedule if n in by_name],
                                  verification)
        verify_seconds += time.perf_counter() - tick
    report = Report(model=source.model, capture=source.capture, capture_seconds=source.capture_seconds,
                    optimize_seconds=fold_seconds + verify_seconds, passes=list(passlog.stats.values()),
                    refusals=passlog.refusals, before=before, after=count_ops(folded), verification=verification,
                    verification_note=verification_note, rounds=passlog.rounds, verify_seconds=verify_seconds,
                    notes=[*source.notes, *_pass_notes(passlog)], precomputed=precomputed)
    return Outcome(folded, report, passlog, verification, culprit, step)


def _pass_notes(passlog: PassLog) -> list[str]:
    """What the report should say about the run itself: passes that did not settle."""
    if not passlog.unsettled:
        return []
    return [f"no fixpoint after {passlog.rounds} rounds: {', '.join(passlog.unsettled)} still rewrote in the last one "
            "(the result is verified all the same; please report the model)"]


def blame(fresh: Callable[[], fx.GraphModule], check: Check, schedule: list[Pass],
          failed: Verification) -> tuple[str, Verification]:
    """Replay ``schedule`` one pass at a time on a ``fresh()`` capture; the first pass after which
    ``check`` no longer accepts the graph, and that check ("capture" where the graph differs before any pass,
    "finalize" if every pass was fine)."""
    gm = fresh()
    step = check(gm)
    if not step.ok:
        return "capture", step
    for p in replay(gm, schedule):
        step = check(gm)
        if not step.ok:
            return p.name, step
    return "finalize", failed


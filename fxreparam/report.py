"""The optimization report: what ran, what folded, what was refused and why, and how close the result is."""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import astuple, dataclass, field

from torch import fx, nn

from . import ops
from .cost import FOOTPRINT_LABELS, PRECOMPUTE_FRACTION, Footprint, graph_cost, result_costlier, stored_elements
from .meta import is_guard
from .pipeline import PassStat
from .registry import Refusal
from .verify import Verification

__all__ = ["OpCounts", "Report", "count_ops", "report"]


@dataclass(frozen=True)
class OpCounts:
    """Ops in a graph by kind (each call once), and the number of stored parameter and buffer elements."""

    conv: int
    linear: int
    batch_norm: int
    add_sub: int
    mul_div: int
    other: int
    parameters: int
    macs: int = 0  # multiply-accumulates per sample of the conv and linear layers, at the captured shape

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def count_ops(gm: fx.GraphModule) -> OpCounts:
    """Count the conv, linear, batch-norm and arithmetic ops of ``gm`` through the recognizers."""
    counts: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        kind = ops.op_kind(gm, node)
        if kind is not None:
            counts[kind] += 1
        elif not _is_bookkeeping(node) and not _is_tuple_tail(node):
            counts["other"] += 1
    return OpCounts(counts["conv"], counts["linear"], counts["batch_norm"], counts["add_sub"], counts["mul_div"],
                    counts["other"], stored_elements(gm), graph_cost(gm).macs)


def _is_tuple_tail(node: fx.Node) -> bool:
    """A tuple-returning op whose item 0 is counted instead (aten's native batch norm)."""
    return any(ops.op_kind(node.graph.owning_module, u) for u in node.users if u.target is operator.getitem)


def _is_bookkeeping(node: fx.Node) -> bool:
    """getitem on a tuple, shape queries and similar: no work at run time."""
    if is_guard(node):
        return True  # the input-shape check
    name = getattr(node.target, "__name__", str(node.target))
    return name in ("getitem", "getattr", "size", "sym_size", "dim") or name.startswith("sym_size")


@dataclass
class Report:
    """What :func:`fxreparam.optimize` did. ``print(report)`` shows it as tables."""

    model: str
    capture: str
    capture_seconds: float
    optimize_seconds: float
    passes: list[PassStat]
    refusals: list[Refusal]
    before: OpCounts
    after: OpCounts
    verification: Verification | None
    verification_note: str = ""
    rounds: int = 0
    notes: list[str] = field(default_factory=list)
    verify_seconds: float = 0.0
    compiler: str = ""  # the compiler the result was handed to, where the report's maker timed it
    compile_seconds: float = 0.0
    precomputed: int = 0  # stored elements precomputed constants added, within fold_constants' precompute budget

    @property
    def rewrites(self) -> dict[str, int]:
        return {p.name: p.rewrites for p in self.passes}

    @property
    def costlier(self) -> str | None:
        """Where the result costs more than the graph it was given (:func:`fxreparam.cost.result_costlier`), or
        ``None``: the whole-result guarantee, as the report's whole-result line states it."""
        return result_costlier(_footprint(self.before), _footprint(self.after), precomputed=self.precomputed)

    def __str__(self) -> str:
        lines = [f"fxreparam report for {self.model}",
                 f"captured with {self.capture} in {self.capture_seconds:.2f} s; passes and checks "
                 f"took {self.optimize_seconds:.2f} s ({self.rounds} rounds to a fixpoint; verification "
                 f"{self.verify_seconds:.2f} s)"
                 + (f"; compiled with {self.compiler} in {self.compile_seconds:.2f} s" if self.compiler else ""), ""]
        lines += _table(["pass", "rewrites", "runs", "seconds"],
                        [[p.name, p.rewrites, p.runs, f"{p.seconds:.3f}"] for p in self.passes])
        lines.append("")
        labels = {"add_sub": "add/sub", "mul_div": "mul/div", "parameters": "stored elements",
                  "macs": "MACs per sample"}
        lines += _table(["ops and cost", "before", "after"],
                        [[labels.get(k, k), v, self.after.as_dict()[k]] for k, v in self.before.as_dict().items()])
        lines.append("")
        lines += _whole_result(self.before, self.after, self.precomputed)
        lines.append("")
        lines += _refusal_section(self.refusals)
        lines.append(f"verification: {self.verification if self.verification is not None else self.verification_note}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _refusal_section(refusals: list[Refusal]) -> list[str]:
    """Folds refused for exactness, then exact folds declined for their cost: two lists, each with its count, so a
    cost decision never reads as a failure."""
    lines: list[str] = []
    for title, group in (("refused (not exact)", [r for r in refusals if not r.declined]),
                         ("declined (costlier)", [r for r in refusals if r.declined])):
        if group:
            lines.append(f"{title} ({len(group)}):")
            lines += _table(["pass", "reason"], [[r.pass_name, r.reason] for r in group])
        else:
            lines.append(f"{title}: nothing")
        lines.append("")
    return lines


def _footprint(counts: OpCounts) -> Footprint:
    return Footprint(counts.parameters, counts.macs, counts.conv, counts.linear, counts.batch_norm,
                     counts.add_sub + counts.mul_div)


def _ratio(old: int, new: int) -> str:
    return f"{new / old:.3f}x" if old else ("1.000x" if not new else "new")


def _whole_result(before: OpCounts, after: OpCounts, precomputed: int = 0) -> list[str]:
    """One line comparing the result with its input (stored elements, MACs, op counts, each with output/input),
    the elements precomputed constants added, and a warning naming what costs more
    (:func:`fxreparam.cost.result_costlier`)."""
    old, new = _footprint(before), _footprint(after)
    parts = [f"{label} {b:,} -> {a:,} ({_ratio(b, a)})" for label, b, a in
             zip(FOOTPRINT_LABELS, astuple(old), astuple(new))]
    why = result_costlier(old, new, precomputed=precomputed)
    budget = (f"; precomputed constants: {precomputed:,} stored elements (budget: {PRECOMPUTE_FRACTION:.0%} of the "
              "input's)" if precomputed else "")
    return ["whole result (input -> output): " + "; ".join(parts) + budget, *([f"WARNING: {why}"] if why else [])]


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 or not c.replace(".", "").isdigit() else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return [fmt(cells[0]), fmt(["-" * w for w in widths]), *[fmt(r) for r in cells[1:]]]


def report(model: nn.Module) -> Report:
    """The report of a module returned by :func:`fxreparam.optimize`."""
    found = getattr(model, "fxreparam_report", None)
    if not isinstance(found, Report):
        raise ValueError(f"{type(model).__name__} was not returned by fxreparam.optimize: it carries no report")
    return found

"""``fxreparam.optimize``: capture, rewrite to a fixpoint, finalize, verify, report."""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from . import deploy
from .capture import capture as capture_graph
from .errors import VerificationError
from .finalize import finalize
from .manager import replay, run_passes
from .registry import Pass, get_pass, list_passes
from .report import Report, count_ops
from .verify import TOLERANCE, Verification, compare, float64_copy

__all__ = ["optimize"]

log = logging.getLogger("fxreparam")


def _as_args(example_inputs: Any) -> tuple | None:
    if example_inputs is None:
        return None
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _select(passes: Sequence[str | Pass] | None, skip: Iterable[str]) -> list[Pass]:
    chosen = list_passes() if passes is None else [p if isinstance(p, Pass) else get_pass(p) for p in passes]
    skip = set(skip)
    unknown = skip - {p.name for p in list_passes()}
    if unknown:
        raise KeyError(f"cannot skip unknown passes {sorted(unknown)}; registered: {[p.name for p in list_passes()]}")
    return [p for p in chosen if p.name not in skip]


def _model_dtype(model: nn.Module, args: tuple) -> torch.dtype:
    for t in [*model.parameters(), *model.buffers(), *args]:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return torch.float32


def optimize(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    passes: Sequence[str | Pass] | None = None,
    skip: Iterable[str] = (),
    verify: bool = True,
    backend: str | None = None,
    example_kwargs: dict[str, Any] | None = None,
    capture: str = "auto",
    tolerance: float | None = None,
    backend_options: dict[str, Any] | None = None,
) -> Any:
    """A new module computing ``model``'s inference (eval-mode) function with its structure folded.

    ``example_inputs`` (a tensor or a tuple of positional inputs; keyword inputs in
    ``example_kwargs``) selects ``torch.export`` capture and enables verification; without
    them the model is traced with ``symbolic_trace`` and not verified. ``passes`` picks
    registered passes by name (default: all), ``skip`` removes some. ``capture`` picks the
    tracer: ``"auto"``, ``"export"`` or ``"symbolic_trace"`` (fastest on very deep models).
    ``tolerance`` overrides the relative error allowed for the model's dtype.

    ``backend``: ``None``/``"eager"`` returns the folded module; ``"inductor"`` that module under
    ``torch.compile`` (Inductor, freezing on); ``"aot_inductor"`` a ``(runner, package_path)`` pair
    (``backend_options={"path": ...}``); ``"tensorrt"`` a TensorRT module (``backend_options``:
    ``precision``, ``shapes``, ``path``; see :func:`fxreparam.deploy.tensorrt`). With ``verify`` the
    result is compared with the original in float64 and a :class:`VerificationError`
    names the first pass that made them differ. The user's model is never modified.
    ``fxreparam.report(result)`` tells what was done.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if model.training:
        warnings.warn(f"{type(model).__name__} is in training mode: fxreparam folds its inference (eval) function; "
                      "the model itself is left in training mode", stacklevel=2)
    start = time.perf_counter()
    args, kwargs = _as_args(example_inputs), dict(example_kwargs or {})
    selected = _select(passes, skip)
    work = copy.deepcopy(model).eval()
    log.info("capturing %s ...", type(model).__name__)
    captured = capture_graph(work, args, kwargs, capture)
    gm = captured.gm
    log.info("captured %d nodes with %s in %.2f s", len(gm.graph.nodes), captured.method, captured.seconds)
    before = count_ops(gm)
    passlog = run_passes(gm, selected)
    log.info("ran %d passes to a fixpoint in %d rounds: %d rewrites", len(selected), passlog.rounds,
             sum(s.rewrites for s in passlog.stats.values()))
    folded = finalize(gm, class_name=f"Folded{type(model).__name__}")

    verification, note = None, "skipped (verify=False)"
    if verify and args is None:
        note = "skipped: no example inputs to run the model on"
    elif verify:
        tol = tolerance if tolerance is not None else TOLERANCE.get(_model_dtype(model, args), 1e-4)
        log.info("verifying against the original in float64 ...")
        reference = float64_copy(work)
        verification = compare(reference, float64_copy(folded), args, kwargs, tol)
        if not verification.ok:
            by_name = {p.name: p for p in selected}
            log.info("verification failed (%s); replaying the passes one by one to find the culprit", verification)
            raise _blame(model, args, kwargs, reference, [by_name[n] for n in passlog.schedule], verification,
                         captured.method_key)
    folded.fxreparam_report = Report(
        model=type(model).__name__, capture=captured.method, capture_seconds=captured.seconds,
        optimize_seconds=time.perf_counter() - start - captured.seconds, passes=list(passlog.stats.values()),
        refusals=passlog.refusals, before=before, after=count_ops(folded), verification=verification,
        verification_note=note, rounds=passlog.rounds)
    return _deploy(folded, backend, args, dict(backend_options or {}))


BACKENDS = (None, "eager", "inductor", "aot_inductor", "tensorrt")


def _deploy(folded: nn.Module, backend: str | None, args: tuple | None, options: dict[str, Any]) -> Any:
    """The folded module handed to ``backend`` (see :func:`optimize`)."""
    if backend in (None, "eager"):
        return folded
    if args is None:
        raise ValueError(f"backend={backend!r} needs example inputs")
    if backend == "inductor":
        compiled = torch.compile(folded, backend="inductor", options={"freezing": True, **options})
        compiled.fxreparam_report = folded.fxreparam_report
        return compiled
    if backend == "aot_inductor":
        return deploy.aot_inductor(folded, args, options.pop("path", "folded.pt2"))
    return deploy.tensorrt(folded, args, **options)


def _blame(model: nn.Module, args: tuple, kwargs: dict, reference: nn.Module, schedule: list[Pass],
           failed: Verification, method: str) -> VerificationError:
    """Replay the passes one by one on a fresh capture and name the first after which outputs diverge."""
    gm: fx.GraphModule = capture_graph(copy.deepcopy(model).eval(), args, kwargs, method).gm
    culprit, error = "finalize", failed.error
    for p in replay(gm, schedule):
        step = compare(reference, float64_copy(gm), args, kwargs, failed.tolerance)
        if not step.ok:
            culprit, error = p.name, step.error
            break
    return VerificationError(
        f"pass {culprit!r} changed {type(model).__name__}'s outputs: relative error {error:.3e} exceeds "
        f"{failed.tolerance:.0e} (float64, example and random inputs). Nothing was returned; run again with "
        f"skip=[{culprit!r}] to optimize without it, and please report the model.",
        pass_name=culprit, error=error, tolerance=failed.tolerance)

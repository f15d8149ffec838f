"""The ``"fxreparam"`` torch.compile backend: fold every graph Dynamo captures, verify it, compile it.

``torch.compile(model, backend="fxreparam")`` runs the pass pipeline on every graph Dynamo
captures (graph breaks included, so a model no tracer takes whole still folds region by region)
and hands the result to an inner compiler, Inductor by default (with its freezing on). Dynamo passes
parameters and buffers as graph inputs; the backend *freezes* them (:mod:`fxreparam.frozen`), as Inductor's
``freezing`` does: their values are read once, at compile time, and the compiled model is for inference. Change a weight
and compile again (``torch._dynamo.reset()``). A region whose fold fails verification never breaks the
user's ``torch.compile``: the pass to blame is named in a warning and the region's report, and the region
is compiled without it (or unfolded).
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from .deploy import INNER_COMPILERS, compile_with
from .finalize import finalize
from .frozen import compile_frozen, freeze, on_runtime_inputs, runtime_positions
from .mutation import mark_written
from .pipeline import run_passes
from .registry import Pass, list_passes
from .report import Report, count_ops
from .verify import Reference, Verification

__all__ = ["fxreparam_backend", "region_reports"]

log = logging.getLogger("fxreparam")

_REPORTS: list[Report] = []
_MAX_DROPPED = 3  # passes dropped one by one from a failing region before it is compiled unfolded
_MANY_FROZEN = 64  # frozen tensors from which a region's report points at Dynamo's per-call guard cost


def region_reports() -> list[Report]:
    """The reports of the graphs the ``"fxreparam"`` backend has compiled in this process, oldest first."""
    return list(_REPORTS)


def functional(gm: fx.GraphModule, inputs: Sequence[Any]) -> fx.GraphModule:
    """``gm`` with its in-place writes turned into data flow (Dynamo's graphs keep ``x += y`` and ``relu_``, which
    block every fold that reads the written value), traced once on ``inputs`` through functionalization; ``gm``
    itself where it writes nothing, takes symbolic sizes, or cannot be traced that way."""
    if not mark_written(gm) or not all(isinstance(x, torch.Tensor) for x in inputs):
        return gm
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        with torch.no_grad():
            traced = make_fx(torch.func.functionalize(gm, remove="mutations_and_views"))(
                *[x.detach().clone() for x in inputs])
    except Exception as err:  # leave the writes in place: the folds that read them are refused and reported
        log.info("fxreparam backend: region not functionalized (%s: %s)", type(err).__name__, err)
        return gm
    return traced


def _fold(gm: fx.GraphModule, example_inputs: Sequence[Any], passes: list[Pass]
          ) -> tuple[fx.GraphModule, Any, Any, float]:
    """Freeze a copy of ``gm``, make it functional and fold it with ``passes``: the folded graph, its op counts
    before, its pass log, and the seconds freezing and functionalization took (the region's capture)."""
    tick = time.perf_counter()
    frozen, keep = freeze(copy.deepcopy(gm), example_inputs)
    frozen = functional(frozen, [example_inputs[i] for i in keep])
    prepared = time.perf_counter() - tick
    before = count_ops(frozen)
    passlog = run_passes(frozen, passes)
    return finalize(frozen, class_name="FoldedRegion"), before, passlog, prepared


def _region_reference(gm: fx.GraphModule, example_inputs: Sequence[Any], keep: list[int]) -> Reference:
    """The region's own outputs on its runtime inputs, in its dtype and in float64: the frozen inputs converted, and
    the weights Dynamo installed on the graph itself (it does so when Inductor's freezing is on while tracing)."""
    frozen = {i: x.detach() for i, x in enumerate(example_inputs) if i not in keep}
    frozen64 = {i: x.double() if x.is_floating_point() else x for i, x in frozen.items()}

    def call(module: fx.GraphModule, values: dict[int, Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            it = iter(args)
            return module(*[values[i] if i in values else next(it) for i in range(len(example_inputs))])

        return run

    stored = any(t.is_floating_point() and t.dtype != torch.float64 for t in (*gm.parameters(), *gm.buffers()))
    gm64 = copy.deepcopy(gm).double() if stored else gm
    as64 = stored or any(x.is_floating_point() and x.dtype != torch.float64 for x in frozen.values())
    return Reference(call(gm, frozen), tuple(example_inputs[i] for i in keep),
                     original64=call(gm64, frozen64) if as64 or not frozen else None)


def fxreparam_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None,
                      mode: str | None = None) -> Callable[..., Any]:
    """The ``"fxreparam"`` torch.compile backend: freeze, fold, verify, then compile with ``options["inner"]``.

    Options: ``inner`` (``"inductor"``, ``"eager"``, ``"tensorrt"``), ``verify`` (default ``True``). A fold that
    fails verification is not raised: the culprit pass is dropped for this region, with a warning.
    """
    options = dict(options or {})
    inner = options.pop("inner", "inductor")
    verify = options.pop("verify", True)
    if options:
        raise ValueError(f"unknown fxreparam backend options {sorted(options)}; known: inner, verify")
    if inner not in INNER_COMPILERS:
        raise ValueError(f"unknown inner compiler {inner!r}; choose one of {INNER_COMPILERS}")
    start = time.perf_counter()
    keep = runtime_positions(gm, example_inputs)
    frozen = len(example_inputs) - len(keep)
    passes = list_passes()
    folded, before, passlog, capture_seconds = _fold(gm, example_inputs, passes)
    runtime_inputs = [example_inputs[i] for i in keep]
    verification: Verification | None = None
    notes: list[str] = []
    note, verify_seconds = "skipped (verify=False)", 0.0
    if verify and not all(isinstance(x, torch.Tensor) for x in runtime_inputs):
        note = "skipped: the region takes symbolic sizes as inputs"
    elif verify:
        tick = time.perf_counter()
        reference = _region_reference(gm, example_inputs, keep)
        verification = reference.check(folded)
        dropped: list[str] = []
        while verification is not None and not verification.ok:
            culprit = _culprit(gm, example_inputs, reference, passes, passlog.schedule, verification)
            if culprit in ("capture", "finalize") or not verification.checked or len(dropped) >= _MAX_DROPPED:
                notes.append(f"the folded region failed verification ({verification}); compiled unfolded")
                _warn(f"a torch.compile region could not be folded exactly ({verification}); it was compiled "
                      "unfolded. Please report the model.")
                folded, keep, verification = None, list(range(len(example_inputs))), None
                note = "not applicable: the region was compiled unfolded"
                break
            dropped.append(culprit)
            notes.append(f"pass {culprit!r} changed the region's outputs ({verification}); recompiled without it")
            _warn(f"pass {culprit!r} changed a torch.compile region's outputs ({verification}); the region was "
                  f"compiled without it. Please report the model.")
            passes = [p for p in passes if p.name != culprit]
            folded, before, passlog, _ = _fold(gm, example_inputs, passes)
            verification = reference.check(folded)
        verify_seconds = time.perf_counter() - tick
    optimize_seconds = time.perf_counter() - start - capture_seconds
    target = folded if folded is not None else gm
    tick = time.perf_counter()
    try:
        compiled = _compile(inner, target, [example_inputs[i] for i in keep])
    except Exception as err:
        if folded is None:
            raise  # the user's own region does not compile: that error is theirs
        notes.append(f"the inner compiler {inner} failed on the folded region ({type(err).__name__}); compiled "
                     "unfolded")
        _warn(f"the inner compiler {inner} failed on a folded torch.compile region ({type(err).__name__}: "
              f"{str(err).splitlines()[0][:200] if str(err) else ''}); the region was compiled unfolded. Please "
              "report the model.")
        target, keep = gm, list(range(len(example_inputs)))
        compiled = compile_with(inner, gm, example_inputs)
    compile_seconds = time.perf_counter() - tick
    if frozen >= _MANY_FROZEN:
        notes.append(f"{frozen} parameters and buffers frozen: Dynamo still checks its guards on the modules that "
                     "hold them at every call (about 2 ms for a thousand); the weights are frozen anyway, so "
                     "torch.compile(..., options={'guard_filter_fn': "
                     "torch.compiler.skip_guard_on_all_nn_modules_unsafe}) drops that cost")
    # Dynamo's own trace came before this call: "capture" here is freezing its graph and making it functional.
    report = Report(model="torch.compile region", capture="Dynamo's graph, frozen and functionalized,",
                    capture_seconds=capture_seconds, optimize_seconds=optimize_seconds,
                    passes=list(passlog.stats.values()), refusals=passlog.refusals, before=before,
                    after=count_ops(target), verification=verification, verification_note=note,
                    rounds=passlog.rounds, notes=notes, verify_seconds=verify_seconds, compiler=inner,
                    compile_seconds=compile_seconds)
    _REPORTS.append(report)
    log.info("fxreparam backend: region of %d ops folded to %d convs, %d batch norms in %.2f s; inner compiler %s",
             sum(before.as_dict().values()) - before.parameters, report.after.conv, report.after.batch_norm,
             optimize_seconds, inner)

    return on_runtime_inputs(compiled, keep)


def _culprit(gm: fx.GraphModule, example_inputs: Sequence[Any], reference: Reference, passes: list[Pass],
             schedule: list[str], failed: Verification) -> str:
    """The first pass after which the region's outputs diverge, replayed on a fresh frozen copy."""
    from .api import blame

    by_name = {p.name: p for p in passes}
    name, _ = blame(lambda: freeze(copy.deepcopy(gm), example_inputs)[0], reference,
                    [by_name[n] for n in schedule if n in by_name], failed)
    return name


def _warn(message: str) -> None:
    warnings.warn(f"fxreparam: {message}", UserWarning, stacklevel=3)


def _compile(inner: str, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """The inner compile; Inductor gets its freezing treatment (the weights are constants of the graph now)."""
    if inner != "inductor":
        return compile_with(inner, gm, example_inputs)
    return compile_frozen(gm, example_inputs)

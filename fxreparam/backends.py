"""The ``"fxreparam"`` torch.compile backend: fold every graph Dynamo captures, verify it, compile it.

``torch.compile(model, backend="fxreparam")`` runs the pass pipeline on every graph Dynamo
captures (graph breaks included, so a model no tracer takes whole still folds region by region)
and hands the result to an inner compiler, Inductor by default (with its freezing on). Dynamo passes
parameters and buffers as graph inputs; the backend *freezes* them (:mod:`fxreparam.frozen`), as Inductor's
``freezing`` does: their values are read once, at compile time, and the compiled model is for inference. Change a weight
and compile again (``torch._dynamo.reset()``). Buffers the region writes stay inputs, so the compiled model advances
its state as the uncompiled one; a region in training mode is compiled unfolded. Under ``dynamic=True`` the region
is folded on its symbolic shapes and verified at two sizes; the scalars Dynamo lifts to inputs (a BatchNorm's ``eps``)
are read as constants and checked at every call. A region whose fold fails verification never breaks the user's
``torch.compile``: the pass to blame is named in a warning and the region's report, and the region is compiled
without it (or unfolded); any other failure compiles the region unfolded, with one warning.

Options (``torch.compile(..., options={...})``): ``inner`` (``"inductor"``, ``"eager"``, ``"tensorrt"``),
``passes``, ``skip``, ``verify`` and ``tolerance`` as :func:`fxreparam.optimize` takes them.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .capture.functional import functionalize_traced
from .core import Outcome, Source, fold
from .deploy import INNER_COMPILERS, compile_with
from .frozen import compile_frozen, freeze, lift_scalars
from .meta import dynamo_value
from .mutation import mark_written
from .registry import Pass, list_passes, resolve
from .report import Report, count_ops
from .verify import Reference, Verification

__all__ = ["fxreparam_backend", "region_reports"]

log = logging.getLogger("fxreparam")

_REPORTS: list[Report] = []
_MAX_DROPPED = 3  # passes dropped one by one from a failing region before it is compiled unfolded
_MANY_FROZEN = 64  # frozen tensors from which a region's report points at Dynamo's per-call guard cost
_OPTIONS = ("inner", "passes", "skip", "verify", "tolerance")


def region_reports() -> list[Report]:
    """The reports of the graphs the ``"fxreparam"`` backend has compiled in this process, oldest first."""
    return list(_REPORTS)


@dataclass
class Settings:
    """The backend's options, checked: the inner compiler and what :func:`fxreparam.optimize` also takes."""

    inner: str = "inductor"
    passes: list[Pass] = field(default_factory=list_passes)
    verify: bool = True
    tolerance: float | None = None

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> Settings:
        """Read ``torch.compile``'s ``options``; an unknown key, inner compiler or pass name raises."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise ValueError(f"unknown fxreparam backend options {unknown}; known: {', '.join(_OPTIONS)}")
        inner = options.get("inner", "inductor")
        if inner not in INNER_COMPILERS:
            raise ValueError(f"unknown inner compiler {inner!r}; choose one of {INNER_COMPILERS}")
        chosen = list_passes() if options.get("passes") is None else resolve(options["passes"])
        skipped = {p.name for p in resolve(options["skip"])} if options.get("skip") else set()
        return cls(inner, [p for p in chosen if p.name not in skipped], bool(options.get("verify", True)),
                   options.get("tolerance"))


# ----------------------------------------------------------------------------------------------- the region


def _hint(value: Any) -> Any:
    """A SymInt's size at this compile (read without adding a guard), anything else as it is."""
    return value.node.hint if isinstance(value, torch.SymInt) else value


@dataclass
class Region:
    """Dynamo's graph and inputs, and how they are fed: ``keep`` the positions the folded graph still takes,
    ``scalars`` the lifted scalars read as constants (checked at every call), ``sizes`` each SymInt input as
    (input position, dim) of a tensor input whose size it is, ``varying`` the tensor inputs a check draws anew,
    ``shapes`` the shape Dynamo traced each input with (SymInts where it is symbolic)."""

    gm: fx.GraphModule
    inputs: Sequence[Any]
    keep: list[int]
    scalars: dict[int, Any]
    sizes: dict[int, tuple[int, int]]
    varying: list[int]
    shapes: list[tuple[Any, ...]]
    functional: bool = False

    def fixed(self) -> dict[int, Any]:
        """The inputs a check holds at this compile's values: weights, lifted scalars, unmatched SymInts."""
        return {i: _hint(x) for i, x in enumerate(self.inputs) if i not in self.varying}

    def caller(self, module: Callable[..., Any], slots: Sequence[int], fixed: dict[int, Any] | None = None
               ) -> Callable[..., Any]:
        """``module`` (taking the inputs at ``slots``) called with the varying tensors only, the others
        ``fixed`` (default :meth:`fixed`); the SymInt inputs follow the sizes of the tensors."""
        fixed = self.fixed() if fixed is None else fixed

        def run(*tensors: Any) -> Any:
            values = {**fixed, **dict(zip(self.varying, tensors))}
            values.update({i: values[j].shape[d] for i, (j, d) in self.sizes.items()})
            return module(*[values[i] for i in slots])

        return run

    def dynamic(self) -> list[dict[int, tuple[int, None]]] | None:
        """Per varying input, its symbolic dims (a check tries another size there); None where a dim is a
        compound expression of the symbols, which one other size per dim cannot keep consistent."""
        found = []
        for i in self.varying:
            shape = self.shapes[i]
            if any(isinstance(n, torch.SymInt) and not (n.node.expr.is_Symbol or n.node.expr.is_number)
                   for n in shape):
                return None
            found.append({d: (2, None) for d, n in enumerate(shape) if isinstance(n, torch.SymInt)
                          and n.node.expr.is_Symbol})
        return found


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _traced_shapes(gm: fx.GraphModule) -> list[tuple[Any, ...]]:
    """The shape Dynamo traced each input with (SymInts where it is symbolic; () for a non-tensor)."""
    values = [dynamo_value(n) for n in _placeholders(gm)]
    return [tuple(v.shape) if isinstance(v, torch.Tensor) else () for v in values]


def _size_sources(shapes: list[tuple[Any, ...]], inputs: Sequence[Any], tensors: list[int]
                  ) -> dict[int, tuple[int, int]]:
    """Each SymInt input as the (tensor input, dim) whose size is that symbol, where one is."""
    where: dict[Any, tuple[int, int]] = {}
    for i in tensors:
        for d, n in enumerate(shapes[i]):
            if isinstance(n, torch.SymInt) and n.node.expr.is_Symbol:
                where.setdefault(n.node.expr, (i, d))
    return {i: where[x.node.expr] for i, x in enumerate(inputs)
            if isinstance(x, torch.SymInt) and x.node.expr in where}


def region(gm: fx.GraphModule, inputs: Sequence[Any]) -> Region:
    """A frozen, functional copy of Dynamo's graph, its lifted scalars read, ready to fold."""
    frozen, keep = freeze(copy.deepcopy(gm), inputs)
    scalars = lift_scalars(frozen, inputs, keep)
    tensors = [i for i in keep if isinstance(inputs[i], torch.Tensor) and i not in scalars]
    shapes = _traced_shapes(gm)
    functional, changed = functionalize_traced(frozen, [_placeholders(gm)[i] for i in keep], [inputs[i] for i in keep],
                                               writes=mark_written)
    return Region(functional, inputs, keep, scalars, _size_sources(shapes, inputs, tensors), tensors, shapes, changed)


def _training(gm: fx.GraphModule) -> fx.Node | None:
    """The first op the region runs in training mode (a batch norm that updates its statistics, a dropout)."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments
        except (TypeError, ValueError):
            continue
        if bound.get("training") is True or bound.get("train") is True:
            return node
    return None


# ----------------------------------------------------------------------------------------------- the backend


def fxreparam_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None,
                      mode: str | None = None) -> Callable[..., Any]:
    """The ``"fxreparam"`` torch.compile backend: freeze, fold, verify, then compile with ``options["inner"]``.

    Options: ``inner`` (``"inductor"``, ``"eager"``, ``"tensorrt"``), ``passes``, ``skip``, ``verify`` (default
    ``True``), ``tolerance``. A fold that fails verification is not raised: the culprit pass is dropped for this
    region, with a warning; any other failure compiles the region unfolded, with one warning.
    """
    settings = Settings.parse(options)
    start = time.perf_counter()
    try:
        training = _training(gm)
    except Exception as err:  # a region it cannot read: compiled as it is, never a broken compile
        return _unfolded(gm, example_inputs, settings, start, f"the region could not be read ({type(err).__name__}): "
                         "compiled without folding")
    if training is not None:
        return _unfolded(gm, example_inputs, settings, start, f"the region runs in training mode ({training.name}): "
                         "compiled without folding, so it keeps training semantics (BN statistics advance once per "
                         "call)")
    try:
        return _folded(gm, example_inputs, settings, start)
    except Exception as err:
        culprit = getattr(err, "pass_name", None)
        first = str(err).splitlines()[0][:300] if str(err) else ""
        remedy = (f"torch.compile(..., backend='fxreparam', options={{'skip': [{culprit!r}]}}) compiles the others"
                  if culprit else "please report the model")
        _warn(f"folding a torch.compile region failed ({type(err).__name__}: {first}); the region was compiled "
              f"unfolded. Remedy: {remedy}.")
        return _unfolded(gm, example_inputs, settings, start, f"folding failed ({type(err).__name__}"
                         + (f" in pass {culprit!r}" if culprit else "") + "): compiled unfolded")


def _unfolded(gm: fx.GraphModule, inputs: Sequence[Any], settings: Settings, start: float, note: str
              ) -> Callable[..., Any]:
    """The region compiled as Dynamo gave it, with a report that says why (where the report cannot be made, the
    region is compiled all the same: a report never breaks a compile)."""
    try:
        counts = count_ops(gm)  # before the inner compiler sees the graph
    except Exception as err:
        log.info("fxreparam backend: no report for an unfolded region (%s: %s)", type(err).__name__, err)
        counts = None
    tick = time.perf_counter()
    compiled = compile_with(settings.inner, gm, inputs)
    if counts is None:
        return compiled
    _REPORTS.append(Report(model="torch.compile region", capture="Dynamo's graph, unfolded,", capture_seconds=0.0,
                           optimize_seconds=tick - start, passes=[], refusals=[], before=counts, after=counts,
                           verification=None, verification_note="not applicable: the region was compiled unfolded",
                           notes=[note], compiler=settings.inner, compile_seconds=time.perf_counter() - tick))
    return compiled


def _folded(gm: fx.GraphModule, inputs: Sequence[Any], settings: Settings, start: float) -> Callable[..., Any]:
    """Fold the region (dropping a pass that fails verification), compile it, and feed it its runtime inputs."""
    tick = time.perf_counter()
    prepared = region(gm, inputs)
    capture_seconds = time.perf_counter() - tick
    reference, note = None, "skipped (verify=False)"
    if settings.verify:
        reference = Reference(prepared.caller(gm, range(len(inputs))), tuple(inputs[i] for i in prepared.varying),
                              original64=_float64_caller(gm, prepared), dynamic=prepared.dynamic(),
                              floor=settings.tolerance)
    passes, notes = list(settings.passes), []
    outcome = _fold(gm, prepared, passes, reference, note, capture_seconds)
    while outcome.failed:
        culprit = outcome.culprit
        if culprit in (None, "capture", "finalize") or len(notes) >= _MAX_DROPPED:
            return _unfolded(gm, inputs, settings, start, f"the folded region failed verification "
                             f"({outcome.verification}); compiled unfolded")
        notes.append(f"pass {culprit!r} changed the region's outputs ({outcome.culprit_check}); recompiled without it")
        _warn(f"pass {culprit!r} changed a torch.compile region's outputs ({outcome.culprit_check}); the region was "
              f"compiled without it (options={{'skip': [{culprit!r}]}} does so from the start). Please report the "
              "model.")
        passes = [p for p in passes if p.name != culprit]
        prepared = region(gm, inputs)
        outcome = _fold(gm, prepared, passes, reference, note, capture_seconds)
    tick = time.perf_counter()
    runtime = [inputs[i] for i in prepared.keep]
    compiled = _compile(settings.inner, outcome.module, runtime)
    report = outcome.report
    report.notes += notes + _notes(prepared, len(inputs) - len(prepared.keep))
    report.compiler, report.compile_seconds = settings.inner, time.perf_counter() - tick
    report.optimize_seconds = tick - start - capture_seconds
    _REPORTS.append(report)
    log.info("fxreparam backend: region folded to %d convs, %d batch norms in %.2f s; inner compiler %s",
             report.after.conv, report.after.batch_norm, report.optimize_seconds, settings.inner)
    return _runner(compiled, prepared, lambda: _fallback(settings.inner, gm, inputs))


def _fold(gm: fx.GraphModule, prepared: Region, passes: list[Pass], reference: Reference | None, note: str,
          capture_seconds: float) -> Outcome:
    """The core's fold of a prepared region; the culprit search folds fresh copies of the same region."""
    how = "frozen and functionalized" if prepared.functional else "frozen"
    source = Source(prepared.gm, "torch.compile region", f"Dynamo's graph, {how},", capture_seconds,
                    fresh=lambda: region(gm, prepared.inputs).gm)
    def check(candidate: Callable[..., Any]) -> Verification:  # candidates take the runtime inputs only
        return reference.check(prepared.caller(candidate, prepared.keep))

    return fold(source, passes, class_name="FoldedRegion", check=check if reference is not None else None,
                verification_note=note)


def _float64_caller(gm: fx.GraphModule, prepared: Region) -> Callable[..., Any]:
    """The region in float64 (fed float64 inputs): the weights and scalars converted, and the weights Dynamo
    installed on the graph itself (it does so when Inductor's freezing is on while tracing)."""
    stored = any(t.is_floating_point() and t.dtype != torch.float64 for t in (*gm.parameters(), *gm.buffers()))
    gm64 = copy.deepcopy(gm).double() if stored else gm
    fixed = {i: x.detach().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
             for i, x in prepared.fixed().items()}
    return prepared.caller(gm64, range(len(prepared.inputs)), fixed)


def _notes(prepared: Region, frozen: int) -> list[str]:
    """What a folded region's report says beyond its tables: lifted scalars, symbolic sizes, guard cost."""
    notes = []
    if prepared.scalars:
        notes.append(f"{len(prepared.scalars)} scalars Dynamo lifted to inputs (layer attributes such as a batch "
                     "norm's eps) were read as constants; each call checks them and runs the region unfolded where "
                     "one changed")
    if any(isinstance(x, torch.SymInt) for x in prepared.inputs):
        notes.append("the region takes symbolic sizes: folded on its symbolic shapes"
                     + ("" if prepared.dynamic() else "; verified at the traced sizes only"))
    if frozen >= _MANY_FROZEN:
        notes.append(f"{frozen} parameters and buffers frozen: Dynamo still checks its guards on the modules that "
                     "hold them at every call (about 2 ms for a thousand); the weights are frozen anyway, so "
                     "torch.compile(..., options={'guard_filter_fn': "
                     "torch.compiler.skip_guard_on_all_nn_modules_unsafe}) drops that cost")
    return notes


def _runner(compiled: Callable[..., Any], prepared: Region, fallback: Callable[[], Callable[..., Any]]
            ) -> Callable[..., Any]:
    """``compiled`` fed the runtime inputs of Dynamo's input list; where a lifted scalar differs from the value
    read at compile time, the unfolded region runs instead (compiled on first need)."""
    keep, scalars = prepared.keep, prepared.scalars
    unfolded: list[Callable[..., Any]] = []

    def run(*args: Any) -> Any:
        if scalars and any(args[i].item() != v for i, v in scalars.items()):
            if not unfolded:
                unfolded.append(fallback())
            return unfolded[0](*args)
        return compiled(*[args[i] for i in keep])

    return run


def _fallback(inner: str, gm: fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
    """The unfolded region compiled with ``inner``, or Dynamo's graph as it is where that fails after the fact."""
    try:
        return compile_with(inner, gm, inputs)
    except Exception as err:
        log.info("fxreparam backend: unfolded region not compiled (%s); it runs eagerly", type(err).__name__)
        return gm


def _warn(message: str) -> None:
    warnings.warn(f"fxreparam: {message}", UserWarning, stacklevel=3)


def _compile(inner: str, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """The inner compile; Inductor gets its freezing treatment (the weights are constants of the graph now)."""
    if inner != "inductor":
        return compile_with(inner, gm, example_inputs)
    return compile_frozen(gm, example_inputs)

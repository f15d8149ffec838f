"""Capture: turn a model into an ``fx.GraphModule`` whose weights are stored constants.

With example inputs the primary path is ``torch.export`` (non-strict), which sees through
Python control flow on shapes, parametrizations and hooks; the graph is then functionalized
(``run_decompositions({})``: in-place writes become ``slice_scatter``/``copy`` data flow) and keeps
export's input guards. Every input dim the model does not pin stays dynamic, the batch dim
included where the example has batch size 1. Without example inputs, or where export fails,
``torch.fx.symbolic_trace`` is tried. If neither works, a :class:`CaptureError` says why and what to do.

The package: :mod:`.export` (torch.export and artifact re-export), :mod:`.functional` (functionalization),
:mod:`.guard` (the input guard), :mod:`.trace` (symbolic_trace), :mod:`.diagnose` (errors in words).
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from ..errors import CaptureError, CaptureInputError, ShapeError
from ..trees import fresh_copies
from .diagnose import _check_inputs, _classify, _input_mismatch, _runs
from .export import DYNAMIC_DIMS, _export_as_asked, _export_checked, _Exported, export_program
from .functional import _to_graph
from .guard import GUARD, ExportGuard, InputGuard, InputSpec, _check_covers, guarded_module, input_spec
from .trace import (
    OPAQUE,
    State,
    copy_model,
    opaque_reason,
    recording_assignments,
    restore_state,
    snapshot_state,
    symbolic_trace,
)

__all__ = [
    "DYNAMIC_DIMS",
    "GUARD",
    "METHODS",
    "OPAQUE",
    "CaptureError",
    "CaptureInputError",
    "Captured",
    "ExportGuard",
    "InputGuard",
    "InputSpec",
    "ShapeError",
    "capture",
    "copy_model",
    "export_program",
    "guarded_module",
    "input_spec",
    "opaque_reason",
    "symbolic_trace",
]

METHODS = ("auto", "export", "symbolic_trace")


@dataclass
class Captured:
    """A captured graph, how it was captured, how long that took, and which input shapes it covers.

    ``example_shapes``, ``dynamic_dims`` and ``input_names`` run over the flattened example inputs
    (``pytree.tree_leaves((args, kwargs))``): the example's shape (``None`` for a non-tensor), the dims
    left dynamic with the ``(min, max)`` sizes export recorded (``max`` ``None``: unbounded), and a name.
    """

    gm: fx.GraphModule
    method: str
    seconds: float
    example_shapes: list[tuple[int, ...] | None] = field(default_factory=list)
    dynamic_dims: list[dict[int, tuple[int, int | None]]] = field(default_factory=list)
    input_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    doubled: bool = False  # a batch-1 example captured as a batch of two copies (see ``_export_checked``)

    @property
    def method_key(self) -> str:
        """The ``capture=`` value that reproduces this capture."""
        return "export" if self.method.startswith("torch.export") else "symbolic_trace"

    def check_inputs(self, args: tuple, kwargs: dict | None = None) -> None:
        """Raise :class:`ShapeError` where the captured graph's guards reject these inputs (runs no model code)."""
        _check_covers(self.gm, args, kwargs)


def _export_restoring(model: nn.Module, args: tuple, kwargs: dict, double: bool, check: bool, dynamic_shapes: Any
                      ) -> tuple[_Exported | None, list[str], list[str], list[str]]:
    """The export attempts, the model's state put back afterwards (export leaves its fake tensors where a forward
    assigns a tensor attribute); returns the program, its notes, the tensor attributes the forward assigned and
    those torch.export put back itself. The program is None where the attempts failed after such an assignment (a
    later attempt saw the cache export put back beside the key the forward added): the caller captures a copy that
    ran once."""
    notes: list[str] = []
    saved = snapshot_state(model)
    exported: _Exported | None = None
    try:
        with recording_assignments(model) as assigned, _put_back_by_export() as put_back:
            if dynamic_shapes is not None:
                exported = _export_as_asked(model, args, kwargs, dynamic_shapes)
            else:
                exported = _export_checked(model, args, kwargs, notes, double, check)
    except Exception:
        if not (assigned or put_back):
            raise
    finally:
        left = restore_state(saved)
        if put_back:
            _drop_added(saved)
    return exported, notes, [*assigned, *(a for a in left if a not in assigned)], put_back


@contextlib.contextmanager
def _put_back_by_export() -> Iterator[list[str]]:
    """Within the block, collect the tensor attributes torch.export says a forward assigned (it puts them back
    itself, warning); its other warnings pass through."""
    put_back: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield put_back
        finally:
            for w in caught:
                found = _EXPORT_ASSIGNED.search(str(w.message))
                if found is not None:
                    put_back += [f"attribute {a.strip()}" for a in found.group(1).split(",") if a.strip()]
    for w in caught:
        if _EXPORT_ASSIGNED.search(str(w.message)) is None:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


_EXPORT_ASSIGNED = re.compile(r"The tensor attributes? (.+?) (?:was|were) assigned during export")


def _drop_added(saved: State) -> None:
    """Remove the module attributes that appeared since ``saved``: where a forward assigned a tensor attribute,
    torch.export puts every attribute a module had back, but keeps those the forward added (a cache key such as
    RT-DETR's ``shapes`` over a class-level default), which would then stand beside the stale cache it put back."""
    for mod, attrs, _, _ in saved:
        for name in [k for k in vars(mod) if k not in attrs]:
            del vars(mod)[name]


def _warmed(model: nn.Module, args: tuple, kwargs: dict) -> nn.Module:
    """A copy of ``model`` run once on the example (its caches filled), every buffer back at the model's values."""
    warm = copy_model(model)
    with torch.no_grad():
        warm(*fresh_copies(args), **fresh_copies(kwargs))
        buffers = dict(model.named_buffers())
        for name, buffer in warm.named_buffers():
            buffer.copy_(buffers[name])
    return warm


def _poisoned(value: torch.Tensor) -> torch.Tensor:
    """A tensor of ``value``'s shape and dtype that differs from it everywhere (nan where floating)."""
    return torch.full_like(value, float("nan")) if value.is_floating_point() or value.is_complex() else value + 1


def _assigned_before_read(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether every tensor attribute the forward assigns on each call is assigned before the call reads it (a per-call
    cache, as old-style ``spectral_norm`` sets ``weight`` from ``weight_orig``): on a copy that ran once, poisoning
    those attributes at call entry leaves the outputs bit for bit as they were. Then no state crosses calls."""
    warm = _warmed(model, args, kwargs)
    entry = {(id(mod), name): value for mod in warm.modules() for name, value in vars(mod).items()
             if isinstance(value, torch.Tensor)}
    buffers = {name: b.clone() for name, b in warm.named_buffers()}
    with torch.no_grad():
        expected = warm(*fresh_copies(args), **fresh_copies(kwargs))
        reassigned = [(mod, name) for mod in warm.modules() for name, value in vars(mod).items()
                      if (id(mod), name) in entry and entry[(id(mod), name)] is not value]
        for name, b in warm.named_buffers():
            b.copy_(buffers[name])
        for mod, name in reassigned:
            object.__setattr__(mod, name, _poisoned(entry[(id(mod), name)]))
        got = warm(*fresh_copies(args), **fresh_copies(kwargs))
    same = pytree.tree_structure(expected) == pytree.tree_structure(got) and all(
        torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        for a, b in zip(pytree.tree_leaves(expected), pytree.tree_leaves(got)))
    return bool(reassigned) and same


def _export(model: nn.Module, args: tuple, kwargs: dict, double: bool = True, check: bool = True,
            dynamic_shapes: Any = None) -> Captured:
    """Capture with torch.export: a functional graph with export's guards, dynamic dims where the model allows
    (``dynamic_shapes``: exactly those, as torch.export takes them). A forward that caches a tensor on the model
    on its first call (an anchor grid) is captured from a copy that has run once; one that assigns a tensor
    attribute on every call keeps state the graph cannot hold, and is refused naming it."""
    start = time.perf_counter()
    exported, notes, assigned, put_back = _export_restoring(model, args, kwargs, double, check, dynamic_shapes)
    assigned += [a for a in put_back if a not in assigned]
    if assigned:  # what export put back on the warm copy is recomputed by the graph (the cache key did not match)
        exported, notes, again, _ = _export_restoring(_warmed(model, args, kwargs), args, kwargs, double, check,
                                                      dynamic_shapes)
        if again and not _assigned_before_read(model, args, kwargs):
            raise CaptureError(f"{type(model).__name__}'s forward assigns {', '.join(again)} on every call: state a "
                               "graph cannot keep. Remedy: register it as a buffer and write it in place "
                               "(self.register_buffer(...), then .copy_(value) in forward).")
        notes.append(f"the forward sets {', '.join(again)} on every call before reading it (a per-call cache, such "
                     "as old-style spectral_norm's weight): captured as the function it computes" if again else
                     f"the forward sets {', '.join(assigned)} on its first call (a cache): captured from a copy "
                     "that ran once on the example")
    if exported is None:
        raise RuntimeError(f"torch.export could not capture {type(model).__name__}, not even from a copy that ran once")
    gm, shapes, dynamic, names = exported.graph or _to_graph(exported.program, args, kwargs)
    return Captured(gm, "torch.export (non-strict)", time.perf_counter() - start, shapes, dynamic, names, notes,
                    exported.doubled)


def capture(model: nn.Module, args: tuple | None, kwargs: dict | None = None, method: str = "auto", *,
            double: bool = True, check: bool = True, dynamic_shapes: Any = None) -> Captured:
    """Capture ``model`` (already in eval mode) as a graph; ``args=None`` means no example inputs.

    ``method``: ``"auto"`` (export where there are example inputs, else or on failure
    symbolic_trace), ``"export"`` or ``"symbolic_trace"`` alone. symbolic_trace is much
    faster on very deep models, export sees through more Python. A batch-1 example is captured as a batch of
    two copies (the batch stays dynamic) where the graph computes the model's outputs on the example itself;
    ``check=False`` leaves that comparison (a run of each) to a caller that verifies anyway, ``double=False``
    captures the example as given (its batch dim then static). ``dynamic_shapes`` (as ``torch.export.export``
    takes it: per input ``{dim: Dim(...) or Dim.AUTO}``, by argument name or in order) captures with exactly
    those dims dynamic, as export does (no batch-of-two example); export must take it then.
    """
    if method not in METHODS:
        raise ValueError(f"unknown capture method {method!r}; choose one of {METHODS}")
    if method == "export" and args is None:
        raise CaptureError("capture='export' needs example inputs")
    if dynamic_shapes is not None and (args is None or method == "symbolic_trace"):
        raise CaptureError("dynamic_shapes needs torch.export: pass example inputs and capture='auto' or 'export' "
                           "(a symbolic_trace graph records no shapes to keep dynamic)")
    kwargs = kwargs or {}
    _check_inputs(model, args or (), kwargs)
    failures: list[str] = []
    if args is not None and method in ("auto", "export"):
        try:
            return _export(model, args, kwargs, double, check, dynamic_shapes)
        except CaptureError:
            raise
        except Exception as err:
            failed = _runs(model, args, kwargs)
            if failed is not None:
                raise _input_mismatch(model, args, kwargs, failed) from err
            failures.append(_classify("torch.export", err))
    start = time.perf_counter()
    try:
        if method == "export":
            raise CaptureError("symbolic_trace not tried (capture='export')")
        gm = symbolic_trace(model)
        shapes: list[tuple[int, ...] | None] = []
        if args is not None:
            leaves = pytree.tree_leaves((args, kwargs))
            shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in leaves]
            if not kwargs:
                ShapeProp(gm).propagate(*args)  # record shapes: some folds need a tensor's rank
        return Captured(gm, "torch.fx.symbolic_trace", time.perf_counter() - start, shapes,
                        [{} for _ in shapes], [f"input {i}" for i in range(len(shapes))])
    except Exception as err:
        failures.append(_classify("torch.fx.symbolic_trace", err) if not isinstance(err, CaptureError)
                        else f"torch.fx.symbolic_trace: {err}")
    hint = ("Remedy: replace Python control flow that depends on tensor values with tensor ops "
            "(torch.where) or torch.cond, optimize the submodules that capture on their own, or use "
            "torch.compile(model, backend='fxreparam'), which folds the graph around such code.")
    if args is None:
        hint = "Remedy: pass example inputs (optimize(model, example_inputs)) so torch.export can capture it."
    raise CaptureError(f"could not capture {type(model).__name__}:\n  " + "\n  ".join(failures) + "\n" + hint)

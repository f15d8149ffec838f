"""torch.export captures: dynamic dims (the batch by default, or ``dynamic_shapes`` as given), the batch-of-two
example, and the re-export of a folded module with its capture's dims for artifacts."""

from __future__ import annotations

import contextlib
import inspect
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..errors import CaptureError, ShapeError
from ..trees import fresh_copies
from .diagnose import _first_lines, _input_mismatch, _runs
from .functional import _to_graph
from .guard import GUARD, InputGuard, _check_covers, _flatten_by_spec


def _auto() -> Any:
    """``torch.export.Dim.AUTO``, or None on a torch without it (then capture is static)."""
    return getattr(getattr(torch.export, "Dim", None), "AUTO", None)


def _by_signature(model: nn.Module, args: tuple, kwargs: dict, spec: Callable[[Any], Any]) -> Any:
    """``dynamic_shapes`` shaped as export binds them, ``spec(x)`` for each input ``x``: keyed by the forward's
    parameter names, ``*args`` as a tuple and ``**kwargs`` as a dict; positional where there is no signature."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):  # no readable signature: positional specs, as export reads them
        return tuple(pytree.tree_map(spec, a) for a in args)
    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict, dims: str) -> Any:
    """``dynamic_shapes`` marking every dim (``dims="all"``) or dim 0 (``"batch"``) of size >= 2 automatic.

    Export keeps such a dim symbolic unless the model pins it (then it specializes it and guards it).
    """
    auto = _auto()

    def spec(x: Any) -> Any:
        """One input's ``{dim: Dim.AUTO}`` (None: nothing to mark)."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        chosen = range(x.dim()) if dims == "all" else (0,)
        marked = {d: auto for d in chosen if x.shape[d] >= 2}
        return marked or None

    return _by_signature(model, args, kwargs, spec)


def _batch_of_two(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The example with every batched input (rank >= 2) of batch size 1 doubled, or None where that does not apply.

    Export specializes a size-1 dim (its 0/1 rule); capturing at batch 2 keeps the batch dynamic.
    Applies only where every input of rank >= 2 has batch size 1 (the batch dims then agree).
    """
    batched = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor) and x.dim() >= 2]
    if not batched or any(x.shape[0] != 1 for x in batched):
        return None

    def double(x: Any) -> Any:
        """A batched input stacked twice along dim 0."""
        return torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else x

    return pytree.tree_map(double, args), pytree.tree_map(double, kwargs)


def _export_program(model: nn.Module, args: tuple, kwargs: dict, dims: str | None,
                    dynamic_shapes: Any = None) -> Any:
    """One ``torch.export`` attempt, non-strict, with ``dynamic_shapes`` as given, else with ``dims`` (``"all"``,
    ``"batch"``, None: static) automatic. What export prints on failure (the partial graph) is kept off the
    user's stderr: the error says it all."""
    dynamic = dynamic_shapes
    if dynamic is None and dims is not None and _auto() is not None:
        dynamic = _dynamic_shapes(model, args, kwargs, dims)
    with contextlib.redirect_stderr(io.StringIO()):
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)


def _same_outputs(a: Any, b: Any) -> bool:
    """Whether two output trees agree in structure, shapes and values (to float rounding)."""
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb:
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            if x.is_floating_point() or x.is_complex():
                scale = float(x.detach().abs().max()) if x.numel() else 0.0
                if not torch.allclose(x, y, rtol=1e-4, atol=1e-5 * max(scale, 1.0), equal_nan=True):
                    return False
            elif not torch.equal(x, y):
                return False
    return True


DYNAMIC_DIMS = "batch"


"""Which input dims capture keeps dynamic: the batch. ``"all"`` (spatial sizes too, where the model allows)
works but costs: exporting mobileone_s0 took 21.7 s against 7.9 s with the batch alone (7.1 s static), since
export then reasons about every spatial size symbolically. Spatial sizes stay guarded: another size raises
:class:`ShapeError` naming the dim and the captured size."""


@dataclass
class _Exported:
    """An exported program; where the batch-of-two capture built it already, its graph."""

    program: Any
    graph: tuple[fx.GraphModule, list, list, list] | None = None
    doubled: bool = False


def _computes_example(model: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict) -> bool:
    """Whether a batch-of-two graph computes the model's outputs on the batch-1 example itself (a run of each)."""
    with torch.no_grad():
        return _same_outputs(model(*fresh_copies(args), **fresh_copies(kwargs)),
                             gm(*fresh_copies(args), **fresh_copies(kwargs)))


def _export_checked(model: nn.Module, args: tuple, kwargs: dict, notes: list[str], double: bool = True,
                    check: bool = True) -> _Exported:
    """:func:`export_program`'s work. A batch-1 example is exported as a batch of two copies (``double``) where
    the graph then computes the model's outputs on the example itself: ``check`` runs both to see; without it,
    only the guards are asked, and the caller's verification (which runs the example anyway) must do the rest
    (``optimize`` captures again as given where it fails)."""
    doubled = _batch_of_two(args, kwargs) if double else None
    if doubled is not None and _auto() is not None:
        try:
            program = _export_program(model, *doubled, DYNAMIC_DIMS)
            graph = _to_graph(program, args, kwargs)
            _check_covers(graph[0], args, kwargs)
            if not check or _computes_example(model, graph[0], args, kwargs):
                notes.append("batch size 1 example: captured on a batch of 2 copies so the batch stays dynamic")
                return _Exported(program, graph, doubled=True)
            notes.append("captured at batch size 1 only: the model computes something else at batch size 2")
        except Exception:  # the model pins its batch size, or needs the example's: capture it as given
            pass
    elif not double and _batch_of_two(args, kwargs) is not None:
        notes.append("batch size 1 example captured as given (double=False): its batch dim is static")
    if _auto() is not None:
        try:
            return _Exported(_export_program(model, args, kwargs, DYNAMIC_DIMS))
        except Exception:  # the model pins its dynamic dims: capture it static
            pass
    return _Exported(_export_program(model, args, kwargs, None))  # its error, if any, has concrete sizes


def _placeholder_order(args: tuple, kwargs: dict, in_spec: Any) -> list[int]:
    """For each placeholder of a graph with input spec ``in_spec``, which flat example input it is (the index in
    ``pytree.tree_leaves((args, kwargs))``)."""
    leaves, user_spec = pytree.tree_flatten((args, kwargs))
    index_args, index_kwargs = pytree.tree_unflatten(list(range(len(leaves))), user_spec)
    return _flatten_by_spec(index_args, index_kwargs, in_spec)


def _guard_dims(guard: InputGuard, k: int, shared: dict[str, Any]) -> dict[int, Any]:
    """Input ``k``'s dynamic dims as export takes them: one ``Dim`` per symbol, its range kept and shared (through
    ``shared``) by every dim that is the same symbol; ``Dim.AUTO`` for a derived size."""
    dims: dict[int, Any] = {}
    for d, (low, high) in guard.dynamic[k].items():
        symbol = guard.symbols[k].get(d)
        if symbol is None:
            dims[d] = _auto()
            continue
        bounds = {"min": low} if low > 2 else {}  # 2 is export's own floor for a dynamic size (its 0/1 rule)
        if high is not None:
            bounds["max"] = high
        dims[d] = shared.setdefault(symbol, torch.export.Dim(symbol, **bounds))
    return dims


def _widened(x: Any, dims: dict[int, Any]) -> Any:
    """An example input stacked twice along each dynamic dim where it has size 1 (export would pin it)."""
    for d in dims:
        if isinstance(x, torch.Tensor) and x.shape[d] == 1:
            x = torch.cat([x, x], d)
    return x


def _export_like_guard(model: fx.GraphModule, guard: InputGuard, args: tuple, kwargs: dict) -> Any:
    """``torch.export`` of a folded module with exactly the dims its :class:`InputGuard` has dynamic (the same
    symbols, the same ranges), on the example widened to size 2 where a dynamic dim has size 1."""
    leaves, tree = pytree.tree_flatten((args, kwargs))
    order = _placeholder_order(args, kwargs, model._in_spec)
    if len(order) != len(guard.names):
        raise ShapeError(f"the folded module takes {len(guard.names)} inputs ({', '.join(guard.names)}), the example "
                         f"has {len(order)}")
    guard(*(leaves[i] for i in order))  # an example the module does not take: say so before exporting
    shared: dict[str, Any] = {}
    dims = {i: _guard_dims(guard, k, shared) for k, i in enumerate(order)}
    wide = [_widened(x, dims.get(i, {})) for i, x in enumerate(leaves)]
    by_id = {id(x): dims.get(i) or None for i, x in enumerate(wide)}
    wide_args, wide_kwargs = pytree.tree_unflatten(wide, tree)
    spec = _by_signature(model, wide_args, wide_kwargs, lambda x: by_id.get(id(x)))
    return _export_program(model, wide_args, wide_kwargs, None, dynamic_shapes=spec)


def export_program(model: nn.Module, args: tuple, kwargs: dict, notes: list[str] | None = None) -> Any:
    """``torch.export`` (non-strict) of ``model`` for an artifact.

    A folded module with an :class:`InputGuard` is exported with the same dims dynamic as its capture
    (``dynamic_shapes`` given to ``capture``/``optimize``, or the default batch). Any other model is exported
    with the :data:`DYNAMIC_DIMS` it does not pin dynamic: a batch-1 example as a batch of 2 copies (export
    would pin a size-1 dim) where the result then computes the model's output on the example itself; where
    dynamic dims fail, static shapes (the error of that attempt, with concrete sizes, is raised).
    """
    guard = getattr(model, GUARD, None)
    if isinstance(guard, InputGuard) and isinstance(model, fx.GraphModule) and hasattr(model, "_in_spec"):
        return _export_like_guard(model, guard, args, kwargs)
    return _export_checked(model, args, kwargs, notes if notes is not None else []).program


def _export_as_asked(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> _Exported:
    """torch.export with the caller's ``dynamic_shapes`` exactly as given (no batch-of-two example)."""
    try:
        return _Exported(_export_program(model, args, kwargs, None, dynamic_shapes=dynamic_shapes))
    except Exception as err:
        failed = _runs(model, args, kwargs)
        if failed is not None:
            raise _input_mismatch(model, args, kwargs, failed) from err
        raise CaptureError(f"torch.export could not capture {type(model).__name__} with the given dynamic_shapes: "
                           f"{type(err).__name__}: {_first_lines(err, 6)}. Remedy: mark only the dims the model "
                           "keeps free (Dim.AUTO lets export pin the others), or pass dynamic_shapes=None for the "
                           "default (a dynamic batch)") from err

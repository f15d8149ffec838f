"""Capture: turn a model into an ``fx.GraphModule`` whose weights are stored constants.

With example inputs the primary path is ``torch.export`` (non-strict), which sees through
Python control flow on shapes, parametrizations and hooks; the graph is then functionalized
(``run_decompositions({})``: in-place writes become ``slice_scatter``/``copy`` data flow) and keeps
export's input guards. Every input dim the model does not pin stays dynamic, the batch dim
included where the example has batch size 1. Without example inputs, or where export fails,
``torch.fx.symbolic_trace`` is tried. If neither works, a :class:`CaptureError` says why and what to do.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import operator
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from .errors import CaptureError, CaptureInputError, ShapeError
from .verify import fresh_copies

__all__ = [
    "METHODS",
    "CaptureInputError",
    "Captured",
    "ExportGuard",
    "InputGuard",
    "ShapeError",
    "capture",
    "copy_model",
    "export_program",
    "guarded_module",
    "input_spec",
    "symbolic_trace",
]

METHODS = ("auto", "export", "symbolic_trace")
GUARD = "_guards_fn"  # torch.export's name for its input-guard submodule; the guard node keeps it
OPAQUE = "fxreparam_opaque"  # node.meta key: why a call_module must be kept as it is (recognizers skip it)
Shape = tuple[int, ...]
Dynamic = dict[int, tuple[int, int | None]]  # dim -> (min, max) sizes export allows; max None: unbounded


# ----------------------------------------------------------------------------------------------- result


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


# ----------------------------------------------------------------------------------------------- guards


def _dims_text(dims: dict[int, Any]) -> str:
    """``"0, 2, 3"``: the dims of a dynamic-dims map, for messages."""
    return ", ".join(str(d) for d in sorted(dims)) or "none"


class InputGuard(nn.Module):
    """The folded model's input check: rank and pinned dims first, then torch.export's own guards.

    It is a ``call_module`` node right after the placeholders (named ``_guards_fn``, as export names
    it), so it survives every rebuild of the graph module. A rejected input raises :class:`ShapeError`
    naming the input, the dim and the size the capture covers.
    """

    _is_impure = True  # a check with no users: dead-code elimination must keep it

    def __init__(self, names: list[str], shapes: list[tuple[int, ...] | None],
                 dynamic: list[dict[int, tuple[int, int | None]]], export_guard: nn.Module | None,
                 symbols: list[dict[int, str]] | None = None) -> None:
        """Per input in placeholder order: name, example shape (None: not a tensor), dynamic dims; export's guard;
        per input, the symbol each dynamic dim is (dims sharing one symbol must agree; derived sizes have none)."""
        super().__init__()
        self.names, self.shapes, self.dynamic = names, shapes, dynamic
        self.symbols = symbols if symbols is not None else [{} for _ in names]
        self.export_guard = export_guard
        self.single = len(names) == 1  # return the lone input itself rather than a 1-tuple

    def _captured(self) -> str:
        """What the capture covers, in words: each input's example shape and dynamic dims."""
        parts = [f"{n!r} of shape {list(s)} (dynamic dims: {_dims_text(d)})"
                 for n, s, d in zip(self.names, self.shapes, self.dynamic) if s is not None]
        return "captured with " + "; ".join(parts)

    def _fail(self, what: str) -> ShapeError:
        """The error for a rejected call: what failed, what the capture covers, what to do."""
        return ShapeError(f"input shapes not covered by the capture: {what}; {self._captured()}. "
                          "Remedy: optimize again with example inputs of the shape you call the model with.")

    def forward(self, *inputs: Any) -> Any:
        """Check ``inputs``; return them (the input itself where there is one), for the graph to read on."""
        for name, x, shape, dynamic in zip(self.names, inputs, self.shapes, self.dynamic):
            if shape is None or not isinstance(x, torch.Tensor):
                continue
            if x.dim() != len(shape):
                raise self._fail(f"input {name!r} has {x.dim()} dims, the capture covers {len(shape)}")
            for d, size in enumerate(shape):
                if d not in dynamic and x.shape[d] != size:
                    raise self._fail(f"input {name!r} has size {x.shape[d]} at dim {d}, the capture covers only "
                                     f"{size} there (shape {list(x.shape)})")
        if self.export_guard is not None:
            try:
                self.export_guard(*inputs)
            except AssertionError as err:
                raise self._fail(f"{err} (torch.export's guard; x.size()[d] is dim d of input x)") from err
        return inputs[0] if self.single else inputs


class ExportGuard(nn.Module):
    """torch.export's input guards, kept as their code so the module pickles and deep-copies.

    ``program.module()`` installs them as a function wrapped in a local closure, which ``torch.save`` cannot
    pickle; this module rebuilds that function from the code after loading.
    """

    _is_impure = True

    def __init__(self, code: list[str], paths: list[Any]) -> None:
        """``code``: the guard expressions; ``paths``: each input's pytree path (as torch builds them)."""
        super().__init__()
        self.code, self.paths = code, paths
        self._build()

    def _build(self) -> None:
        """Materialize the guard function (torch's own builder, so Dynamo traces it as it traces export's)."""
        from torch.export import _unlift

        object.__setattr__(self, "check", _unlift._convert_guards_code_to_fn(self.code, self.paths).forward)

    def __getstate__(self) -> dict[str, Any]:
        """The module's state without the built function (a closure pickle cannot hold)."""
        return {k: v for k, v in self.__dict__.items() if k != "check"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore the state and build the guard function again."""
        self.__dict__.update(state)
        self._build()

    def forward(self, *inputs: Any) -> None:
        """Assert export's guards on ``inputs`` (an ``AssertionError`` names the one that failed)."""
        self.check(*inputs)


def _unlifted(program: Any) -> fx.GraphModule:
    """``program.module()`` with export's guard as an :class:`ExportGuard` (picklable), where this torch builds its
    guard the way :class:`ExportGuard` rebuilds it; else export's own (a module that then does not pickle)."""
    from torch.export import _unlift

    build = getattr(_unlift, "_convert_guards_code_to_fn", None)
    if build is None:
        return program.module()
    recorded: list[tuple[list[str], list[Any]]] = []

    def record(code: list[str], paths: list[Any]) -> Any:
        recorded.append((list(code), list(paths)))
        return build(code, paths)

    _unlift._convert_guards_code_to_fn = record
    try:
        gm = program.module()
    finally:
        _unlift._convert_guards_code_to_fn = build
    if recorded and isinstance(getattr(gm, GUARD, None), nn.Module):
        setattr(gm, GUARD, ExportGuard(*recorded[-1]))
    return gm


def _flatten_by_spec(args: tuple, kwargs: dict, spec: Any) -> list[Any]:
    """The inputs in the graph's placeholder order (export's input spec)."""
    from torch.fx._pytree import tree_flatten_spec

    return list(tree_flatten_spec((tuple(args), dict(kwargs)), spec))


# ----------------------------------------------------------------------------------------------- export


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


def _symbol_range(program: Any, size: Any) -> tuple[int, int | None] | None:
    """``(min, max)`` export allows for a symbolic size, or None where it is a plain number."""
    if not isinstance(size, torch.SymInt):
        return None
    expr = size.node.expr
    if getattr(expr, "is_number", False):
        return None
    bounds = program.range_constraints.get(expr)
    if bounds is None:
        return (0, None)
    try:
        upper: int | None = int(bounds.upper)
    except (TypeError, ValueError, AttributeError, OverflowError):
        upper = None
    return int(bounds.lower), (upper if upper is not None and upper < sys.maxsize - 1 else None)


def _hint(size: Any) -> int:
    """A size's example value (a symbolic size's hint)."""
    return int(size.node.hint) if isinstance(size, torch.SymInt) else int(size)


class InputSpec(NamedTuple):
    """One user input of an exported program: its name, example shape (None: not a tensor), dynamic dims with
    their ``(min, max)`` sizes, and the symbol each dynamic dim is where it is one (not a derived size)."""

    name: str
    shape: Shape | None
    dynamic: Dynamic
    symbols: dict[int, str]


def _symbol(size: Any) -> str | None:
    """The name of a symbolic size that is a bare symbol (``s17``), None for a number or a derived size."""
    expr = size.node.expr if isinstance(size, torch.SymInt) else None
    return str(expr) if expr is not None and getattr(expr, "is_Symbol", False) else None


def input_spec(program: Any) -> list[InputSpec]:
    """Per user input of an exported program, in order (one per flattened input, as ``program.module()``'s
    placeholders): its :class:`InputSpec`."""
    user_kind = torch.export.graph_signature.InputKind.USER_INPUT
    names = [str(getattr(s.arg, "name", i)) for i, s in enumerate(program.graph_signature.input_specs)
             if s.kind == user_kind]
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    spec: list[InputSpec] = []
    for name in names:
        val = nodes[name].meta.get("val") if name in nodes else None
        if not isinstance(val, torch.Tensor):
            spec.append(InputSpec(name, None, {}, {}))
            continue
        dynamic = {d: r for d, s in enumerate(val.shape) if (r := _symbol_range(program, s)) is not None}
        symbols = {d: sym for d in dynamic if (sym := _symbol(val.shape[d])) is not None}
        spec.append(InputSpec(name, tuple(_hint(s) for s in val.shape), dynamic, symbols))
    return spec


def _strip_metadata_asserts(gm: fx.GraphModule) -> None:
    """Remove ``aten._assert_tensor_metadata``: dtype/device checks left by ``.float()``/``.to()`` in forward
    that would reject a float64 copy of the graph (they assert, they compute nothing)."""
    target = getattr(getattr(torch.ops.aten, "_assert_tensor_metadata", None), "default", None)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and target is not None and node.target == target and not node.users:
            gm.graph.erase_node(node)


def _install_guard(gm: fx.GraphModule, guard: InputGuard) -> None:
    """Call ``guard`` (wrapping export's own guard) on the inputs before anything reads them.

    Every reader of a tensor input reads it through the guard's output, so no rewrite can move a
    computation on an unchecked input ahead of the check (export's guard call has no users).
    """
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target == GUARD]:
        graph.erase_node(node)
    setattr(gm, GUARD, guard)
    guard.single = len(placeholders) == 1
    with graph.inserting_after(placeholders[-1]):
        call = graph.create_node("call_module", GUARD, tuple(placeholders), {},
                                 name=f"{placeholders[0].name}_checked" if guard.single else "inputs_checked")
    call.meta["fxreparam_guard"] = True
    anchor = call
    for i, ph in enumerate(placeholders):
        val = ph.meta.get("val")
        if val is not None and not isinstance(val, torch.Tensor):
            continue  # a non-tensor input (a number): nothing to read through the guard
        if guard.single:
            checked = call
        else:
            with graph.inserting_after(anchor):
                checked = graph.create_node("call_function", operator.getitem, (call, i), {},
                                            name=f"{ph.name}_checked")
            anchor = checked
        checked.meta.update({k: v for k, v in ph.meta.items() if k in ("val", "tensor_meta", "example_value")})
        ph.replace_all_uses_with(checked, delete_user_cb=lambda user: user is not call)
    gm.recompile()


def guarded_module(program: Any, shapes: list[tuple[int, ...] | None] | None = None) -> fx.GraphModule:
    """``program.module()`` with an :class:`InputGuard` around export's guard, so a rejected call names the dim.

    ``shapes``: the example shapes to quote in errors, per placeholder (default: the program's own).
    """
    gm = _unlifted(program)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    spec = input_spec(program)
    if len(spec) != len(placeholders):  # not one entry per placeholder: check nothing rather than the wrong input
        spec = [InputSpec(name, None, {}, {}) for name in placeholders]
    guard = InputGuard([s.name for s in spec], shapes or [s.shape for s in spec], [s.dynamic for s in spec],
                       getattr(gm, GUARD, None), [s.symbols for s in spec])
    _install_guard(gm, guard)
    return gm


def _out_of_place(target: Any) -> Any:
    """The out-of-place twin of an aten op that writes only into its first argument (``relu_`` -> ``relu``)."""
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.is_mutable or not schema.arguments:
        return None
    first, *rest = schema.arguments
    if first.alias_info is None or not first.alias_info.is_write or any(
            a.alias_info is not None and a.alias_info.is_write for a in rest):
        return None
    name = schema.name.split("::")[-1]
    if not name.endswith("_") or name.endswith("__"):
        return None
    return getattr(getattr(torch.ops.aten, name[:-1], None), target._overloadname, None)


def _fresh_unaliased(node: Any, writer: fx.Node) -> bool:
    """A tensor the forward made itself (no input, no stored tensor, no view) that nothing but ``writer``
    reads through an alias (a view, or another in-place op)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is None or schema.is_mutable or any(r.alias_info for r in schema.returns):
        return False
    return all(u is writer or u.op == "output" or not any(
        r.alias_info for r in getattr(getattr(u.target, "_schema", None), "returns", ())) for u in node.users)


def _rewrite_in_place(gm: fx.GraphModule) -> bool:
    """Turn each in-place write into a tensor nothing else aliases (``relu_`` after a conv) into its out-of-place
    twin, later readers reading the result: functionalization for the common case, without re-tracing.

    Returns whether no write is left; where one is (a write through a view, into an input), the caller
    functionalizes the program for real."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not getattr(getattr(node.target, "_schema", None), "is_mutable", False):
            continue
        pure, written = _out_of_place(node.target), node.args[0] if node.args else None
        if pure is None or not _fresh_unaliased(written, node):
            return False
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(pure, node.args, node.kwargs)
        new.meta.update(node.meta)
        order[new] = order[node]
        for user in list(written.users):  # later readers see the written value
            if user is not node and order[user] > order[node]:
                user.replace_input_with(written, new)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    return True


def _functional_module(program: Any, shapes: list[tuple[int, ...] | None] | None) -> fx.GraphModule:
    """The guarded graph module of ``program`` with no in-place write left: rewritten directly where every
    write is into a tensor nothing aliases (most models), else through ``run_decompositions`` (slower: it
    traces the program again)."""
    gm = guarded_module(program, shapes)
    _strip_metadata_asserts(gm)
    if not _rewrite_in_place(gm):
        gm = guarded_module(program.run_decompositions({}), shapes)
        _strip_metadata_asserts(gm)
    gm.recompile()
    return gm


def _to_graph(program: Any, args: tuple, kwargs: dict) -> tuple[fx.GraphModule, list, list, list]:
    """The functional, guarded graph module of an exported program, and per flat user input (in
    ``pytree.tree_leaves((args, kwargs))`` order): example shape, dynamic dims, name."""
    leaves, user_spec = pytree.tree_flatten((args, kwargs))
    shapes: list[tuple[int, ...] | None] = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in leaves]
    # Which user input each placeholder is: flatten the inputs' positions the way the program does.
    index_args, index_kwargs = pytree.tree_unflatten(list(range(len(leaves))), user_spec)
    order = _flatten_by_spec(index_args, index_kwargs, program.call_spec.in_spec)
    gm = _functional_module(program, [shapes[i] for i in order] if len(order) == len(leaves) else None)
    guard = getattr(gm, GUARD)
    dynamic: list[dict[int, tuple[int, int | None]]] = [{} for _ in leaves]
    names = [f"input {i}" for i in range(len(leaves))]
    if len(order) == len(guard.names):
        for i, name, dims in zip(order, guard.names, guard.dynamic):
            names[i], dynamic[i] = name, dims
    return gm, shapes, dynamic, names


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


def _check_covers(gm: fx.GraphModule, args: tuple, kwargs: dict | None = None) -> None:
    """Raise :class:`ShapeError` where a captured graph's guards reject these inputs (runs no model code)."""
    guard = getattr(gm, GUARD, None)
    spec = getattr(gm, "_in_spec", None)
    if isinstance(guard, InputGuard) and spec is not None:
        guard(*_flatten_by_spec(args, kwargs or {}, spec))


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


def _export(model: nn.Module, args: tuple, kwargs: dict, double: bool = True, check: bool = True,
            dynamic_shapes: Any = None) -> Captured:
    """Capture with torch.export: a functional graph with export's guards, dynamic dims where the model allows
    (``dynamic_shapes``: exactly those, as torch.export takes them)."""
    start = time.perf_counter()
    notes: list[str] = []
    if dynamic_shapes is not None:
        exported = _export_as_asked(model, args, kwargs, dynamic_shapes)
    else:
        exported = _export_checked(model, args, kwargs, notes, double, check)
    gm, shapes, dynamic, names = exported.graph or _to_graph(exported.program, args, kwargs)
    return Captured(gm, "torch.export (non-strict)", time.perf_counter() - start, shapes, dynamic, names, notes,
                    exported.doubled)


# ----------------------------------------------------------------------------------------------- symbolic_trace


def _standard_class(cls: type) -> type | None:
    """The first ``torch.nn`` layer class (not ``nn.Module`` itself) in ``cls``'s MRO."""
    for base in cls.__mro__:
        if base is nn.Module:
            return None
        if base.__module__.startswith("torch.nn.modules."):
            return base
    return None


def opaque_reason(mod: nn.Module, leaf: bool) -> str | None:
    """Why a module must stay an opaque ``call_module`` node (its run is not what its class's layer computes)."""
    if mod._forward_hooks or mod._forward_pre_hooks:
        kinds = [k for k, hooks in (("forward hooks", mod._forward_hooks), ("forward pre-hooks",
                                                                           mod._forward_pre_hooks)) if hooks]
        return "has " + " and ".join(kinds)
    if leaf:
        std = _standard_class(type(mod))
        if std is not None and type(mod) is not std and type(mod).forward is not std.forward:
            return f"overrides forward ({type(mod).__module__}.{type(mod).__qualname__})"
    return None


class _Tracer(fx.Tracer):
    """``symbolic_trace``'s tracer with an O(1) parameter lookup and opaque modules kept whole.

    The stock ``Tracer.getattr`` scans every named parameter each time ``forward`` reads one,
    which is quadratic in depth for models that use their parameters directly (DiracNet).
    A module with hooks, or a torch layer subclass that overrides ``forward`` (QAT's fake-quantized
    convs), is traced as a leaf whose node carries ``meta["fxreparam_opaque"]`` (the reason).
    """

    proxy_buffer_attributes = True  # a buffer read is a node: a write into it (``self.count.add_(1)``) is recorded

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        """Trace ``root``, indexing its parameters and buffers by identity first."""
        self._tensor_names: dict[int, str] = {}
        if isinstance(root, nn.Module):
            for name, t in [*root.named_parameters(), *root.named_buffers()]:
                self._tensor_names.setdefault(id(t), name)
        return super().trace(root, concrete_args)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """torch's leaves, and every module that must stay opaque (see :func:`opaque_reason`)."""
        leaf = super().is_leaf_module(m, module_qualified_name)
        return leaf or opaque_reason(m, leaf) is not None

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        """Trace a module call; an opaque module's node records why it is opaque."""
        reason = opaque_reason(m, fx.Tracer.is_leaf_module(self, m, self.path_of_module(m)))
        out = super().call_module(m, forward, args, kwargs)
        if reason is not None and isinstance(out, fx.Proxy):
            out.node.meta[OPAQUE] = reason
        return out

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """A parameter or buffer read as a ``get_attr`` node, found by identity in O(1)."""
        if isinstance(attr_val, nn.Parameter) or (self.proxy_buffer_attributes and isinstance(attr_val, torch.Tensor)):
            name = self._tensor_names.get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return attr_val

    def create_arg(self, a: Any) -> Any:
        """A stored tensor passed as an argument becomes a ``get_attr`` of its own name, not a copied constant."""
        if isinstance(a, torch.Tensor) and id(a) in getattr(self, "_tensor_names", {}):
            return self.create_node("get_attr", self._tensor_names[id(a)], (), {})
        return super().create_arg(a)


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` in linear time, with hooked and forward-overriding layers kept opaque."""
    hooks = [k for k, h in (("forward hooks", model._forward_hooks), ("forward pre-hooks", model._forward_pre_hooks))
             if h]
    if hooks:
        raise CaptureError(f"{type(model).__name__} has {' and '.join(hooks)} on the model itself, which "
                           "symbolic_trace would silently drop. Remedy: pass example inputs (and capture='auto' or "
                           "'export') so torch.export runs the hooks, or remove them.")
    saved = [(mod, dict(vars(mod)), dict(mod._buffers), dict(mod._parameters)) for mod in model.modules()]
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    finally:
        assigned = _restore(saved)
    if assigned:
        raise CaptureError(f"{type(model).__name__}'s forward assigns {', '.join(assigned)}, which symbolic_trace "
                           "cannot keep as a write. Remedy: pass example inputs so torch.export captures the write "
                           "(run the model once first where it caches a tensor on itself), or write in place "
                           "(self.count.add_(1), self.count.copy_(value)), which the graph keeps.")
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _restore(saved: list[tuple[nn.Module, dict, dict, dict]]) -> list[str]:
    """Put back every module attribute, buffer and parameter a trace assigned (a traced forward that sets
    ``self.count = self.count + 1`` leaves a proxy there); returns the tensor ones assigned, named, for the error."""
    assigned: list[str] = []
    for mod, attrs, buffers, params in saved:
        for kind, now, before in (("buffer", mod._buffers, buffers), ("parameter", mod._parameters, params),
                                  ("attribute", vars(mod), attrs)):
            changed = [k for k, v in now.items() if (k not in before or before[k] is not v)
                       and isinstance(v, (torch.Tensor, fx.Proxy))]
            assigned += [f"{kind} {k!r} ({type(mod).__name__})" for k in changed]
            now.clear()
            now.update(before)
    return assigned


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also where a forward run under autograd left a computed tensor on a module (old-style
    ``spectral_norm``'s ``weight``, a cache), which deepcopy refuses: such a tensor is copied detached."""
    computed = {id(t): t.detach().clone() for mod in model.modules()
                for t in [*vars(mod).values(), *mod._buffers.values()] if isinstance(t, torch.Tensor) and not t.is_leaf}
    return copy.deepcopy(model, computed)


# ----------------------------------------------------------------------------------------------- errors


_SYMBOL = re.compile(r"\b[su]\d+\b")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _internal_dirs() -> tuple[str, ...]:
    """Where torch, sympy, the standard library and fxreparam live: frames there are not the model's code."""
    dirs = [_PACKAGE_DIR, os.path.dirname(os.path.abspath(torch.__file__)), os.path.dirname(os.__file__)]
    try:
        import sympy

        dirs.append(os.path.dirname(os.path.abspath(sympy.__file__)))
    except ImportError:
        pass
    return tuple(dirs)


_INTERNAL_DIRS = _internal_dirs()


def _first_lines(err: BaseException, n: int = 3) -> str:
    """The first lines of an error's message, symbolic sizes (``s77``) replaced by words."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return _SYMBOL.sub("<a dynamic size>", " ".join(lines[:n])[:500])


def _user_frame(err: BaseException) -> str:
    """``file:line (code)`` of the innermost frame of the model's own code in an error's traceback, or ''."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not f.filename.startswith(_INTERNAL_DIRS) and not f.filename.startswith("<")]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno}" + (f" ({f.line.strip()})" if f.line else "")


def _expected_input(model: nn.Module) -> str:
    """What the model's first layer takes, in words (``[N, 3, H, W]``), or '' where it has none we know."""
    spatial = ("L", "H, W", "D, H, W")
    for name, mod in model.named_modules():
        where = f"first layer, {name or type(model).__name__} ({type(mod).__name__}),"
        if isinstance(mod, nn.modules.conv._ConvNd) and 1 <= len(mod.kernel_size) <= 3:
            return f"{where} takes inputs of shape [N, {mod.in_channels}, {spatial[len(mod.kernel_size) - 1]}]"
        if isinstance(mod, nn.Linear):
            return f"{where} takes inputs of shape [..., {mod.in_features}]"
        if isinstance(mod, nn.Embedding):
            return f"{where} takes integer indices below {mod.num_embeddings}"
    return ""


def _describe(x: Any) -> str:
    """An example input in words (``a torch.float32 tensor of shape [2, 3]``, ``a numpy.ndarray``), for messages."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)}"
    return f"a {type(x).__module__}.{type(x).__qualname__}" if type(x).__module__ != "builtins" else (
        f"a {type(x).__name__}")


def _check_inputs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse, with a remedy, weights on the meta device and example inputs of types a tracer cannot take."""
    meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise CaptureInputError(f"{type(model).__name__}'s parameters are on the meta device ({meta[0]}, ...): there "
                           "are no weights to fold. Remedy: load real weights first (model.to_empty(device=...) "
                           "then load_state_dict, or load_state_dict(..., assign=True)).")
    leaves = pytree.tree_leaves((args, kwargs))
    for i, x in enumerate(leaves):
        if type(x).__module__ == "numpy":
            raise CaptureInputError(f"example input {i} is {_describe(x)}: pass torch tensors "
                               "(torch.from_numpy(a) or torch.as_tensor(a)).")
        if isinstance(x, torch.Tensor) and x.is_meta:
            raise CaptureInputError(f"example input {i} is on the meta device: pass real tensors.")
    if (args or kwargs) and not any(isinstance(x, torch.Tensor) for x in leaves):
        kinds = ", ".join(sorted({_describe(x) for x in leaves})) or "nothing"
        raise CaptureInputError(f"the example inputs hold no tensor ({kinds}): pass tensors, e.g. torch.tensor(values) "
                           "for a Python list of numbers.")


def _runs(model: nn.Module, args: tuple, kwargs: dict) -> BaseException | None:
    """The error the model raises on the example inputs in eager mode, or None where it runs."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as err:
        return err
    return None


def _input_mismatch(model: nn.Module, args: tuple, kwargs: dict, err: BaseException) -> CaptureInputError:
    """The error for example inputs the model itself rejects, naming what its first layer takes."""
    shapes = ", ".join(_describe(x) for x in pytree.tree_leaves((args, kwargs)))
    expected = _expected_input(model)
    return CaptureInputError(f"{type(model).__name__} does not run on the example inputs ({shapes}): "
                        f"{type(err).__name__}: {_first_lines(err)}{_user_frame(err)}. "
                        + (f"The model's {expected}. " if expected else "")  # "The model's first layer, ... takes"
                        + "Remedy: pass example inputs the model accepts (check the shape, dtype and device).")


def _classify(stage: str, err: BaseException) -> str:
    """One line saying why a tracer failed, with the model's code line where there is one."""
    text = str(err)
    where = _user_frame(err)
    if ("data-dependent" in text or "symbolically traced variables cannot be used as inputs to control flow" in text
            or type(err).__name__ in ("GuardOnDataDependentSymNode", "TraceError")):
        return (f"{stage}: the model's Python code branches on a tensor's value{where} (if/while on a tensor, "
                ".item(), bool(), int()); a graph cannot hold that")
    return f"{stage}: {type(err).__name__}: {_first_lines(err)}{where}"


# ----------------------------------------------------------------------------------------------- entry point


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

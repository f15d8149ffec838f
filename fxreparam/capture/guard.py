"""The captured graph's input check: :class:`InputGuard` (rank, pinned dims, then torch.export's own guards,
kept picklable as :class:`ExportGuard`) and the guarded module of an exported program."""

from __future__ import annotations

import operator
import sys
from typing import Any, NamedTuple

import torch
from torch import fx, nn

from ..errors import ShapeError
from ..meta import copy_value, export_value, mark_guard

GUARD = "_guards_fn"  # torch.export's name for its input-guard submodule; the guard node keeps it


Shape = tuple[int, ...]


Dynamic = dict[int, tuple[int, int | None]]  # dim -> (min, max) sizes export allows; max None: unbounded


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
        val = export_value(nodes[name]) if name in nodes else None
        if not isinstance(val, torch.Tensor):
            spec.append(InputSpec(name, None, {}, {}))
            continue
        dynamic = {d: r for d, s in enumerate(val.shape) if (r := _symbol_range(program, s)) is not None}
        symbols = {d: sym for d in dynamic if (sym := _symbol(val.shape[d])) is not None}
        spec.append(InputSpec(name, tuple(_hint(s) for s in val.shape), dynamic, symbols))
    return spec


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
    mark_guard(call)
    anchor = call
    for i, ph in enumerate(placeholders):
        val = export_value(ph)
        if val is not None and not isinstance(val, torch.Tensor):
            continue  # a non-tensor input (a number): nothing to read through the guard
        if guard.single:
            checked = call
        else:
            with graph.inserting_after(anchor):
                checked = graph.create_node("call_function", operator.getitem, (call, i), {},
                                            name=f"{ph.name}_checked")
            anchor = checked
        copy_value(ph, checked)
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


def _check_covers(gm: fx.GraphModule, args: tuple, kwargs: dict | None = None) -> None:
    """Raise :class:`ShapeError` where a captured graph's guards reject these inputs (runs no model code)."""
    guard = getattr(gm, GUARD, None)
    spec = getattr(gm, "_in_spec", None)
    if isinstance(guard, InputGuard) and spec is not None:
        guard(*_flatten_by_spec(args, kwargs or {}, spec))

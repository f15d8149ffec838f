"""Capture: turn a model into an ``fx.GraphModule`` whose weights are stored constants.

With example inputs the primary path is ``torch.export`` (non-strict), which sees through
Python control flow on shapes, parametrizations and hooks; the batch dimension is kept
dynamic where the model allows it. Without example inputs, or where export fails,
``torch.fx.symbolic_trace`` is tried. If neither works, a :class:`CaptureError` says why.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from .errors import CaptureError

__all__ = ["Captured", "capture"]


@dataclass
class Captured:
    """A captured graph, how it was captured, and how long that took."""

    gm: fx.GraphModule
    method: str
    seconds: float

    @property
    def method_key(self) -> str:
        """The ``capture=`` value that reproduces this capture."""
        return "export" if self.method.startswith("torch.export") else "symbolic_trace"


def _batch_dynamic_shapes(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """``dynamic_shapes`` marking dim 0 of every batched tensor input as automatic, or None if unsupported."""
    auto = getattr(getattr(torch.export, "Dim", None), "AUTO", None)
    if auto is None:
        return None

    def spec(x: Any) -> Any:
        # A batch of 1 would be specialized anyway (export's 0/1 rule): ask only for larger batches.
        return {0: auto} if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] > 1 else None

    return pytree.tree_map(spec, args), pytree.tree_map(spec, kwargs)


def _drop_guards(gm: fx.GraphModule) -> None:
    """Remove export's input-guard call: shape checks that would pin the folded model to one input shape."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
            delattr(gm, "_guards_fn")
    gm.recompile()


def _export(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    dynamic = _batch_dynamic_shapes(args, kwargs)
    if dynamic is not None:
        try:
            dyn_args, dyn_kwargs = dynamic
            ep = torch.export.export(model, args, kwargs, dynamic_shapes={**_named(model, dyn_args), **dyn_kwargs},
                                     strict=False)
            return ep.module()
        except Exception:  # the model pins its batch size: capture it static
            pass
    return torch.export.export(model, args, kwargs, strict=False).module()


def _named(model: nn.Module, dyn_args: tuple) -> dict[str, Any]:
    """``dynamic_shapes`` for positional args keyed by the forward's parameter names."""
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) < len(dyn_args):
        raise TypeError("forward takes *args")
    return {p.name: d for p, d in zip(params, dyn_args)}


METHODS = ("auto", "export", "symbolic_trace")


class _Tracer(fx.Tracer):
    """``symbolic_trace``'s tracer with an O(1) parameter lookup.

    The stock ``Tracer.getattr`` scans every named parameter each time ``forward`` reads one,
    which is quadratic in depth for models that use their parameters directly (DiracNet).
    """

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        self._tensor_names: dict[int, str] = {}
        if isinstance(root, nn.Module):
            for name, t in [*root.named_parameters(), *root.named_buffers()]:
                self._tensor_names.setdefault(id(t), name)
        return super().trace(root, concrete_args)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if isinstance(attr_val, nn.Parameter) or (self.proxy_buffer_attributes and isinstance(attr_val, torch.Tensor)):
            name = self._tensor_names.get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return attr_val

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor) and id(a) in getattr(self, "_tensor_names", {}):
            return self.create_node("get_attr", self._tensor_names[id(a)], (), {})
        return super().create_arg(a)


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` in linear time."""
    tracer = _Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def capture(model: nn.Module, args: tuple | None, kwargs: dict | None = None, method: str = "auto") -> Captured:
    """Capture ``model`` (already in eval mode) as a graph; ``args=None`` means no example inputs.

    ``method``: ``"auto"`` (export where there are example inputs, else or on failure
    symbolic_trace), ``"export"`` or ``"symbolic_trace"`` alone. symbolic_trace is much
    faster on very deep models, export sees through more Python.
    """
    if method not in METHODS:
        raise ValueError(f"unknown capture method {method!r}; choose one of {METHODS}")
    if method == "export" and args is None:
        raise CaptureError("capture='export' needs example inputs")
    kwargs = kwargs or {}
    failures: list[str] = []
    start = time.perf_counter()
    if args is not None and method in ("auto", "export"):
        try:
            gm = _export(model, args, kwargs)
            _drop_guards(gm)
            return Captured(gm, "torch.export (non-strict)", time.perf_counter() - start)
        except Exception as err:
            failures.append(f"torch.export: {type(err).__name__}: {_first_lines(err)}")
    start = time.perf_counter()
    try:
        if method == "export":
            raise CaptureError("symbolic_trace not tried (capture='export')")
        gm = symbolic_trace(model)
        if args is not None and not kwargs:
            ShapeProp(gm).propagate(*args)  # record shapes: some folds need a tensor's rank
        return Captured(gm, "torch.fx.symbolic_trace", time.perf_counter() - start)
    except Exception as err:
        failures.append(f"torch.fx.symbolic_trace: {type(err).__name__}: {_first_lines(err)}")
    hint = ("Remedy: replace Python control flow that depends on tensor values with tensor ops "
            "(torch.where) or torch.cond, or optimize the submodules that capture on their own.")
    if args is None:
        hint = "Remedy: pass example inputs (optimize(model, example_inputs)) so torch.export can capture it."
    raise CaptureError(f"could not capture {type(model).__name__}:\n  " + "\n  ".join(failures) + "\n" + hint)


def _first_lines(err: BaseException, n: int = 3) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return " ".join(lines[:n])[:500]

"""symbolic_trace captures: a tracer in linear time that keeps hooked and forward-overriding layers opaque, records
buffer writes and refuses forwards that assign module tensors; :func:`copy_model`."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

from ..errors import CaptureError
from ..meta import OPAQUE, mark_opaque  # noqa: F401 (OPAQUE: re-exported as capture.OPAQUE)


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
    convs), is traced as a leaf whose node carries :data:`fxreparam.meta.OPAQUE` (the reason).
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
            mark_opaque(out.node, reason)
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
    saved = snapshot_state(model)
    tracer = _Tracer()
    try:
        graph = _trace(tracer, model)
    finally:
        assigned = restore_state(saved)
    if assigned:
        raise CaptureError(f"{type(model).__name__}'s forward assigns {', '.join(assigned)}, which symbolic_trace "
                           "cannot keep as a write. Remedy: pass example inputs so torch.export captures the write "
                           "(run the model once first where it caches a tensor on itself), or write in place "
                           "(self.count.add_(1), self.count.copy_(value)), which the graph keeps.")
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _trace(tracer: _Tracer, model: nn.Module) -> fx.Graph:
    """Trace with buffer reads as nodes (a write into a buffer is then kept); where the forward's Python needs a
    buffer's value (``if self.initialized:``), with buffers as their values, unless that trace changed one: its
    write would be lost from the graph (refused, naming the buffer, its value put back)."""
    try:
        return tracer.trace(model)
    except Exception as proxied:
        before = {name: b.clone() for name, b in model.named_buffers()}
        tracer.proxy_buffer_attributes = False
        try:
            graph = tracer.trace(model)
        except Exception:
            raise proxied from None
        finally:
            changed = _put_back(model, before)
    if changed:
        raise CaptureError(f"{type(model).__name__}'s forward writes buffer(s) {', '.join(changed)} where its Python "
                           "also needs their values, so symbolic_trace cannot keep the write. Remedy: pass example "
                           "inputs so torch.export captures it.")
    return graph


def _put_back(model: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    """Copy each buffer's saved value back where a trace changed it; returns the names of those changed."""
    changed = []
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            old = before.get(name)
            if old is not None and (old.shape != buffer.shape or not torch.equal(old, buffer)):
                buffer.copy_(old)
                changed.append(repr(name))
    return changed


State = list[tuple[nn.Module, dict, dict, dict]]


@contextlib.contextmanager
def recording_assignments(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, record (named) each tensor that one of ``model``'s modules gets as an attribute that is no
    buffer or parameter (``self.anchors = ...`` in forward): export puts some of these back after tracing, and its
    graph then holds the value of that one call."""
    assigned: list[str] = []
    setattr_ = nn.Module.__setattr__
    own = {id(mod) for mod in model.modules()}  # not the modules torch builds while it traces

    def record(mod: nn.Module, name: str, value: Any) -> None:
        if id(mod) in own and isinstance(value, torch.Tensor) and name not in mod._buffers and (
                name not in mod._parameters):
            label = f"attribute {name!r} ({type(mod).__name__})"
            if label not in assigned:
                assigned.append(label)
        setattr_(mod, name, value)

    nn.Module.__setattr__ = record  # type: ignore[method-assign]
    try:
        yield assigned
    finally:
        nn.Module.__setattr__ = setattr_  # type: ignore[method-assign]


def snapshot_state(model: nn.Module) -> State:
    """Every module's attributes, buffers and parameters (the objects, not copies), for :func:`restore_state`."""
    return [(mod, dict(vars(mod)), dict(mod._buffers), dict(mod._parameters)) for mod in model.modules()]


def restore_state(saved: State) -> list[str]:
    """Where a trace set a module attribute, buffer or parameter to a tensor (a traced ``self.count = self.count + 1``
    leaves a proxy there, a forward that caches ``self.anchors`` leaves export's fake tensor), put the whole state
    back, so that a cache and its key (``self.shapes``) stay consistent; returns those tensors, named. Plain Python
    state alone (``self.calls += 1``) is left as the trace left it, as a run would."""
    assigned: list[str] = []
    for mod, attrs, buffers, params in saved:
        for kind, now, before in (("buffer", mod._buffers, buffers), ("parameter", mod._parameters, params),
                                  ("attribute", vars(mod), attrs)):
            assigned += [f"{kind} {k!r} ({type(mod).__name__})" for k, v in now.items()
                         if (k not in before or before[k] is not v) and isinstance(v, (torch.Tensor, fx.Proxy))]
    if assigned:
        for mod, attrs, buffers, params in saved:
            for now, before in ((mod._buffers, buffers), (mod._parameters, params), (vars(mod), attrs)):
                now.clear()
                now.update(before)
    return assigned


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also where a forward run under autograd left a computed tensor on a module (old-style
    ``spectral_norm``'s ``weight``, a cache), which deepcopy refuses: such a tensor is copied detached."""
    computed = {id(t): t.detach().clone() for mod in model.modules()
                for t in [*vars(mod).values(), *mod._buffers.values()] if isinstance(t, torch.Tensor) and not t.is_leaf}
    return copy.deepcopy(model, computed)

"""Finalize: turn the rewritten graph into a module that reads like a hand-written deployment model.

Every conv and linear layer with stored weights becomes a plain ``nn.Conv2d``/``nn.Linear``
(parametrizations evaluated), named after the model's own path (``layer1_0_conv1``); common
aten ops print as their torch functions; nothing the graph does not read is kept. The result
is an ``fx.GraphModule`` whose ``print`` is a readable chain of layers, like the seed's DiracNet.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from . import ops
from .graph import SharedLayers, build_module, call_module, eliminate_dead_code, replace
from .meta import channels_last, fetch_attr, module_path, rank
from .meta import written as written_at
from .mutation import mark_written

__all__ = ["finalize"]

aten = torch.ops.aten


def _readable_targets() -> dict[Any, Any]:
    table: dict[Any, Any] = {}
    for packet, overload, fn in [
        ("relu", "default", torch.relu), ("relu_", "default", torch.relu_), ("sigmoid", "default", torch.sigmoid),
        ("tanh", "default", torch.tanh),
        ("cat", "default", torch.cat), ("clamp", "default", torch.clamp), ("flatten", "using_ints", torch.flatten),
        ("max_pool2d", "default", F.max_pool2d), ("avg_pool2d", "default", F.avg_pool2d),
        ("adaptive_avg_pool2d", "default", F.adaptive_avg_pool2d), ("mean", "dim", torch.mean),
        ("silu", "default", F.silu), ("gelu", "default", F.gelu), ("hardswish", "default", F.hardswish),
        ("hardsigmoid", "default", F.hardsigmoid), ("hardtanh", "default", F.hardtanh), ("pad", "default", F.pad),
        ("mul", "Tensor", operator.mul), ("add", "Tensor", operator.add), ("sub", "Tensor", operator.sub),
    ]:
        target = getattr(getattr(aten, packet, None), overload, None)
        if target is not None:
            table[target] = fn
    return table


_READABLE = _readable_targets()


_WEIGHT_HOOKS = (SpectralNorm, WeightNorm)  # torch's old-style weight reparametrizations (forward pre-hooks)


def _plain(mod: nn.Module) -> nn.Module:
    """The module with its parametrizations and old-style weight hooks (``spectral_norm``, ``weight_norm``)
    evaluated into plain weights, and no tensor attribute left that autograd computed (``copy.deepcopy`` and
    ``torch.save`` refuse non-leaf tensors). Exact in eval mode: spectral norm then runs no power iteration."""
    if parametrize.is_parametrized(mod):
        for name in list(mod.parametrizations):
            parametrize.remove_parametrizations(mod, name, leave_parametrized=True)
    for key, hook in list(mod._forward_pre_hooks.items()):
        if isinstance(hook, _WEIGHT_HOOKS):
            hook.remove(mod)
            del mod._forward_pre_hooks[key]
    for name, value in list(vars(mod).items()):
        if isinstance(value, torch.Tensor) and not value.is_leaf:
            setattr(mod, name, value.detach())
    return mod


def _bn_module(bn: ops.BatchNorm, ndim: int | None) -> nn.Module | None:
    classes = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    if ndim not in classes or bn.channels is None or (bn.weight is None) != (bn.bias is None):
        return None
    if bn.affine is None and bn.running_mean is not None:
        return None  # a batch norm forced into training mode: keep the functional call
    like = bn.running_mean if bn.running_mean is not None else bn.weight
    mod = classes[ndim](bn.channels, eps=bn.eps, affine=bn.weight is not None,
                        track_running_stats=bn.running_mean is not None, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            value = getattr(bn, name)
            if value is not None:
                getattr(mod, name).copy_(value)
    return mod.eval()


def _layer_module(gm: fx.GraphModule, node: fx.Node, shared: SharedLayers) -> nn.Module | None:
    """A plain module for a functional conv, linear or batch norm with stored tensors, else ``None``; calls of one
    layer (the same tensors and spec, ``shared``) get one module, so its weights stay stored once."""
    if node.op != "call_function":
        return None
    layer = ops.weighted(gm, node)
    if layer is not None:
        return build_module(layer.spec, layer.weight, layer.bias, layer.storage, shared=shared)
    bn = ops.batch_norm(gm, node)
    return _bn_module(bn, rank(node)) if bn is not None else None


class _Tree:
    """The folded model's layers and tensors, flat and named by the model's paths (``layer1_0_conv1``), so
    that ``print`` lists a plain chain like a hand-written deployment model."""

    def __init__(self) -> None:
        self.root = nn.Module()
        self.placed: dict[int, str] = {}  # id of a placed object -> its name, so a shared layer stays one

    def place(self, path: str, value: nn.Module | torch.Tensor) -> str:
        if id(value) in self.placed:
            return self.placed[id(value)]
        base = "".join(c if c.isalnum() or c == "_" else "_" for c in path) or "_"
        if base[0].isdigit():
            base = f"_{base}"
        name, n = base, 0
        while hasattr(self.root, name):
            n += 1
            name = f"{base}_{n}"
        if isinstance(value, nn.Module):
            self.root.add_module(name, value)
        elif isinstance(value, nn.Parameter):
            self.root.register_parameter(name, value)
        else:
            self.root.register_buffer(name, value)
        self.placed[id(value)] = name
        return name


def _forget_tracer(graph: fx.Graph) -> None:
    """Drop the tracer class a graph remembers (export's ``_ModuleStackTracer``): ``torch.load`` re-traces a pickled
    module with it and that tracer cannot be built from nothing; fx's plain tracer reads the saved code back."""
    graph._tracer_cls = None
    graph._tracer_extras = {}


def _layout_like(mod: nn.Module, node: fx.Node) -> None:
    """Store a layer's weight in the layout its captured output had: channels-last where capture recorded that, else
    plain row-major strides. A folded kernel (a product, a transpose) can come out with other strides, and the
    layer's output follows its weight's: a later ``view`` of it then fails."""
    weight = getattr(mod, "weight", None)
    if not isinstance(weight, nn.Parameter) or not isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
        return
    layout = torch.contiguous_format
    if channels_last(node) and weight.dim() in (4, 5):
        layout = torch.channels_last if weight.dim() == 4 else torch.channels_last_3d
    wanted = weight.detach().clone(memory_format=layout)
    if wanted.stride() != weight.stride():
        mod.weight = nn.Parameter(wanted, requires_grad=weight.requires_grad)


def _view_to_reshape(graph: fx.Graph, written: set[fx.Node]) -> None:
    """Every ``view`` whose value nothing writes in place (directly or through an alias) becomes a ``reshape``: the
    same values, and it also takes a tensor a fold gave other strides. A written view stays a view: the write must
    reach the tensor it views."""
    for node in graph.nodes:
        if node in written or not node.args or any(isinstance(a, torch.dtype) for a in node.args[1:]):
            continue
        if node.op == "call_method" and node.target == "view":
            node.target = "reshape"
        elif node.op == "call_function" and node.target in _VIEWS:
            node.target = _VIEWS[node.target]


_VIEWS = {aten.view.default: aten.reshape.default, torch.Tensor.view: torch.reshape}


def finalize(gm: fx.GraphModule, class_name: str = "GraphModule") -> fx.GraphModule:
    """A new ``GraphModule`` over ``gm``'s graph with plain layers at the model's paths and nothing unused."""
    graph = gm.graph
    mark_written(gm)  # flags each value written in place through any alias; before the layers are renamed
    written = {node for node in graph.nodes if written_at(node)}
    tree = _Tree()
    shared: SharedLayers = {}
    for node in list(graph.nodes):
        if node.op == "call_module":
            node.target = tree.place(module_path(node), _plain(fetch_attr(gm, node.target)))
            _layout_like(fetch_attr(tree.root, node.target), node)
            continue
        mod = _layer_module(gm, node, shared)
        if mod is not None:
            spec = ops.weighted(gm, node) or ops.batch_norm(gm, node)
            path = module_path(node)
            _layout_like(mod, node)
            with graph.inserting_after(node):
                new = call_module(graph, tree.place(path, mod), spec.input, path)
            new.meta.update(node.meta)
            replace(node, new)
        elif node.op == "call_function" and node.target in _READABLE and "alpha" not in node.kwargs:
            node.target = _READABLE[node.target]
    for node in graph.nodes:
        if node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if isinstance(value, (nn.Module, torch.Tensor)):
                node.target = tree.place(str(node.target), value)
            else:
                name = str(node.target).replace(".", "_")
                setattr(tree.root, name, value)
                node.target = name
    _view_to_reshape(graph, written)
    _forget_tracer(graph)
    out = fx.GraphModule(tree.root, graph, class_name=class_name)
    eliminate_dead_code(out.graph)
    out.recompile()
    return out.eval()  # an inference model, like the function it computes

"""Graph surgery shared by every pass: build a plain layer for a folded kernel, splice it in, drop the dead.

Passes never mutate a tensor or module that is already in the graph (a module called twice,
or a weight shared by two branches, must keep serving its other users); they emit a fresh
module and rewire the consumers to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import algebra
from .meta import (
    PROVISIONAL,
    Storage,
    copy_but_written,
    module_path,
    provisional_record,
    set_path,
    set_provisional_record,
)
from .mutation import eliminate_dead_code, erase_dead
from .spec import ConvSpec, Layer, Spec

__all__ = ["PROVISIONAL", "LayerParts", "Provisional", "SharedLayers", "build_module", "call_module",
           "eliminate_dead_code", "emit", "emit_refolded", "erase_dead", "inline_layers", "insert_layer", "live_nodes",
           "mark_provisional", "position", "provisional", "replace"]

_CONV_CLASSES = {
    (1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
    (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d,
}
FOLDED_PREFIX = "_fxreparam_"


SharedLayers = dict[tuple, tuple[nn.Module, tuple[torch.Tensor, ...]]]
"""Layers built so far from given tensors (by identity), so a layer read at several places is built once."""


def build_module(spec: Spec, weight: torch.Tensor, bias: torch.Tensor | None, storage: Storage, *,
                 shared: SharedLayers | None = None) -> nn.Module:
    """A plain ``nn.ConvNd``/``nn.ConvTransposeNd``/``nn.Linear`` holding ``weight`` and ``bias`` (no init work);
    an all-zero bias is not stored (adding zero is the identity, storing it a cost). With ``shared``, the same
    tensors with the same spec give the same module: a weight read at k places stays one stored tensor."""
    key = (spec, id(weight), id(bias), storage)
    if shared is not None and key in shared:
        return shared[key][0]
    mod = _new_module(spec, weight, bias, storage)
    if shared is not None:
        shared[key] = (mod, (weight, *([bias] if bias is not None else [])))  # keeps the ids alive
    return mod


def _new_module(spec: Spec, weight: torch.Tensor, bias: torch.Tensor | None, storage: Storage) -> nn.Module:
    """The module :func:`build_module` returns, built afresh."""
    dtype, device = storage
    bias = None if bias is not None and not bool(bias.any()) else bias
    kw: dict[str, Any] = {"bias": bias is not None, "device": device, "dtype": dtype}
    if not isinstance(spec, ConvSpec):
        mod = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], **kw)
    else:
        cls = _CONV_CLASSES[(weight.dim() - 2, spec.transposed)]
        extra = {"output_padding": spec.output_padding} if spec.transposed else {"padding_mode": spec.padding_mode}
        out_ch = weight.shape[1] * spec.groups if spec.transposed else weight.shape[0]
        in_ch = weight.shape[0] if spec.transposed else weight.shape[1] * spec.groups
        mod = nn.utils.skip_init(cls, in_ch, out_ch, tuple(weight.shape[2:]), stride=spec.stride,
                                 padding=spec.padding, dilation=spec.dilation, groups=spec.groups, **extra, **kw)
    trainable = dtype.is_floating_point
    mod.weight = nn.Parameter(algebra.cast_to(weight, dtype, device), requires_grad=trainable)
    if bias is not None:
        mod.bias = nn.Parameter(algebra.cast_to(bias, dtype, device), requires_grad=trainable)
    return mod


def _fresh_name(gm: fx.GraphModule) -> str:
    counter = getattr(gm, "_fxreparam_counter", 0)
    while hasattr(gm, f"{FOLDED_PREFIX}{counter}"):
        counter += 1
    gm._fxreparam_counter = counter + 1
    return f"{FOLDED_PREFIX}{counter}"


def _sample_sum(t: torch.Tensor) -> float:
    """A cheap key of a kernel's values (about 64 of them summed): equal kernels get equal keys, and a match is
    confirmed with ``torch.equal``; summing every element cost a second on repvgg_b1."""
    return float(t.flatten()[:: max(1, t.numel() // 64)].sum(dtype=torch.float64))


def _shared_target(gm: fx.GraphModule, mod: nn.Module) -> str:
    """The submodule name holding ``mod``'s kernel: an equal one emitted before (a module called twice folds
    the same way at each call) is reused, so folding never stores a kernel twice."""
    bias = getattr(mod, "bias", None)
    key = (repr(mod), str(mod.weight.dtype), str(mod.weight.device), _sample_sum(mod.weight),
           None if bias is None else _sample_sum(bias))
    emitted: dict[tuple, list[str]] = gm.__dict__.setdefault("_fxreparam_emitted", {})
    for target in emitted.get(key, []):
        other = getattr(gm, target, None)
        if other is not None and torch.equal(other.weight, mod.weight) and (
            bias is None or torch.equal(other.bias, bias)
        ):
            return target
    target = _fresh_name(gm)
    gm.add_submodule(target, mod)
    emitted.setdefault(key, []).append(target)
    return target


def insert_layer(gm: fx.GraphModule, spec: Spec, weight: torch.Tensor, bias: torch.Tensor | None, *,
                 input: fx.Node, before: fx.Node, storage: Storage, name: str, like: fx.Node) -> fx.Node:
    """A new layer ``spec`` with the given kernel, reading ``input``, placed just before ``before``.

    It carries the metadata (shape, dtype) of ``like``, the node whose value it computes, and the model path
    ``name`` for the final module tree. A conv kernel is stored at its coarsest exact grouping (REPARAM §9), so
    no fold leaves a block-diagonal kernel dense.
    """
    if isinstance(spec, ConvSpec) and not spec.transposed:
        weight, groups = algebra.coarsest_groups(weight, spec.groups)
        spec = dataclasses.replace(spec, groups=groups)
    target = _shared_target(gm, build_module(spec, weight, bias, storage))
    with gm.graph.inserting_before(before):
        new = call_module(gm.graph, target, input, name)
    copy_but_written(like, new)
    set_path(new, name)
    return new


def emit(gm: fx.GraphModule, spec: Spec, weight: torch.Tensor, bias: torch.Tensor | None, *, input: fx.Node,
         replaces: fx.Node, storage: Storage, name: str | None = None, at: fx.Node | None = None) -> fx.Node:
    """Replace the node ``replaces`` by a new plain layer computing ``spec`` with the given kernel.

    Args:
        gm: the graph module being rewritten.
        spec: the layer's hyperparameters (:class:`~fxreparam.spec.ConvSpec` or ``LinearSpec``).
        weight, bias: the folded kernel, usually float64 from :mod:`fxreparam.algebra`.
        input: the node the new layer reads.
        replaces: the node whose consumers the new layer takes over; it and whatever becomes dead is erased.
        storage: the ``(dtype, device)`` the kernel is stored in (the model's own; cast once here).
        name: the model path the layer stands for (default: ``replaces``'s).
        at: where the new layer goes (default ``replaces``): where the folded pattern first read ``input``.

    Returns:
        The new ``call_module`` node. An equal kernel emitted before is reused, never stored twice.
    """
    new = insert_layer(gm, spec, weight, bias, input=input, before=at or replaces, storage=storage,
                       name=name or module_path(replaces), like=replaces)
    replace(replaces, new)
    return new


def emit_refolded(gm: fx.GraphModule, layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None, *,
                  replaces: fx.Node) -> fx.Node:
    """``layer`` with a new kernel in place of ``replaces``, an op after it that the kernel now holds (a BN, an
    affine); what still reads the old layer (shape queries alone) reads the new one, and the old layer goes."""
    new = emit(gm, layer.spec, weight, bias, input=layer.input, replaces=replaces, storage=layer.storage,
               name=layer.name, at=layer.node)
    if layer.node.users:  # shape queries alone: the new layer's output has the same shape
        layer.node.replace_all_uses_with(new)
        erase_dead(layer.node)
    return new


def call_module(graph: fx.Graph, target: str, input: fx.Node, path: str) -> fx.Node:
    """A ``call_module`` node on ``input`` named after the model path it stands for (``layer1_0_conv1``)."""
    return graph.create_node("call_module", target, (input,), name=path.replace(".", "_") or None)


def position(node: fx.Node) -> Any:
    """A key ordering nodes as the graph runs them (fx keeps one per node since torch 2.5; else counted)."""
    key = getattr(node, "_sort_key", None)
    return key if key is not None else next(i for i, n in enumerate(node.graph.nodes) if n is node)


def live_nodes(graph: fx.Graph) -> Iterator[fx.Node]:
    """The graph's nodes in order, skipping any that a rewrite erased while the sweep was under way."""
    for node in list(graph.nodes):
        if not getattr(node, "_erased", False):
            yield node


def replace(old: fx.Node, new: fx.Node) -> None:
    """Point every consumer of ``old`` at ``new`` and erase what is left without consumers."""
    old.replace_all_uses_with(new)
    erase_dead(old)


_FUNCTIONAL_CONV = {(1, False): F.conv1d, (2, False): F.conv2d, (3, False): F.conv3d,
                    (1, True): F.conv_transpose1d, (2, True): F.conv_transpose2d, (3, True): F.conv_transpose3d}


def inline_layers(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every plain conv and linear ``call_module`` replaced by its functional call on ``get_attr``
    weights: the form Dynamo hands a compiler (Inductor's own pre-grad conv-BN passes rewrite module parameters
    while it traces, which fails on a graph of modules). Layers with a non-zero padding mode stay modules."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        mod = gm.get_submodule(node.target)
        if type(mod) not in (nn.Linear, *_CONV_CLASSES.values()) or getattr(mod, "padding_mode", "zeros") != "zeros":
            continue
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{node.target}.weight")
            bias = gm.graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
            if isinstance(mod, nn.Linear):
                call = gm.graph.call_function(F.linear, (node.args[0], weight, bias))
            elif mod.transposed:
                call = gm.graph.call_function(_FUNCTIONAL_CONV[(mod.weight.dim() - 2, True)], (
                    node.args[0], weight, bias, mod.stride, mod.padding, mod.output_padding, mod.groups, mod.dilation))
            else:
                call = gm.graph.call_function(_FUNCTIONAL_CONV[(mod.weight.dim() - 2, False)], (
                    node.args[0], weight, bias, mod.stride, mod.padding, mod.dilation, mod.groups))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


@dataclasses.dataclass(frozen=True)
class LayerParts:
    """What :func:`insert_layer` needs to emit a layer again: its spec, kernel, storage, path and the metadata of
    the value it computes."""

    spec: Spec
    weight: torch.Tensor
    bias: torch.Tensor | None
    storage: Storage
    name: str
    meta: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Provisional:
    """A layer composed from two (``first`` then ``second``, reading ``input``) only in the expectation that a
    later fold absorbs it: if it is still standing at the fixpoint, it costs more than the two and is restored."""

    target: str
    input: fx.Node
    first: LayerParts
    second: LayerParts


def mark_provisional(node: fx.Node, record: Provisional) -> None:
    """Record on ``node`` that it is a provisional composition (read back by :func:`provisional`)."""
    set_provisional_record(node, record)


def provisional(node: fx.Node) -> Provisional | None:
    """The provisional composition ``node`` still is, or None: a node that a later fold rewrote (it calls another
    kernel or reads another input, though it may have copied the metadata) is no longer the one recorded."""
    record = provisional_record(node)
    if record is None or node.op != "call_module" or node.target != record.target or node.args != (record.input,):
        return None
    return record

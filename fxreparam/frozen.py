"""Dynamo graphs with their weights frozen into constants, and Inductor's freezing treatment of them.

Dynamo passes a module's parameters and buffers to the backend as graph inputs. Inductor's ``freezing``
(constant folding, weight layout and pre-packing) treats only the weights it finds on the graph, and Dynamo
puts them there only when ``freezing`` is already on while it traces: ``torch.compile(m, backend="inductor",
options={"freezing": True})`` alone compiles every weight as an input (measured on timm's mobileone_s0:
22.8 ms a call against 22.0 ms frozen). Freezing the graph in the backend makes the treatment independent
of how, and under which config, the user called ``torch.compile``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

from .graph import inline_layers
from .meta import clean_path, dynamo_graph_arg, written
from .mutation import mark_written

__all__ = ["compile_frozen", "freeze", "frozen_inductor", "lift_scalars", "on_runtime_inputs", "runtime_positions"]


def _stored_tensor(node: fx.Node, value: Any) -> str | None:
    """The model path of a placeholder that Dynamo lifted from a parameter or buffer, else ``None``."""
    if not isinstance(value, torch.Tensor):
        return None
    arg = dynamo_graph_arg(node)
    name = arg.source.name() if arg is not None and callable(getattr(arg.source, "name", None)) else (
        getattr(getattr(arg, "source", None), "name", None))
    if isinstance(name, str) and ("._parameters[" in name or "._buffers[" in name):
        return clean_path(name)
    if isinstance(value, nn.Parameter):
        return node.name
    return None


def runtime_positions(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[int]:
    """The positions of the region's inputs that are not parameters or buffers, or are buffers the graph writes
    (the write must reach the model's own tensor): what it takes at run time."""
    mark_written(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, (n, x) in enumerate(zip(placeholders, example_inputs))
            if _stored_tensor(n, x) is None or written(n)]


def freeze(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, list[int]]:
    """Turn the placeholders that hold parameters and buffers into stored constants, in place; a buffer the graph
    writes stays an input, so the write still reaches the model's state.

    Returns the frozen graph module and the positions of the inputs it still takes.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    keep = runtime_positions(gm, example_inputs)
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        path = _stored_tensor(node, value)
        if path is None or i in keep:
            continue
        name = "".join(c if c.isalnum() else "_" for c in path)
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, value.detach())
        with gm.graph.inserting_before(node):
            const = gm.graph.get_attr(name)
        const.meta.update(node.meta)
        node.replace_all_uses_with(const)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm, keep


def lift_scalars(gm: fx.GraphModule, example_inputs: Sequence[Any], keep: list[int]) -> dict[int, float | int | bool]:
    """Read as constants, in place, the scalars Dynamo lifts to graph inputs (a module's float attributes such as a
    BatchNorm's ``eps`` and ``momentum``, under ``dynamic=True``): 0-dim tensor inputs that the graph only reads
    through ``.item()``. Dynamo does not guard their values, so the caller must check them at run time.

    ``keep``: the positions in ``example_inputs`` of ``gm``'s placeholders. Returns position -> value read.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    lifted: dict[int, float | int | bool] = {}
    for node, i in zip(placeholders, keep):
        value = example_inputs[i]
        if not (isinstance(value, torch.Tensor) and value.dim() == 0 and node.users
                and all(u.op == "call_method" and u.target == "item" and len(u.args) == 1 for u in node.users)):
            continue
        lifted[i] = value.item()
        for item in list(node.users):
            item.replace_all_uses_with(lifted[i])
            gm.graph.erase_node(item)
    if lifted:
        gm.recompile()
    return lifted


def on_runtime_inputs(compiled: Callable[..., Any], keep: list[int]) -> Callable[..., Any]:
    """``compiled`` called with Dynamo's whole input list: only the inputs at ``keep`` (not frozen) reach it."""

    def run(*args: Any) -> Any:
        return compiled(*[args[i] for i in keep])

    return run


def compile_frozen(gm: fx.GraphModule, example_inputs: list[Any], config: dict[str, Any] | None = None
                   ) -> Callable[..., Any]:
    """Inductor on a graph whose weights are constants, with its freezing passes on (they apply only without
    autograd) and ``config`` patched in; layers become functional calls, the form Dynamo hands a compiler."""
    import torch._inductor.config
    from torch._inductor.compile_fx import compile_fx

    with torch._inductor.config.patch({**(config or {}), "freezing": True}):
        return compile_fx(inline_layers(gm), example_inputs)


def frozen_inductor(config: dict[str, Any] | None = None) -> Callable[..., Callable[..., Any]]:
    """A torch.compile backend: Inductor with ``config``, its freezing treatment applied to every weight of a
    graph traced without autograd (the inference compile); with autograd on, Inductor as it is, so gradients
    still reach the weights (Dynamo guards on grad mode: each mode gets its own compile)."""

    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx

        if torch.is_grad_enabled():
            return compile_fx(gm, list(example_inputs), config_patches=config or {})
        keep = runtime_positions(gm, example_inputs)
        if len(keep) == len(example_inputs):  # the weights are on the graph already (freezing on while tracing)
            return compile_fx(gm, list(example_inputs), config_patches={**(config or {}), "freezing": True})
        frozen, keep = freeze(copy.deepcopy(gm), example_inputs)
        frozen = fx.GraphModule(frozen, frozen.graph)  # without gm.meta: Dynamo's names of the lifted inputs
        return on_runtime_inputs(compile_frozen(frozen, [example_inputs[i] for i in keep], config), keep)

    return backend

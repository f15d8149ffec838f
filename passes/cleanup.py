"""``cleanup``: drop dead nodes, then every submodule, parameter and buffer the graph no longer reads."""

from __future__ import annotations

from torch import fx, nn

from fxreparam.graph import eliminate_dead_code
from fxreparam.registry import PassContext, register_pass


def _referenced(graph: fx.Graph) -> tuple[set[str], set[str]]:
    """Every attribute path the graph reads, with all its prefixes, and the paths of the modules it calls."""
    used: set[str] = set()
    called: set[str] = set()
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            parts = str(node.target).split(".")
            used.update(".".join(parts[: i + 1]) for i in range(len(parts)))
            if node.op == "call_module":
                called.add(str(node.target))
    return used, called


def prune_unused(gm: fx.GraphModule) -> int:
    """Delete the tensors and modules of ``gm`` that no node reads; returns how many went."""
    used, called = _referenced(gm.graph)
    removed = 0

    def prune(module: nn.Module, prefix: str) -> None:
        nonlocal removed
        for name in list(module._parameters) + list(module._buffers):
            if f"{prefix}{name}" not in used:
                delattr(module, name)
                removed += 1
        for name, child in list(module._modules.items()):
            path = f"{prefix}{name}"
            if path not in used:
                delattr(module, name)
                removed += 1
            elif path not in called:  # a container of read attributes: look inside
                prune(child, path + ".")

    prune(gm, "")
    return removed


@register_pass("cleanup", "remove dead nodes and the parameters, buffers and modules nothing reads")
def cleanup(ctx: PassContext) -> int:
    return eliminate_dead_code(ctx.graph) + prune_unused(ctx.gm)

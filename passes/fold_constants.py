"""``fold_constants``: subgraphs computed from parameters, buffers and constants only, evaluated once (REPARAM §5).

DiracNet's ``alpha * dirac(W) + beta * normalize(W)``, weight norm, spectral norm in eval,
``torch.nn.utils.parametrize`` and OREPA-style kernels all compute a weight in ``forward``
from stored tensors alone: at inference that weight is a constant. Each such value that a
data-dependent op reads is computed here once and stored as a plain buffer, so the
recognizers then see an ordinary conv with a stored weight. (Formerly named ``dirac``.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from fxreparam import cost, evaluate, ops
from fxreparam.graph import position
from fxreparam.registry import PassContext, register_pass


def _constant_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value is known before the forward runs: stored tensors and deterministic ops of them."""
    const: set[fx.Node] = set()
    for node in graph.nodes:
        if node.meta.get("fxreparam_written"):
            continue  # written in place somewhere (symbolic_trace graphs): its value depends on when it is read
        if node.op == "get_attr" or (evaluate.deterministic(node) and all(n in const for n in node.all_input_nodes)):
            const.add(node)
    return const


def _numel(value: Any) -> int:
    """Stored floating-point elements (index tensors are not weights)."""
    return value.numel() if isinstance(value, torch.Tensor) and value.is_floating_point() else 0


@register_pass("fold_constants", "evaluate parameter-only subgraphs (Dirac, weight norm, parametrize) once into "
                                 "plain weights", aliases=("dirac",))
def fold_constants(ctx: PassContext) -> int:
    gm = ctx.gm
    const = _constant_nodes(gm.graph)
    # The values a data-dependent op reads: computed constants with a consumer outside the constant set.
    boundary = [n for n in const if n.op != "get_attr" and any(u not in const for u in n.users)]
    env: dict[fx.Node, Any] = {}
    leaves: dict[fx.Node, int] = {}  # stored floating elements each constant comes from (an upper bound)

    def ancestors(root: fx.Node) -> list[fx.Node]:
        seen, stack = set(), [root]
        while stack:
            n = stack.pop()
            if n not in seen and n not in env:
                seen.add(n)
                stack.extend(n.all_input_nodes)
        return sorted(seen, key=position)

    rewrites = 0
    for node in boundary:
        try:
            for n in ancestors(node):
                evaluate.run(gm, [n], env)
                leaves[n] = _numel(env[n]) if n.op == "get_attr" else sum(leaves[i] for i in n.all_input_nodes)
        except Exception as err:  # an op that cannot run outside the forward: leave it to run there
            ctx.refuse(node, f"constant {node.name} could not be precomputed: {type(err).__name__}: {err}")
            continue
        value = env[node]
        if not isinstance(value, torch.Tensor) or value.is_sparse:
            continue
        kernel = all(u in const or ops.reads_as_kernel(u, node) for u in node.users)
        why = cost.why_not_stored(value.numel(), leaves[node], kernel=kernel)
        if why is not None:
            ctx.refuse(node, f"constant {node.name} is computed in forward: {why}")
            continue
        name = f"_fxreparam_const_{len(gm._buffers)}"
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, value.detach().clone(memory_format=torch.contiguous_format))
        with gm.graph.inserting_before(node):
            folded = gm.graph.get_attr(name)
        folded.meta.update(node.meta)
        node.replace_all_uses_with(folded)
        rewrites += 1
    return rewrites

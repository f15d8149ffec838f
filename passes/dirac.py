"""``dirac``: subgraphs computed from parameters, buffers and constants only, evaluated once (REPARAM §5).

DiracNet's ``alpha * dirac(W) + beta * normalize(W)``, weight norm, spectral norm in eval,
``torch.nn.utils.parametrize`` and OREPA-style kernels all compute a weight in ``forward``
from stored tensors alone: at inference that weight is a constant. Each such value that a
data-dependent op reads is computed here once and stored as a plain buffer, so the
recognizers then see an ordinary conv with a stored weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from fxreparam.ops import fetch_attr
from fxreparam.registry import PassContext, register_pass

# Largest value (in elements) worth materializing when it is bigger than all the stored
# tensors it comes from: an ``expand`` of a bias to activation size is cheaper left alone.
MAX_GROWTH_NUMEL = 1 << 22


def _deterministic(node: fx.Node) -> bool:
    """Whether running the node twice gives the same value and has no effect besides its result."""
    if node.is_impure():
        return False
    target = node.target
    tags = getattr(target, "tags", ())
    if torch.Tag.nondeterministic_seeded in tags:
        return False
    schema = getattr(target, "_schema", None)
    if schema is not None and schema.is_mutable:
        return False
    name = str(getattr(target, "__name__", target)).split(".")[0]
    if name.endswith("_") and not name.endswith("__"):
        return False  # in-place: running it here would change a stored tensor
    return not any(word in name for word in ("rand", "dropout", "bernoulli", "multinomial", "normal_", "uniform_",
                                            "empty", "_assert", "print"))


def _evaluate(gm: fx.GraphModule, node: fx.Node, values: dict[fx.Node, Any]) -> Any:
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
    if node.op == "get_attr":
        return fetch_attr(gm, node.target)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    raise AssertionError(node.op)


def _numel(value: Any) -> int:
    return value.numel() if isinstance(value, torch.Tensor) else 0


@register_pass("dirac", "evaluate parameter-only subgraphs (Dirac, weight norm, parametrize) once into plain weights",
               order=10)
def dirac(ctx: PassContext) -> int:
    gm = ctx.gm
    const: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (
            node.op in ("call_function", "call_method") and _deterministic(node)
            and all(n in const for n in node.all_input_nodes)
        ):
            const.add(node)
    # The values a data-dependent op reads: computed constants with a consumer outside the constant set.
    boundary = [n for n in const if n.op != "get_attr" and any(u not in const for u in n.users)]
    values: dict[fx.Node, Any] = {}
    leaves: dict[fx.Node, int] = {}  # stored elements each constant comes from (an upper bound)

    def value_of(root: fx.Node) -> Any:
        stack = [root]
        while stack:
            n = stack[-1]
            pending = [i for i in n.all_input_nodes if i not in values]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            if n not in values:
                values[n] = _evaluate(gm, n, values)
                leaves[n] = _numel(values[n]) if n.op == "get_attr" else sum(leaves[i] for i in n.all_input_nodes)
        return values[root]

    rewrites = 0
    for node in boundary:
        try:
            value = value_of(node)
        except Exception as err:  # an op that cannot run outside the forward: leave it to run there
            ctx.refuse(node, f"constant {node.name} could not be precomputed: {type(err).__name__}: {err}")
            continue
        if not isinstance(value, torch.Tensor) or value.is_sparse:
            continue
        if value.numel() > max(leaves[node], MAX_GROWTH_NUMEL):
            ctx.refuse(node, f"constant {node.name} would grow to {value.numel()} elements; computed in forward")
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

"""``fold_constants``: subgraphs computed from parameters, buffers and constants only, evaluated once (REPARAM §5).

DiracNet's ``alpha * dirac(W) + beta * normalize(W)``, weight norm, spectral norm in eval,
``torch.nn.utils.parametrize`` and OREPA-style kernels all compute a weight in ``forward``
from stored tensors alone: at inference that weight is a constant. Each such value that a
data-dependent op reads is computed here once and stored as a plain buffer, so the
recognizers then see an ordinary conv with a stored weight. (Formerly named ``dirac``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fxreparam import branches, cost, evaluate, ops
from fxreparam.graph import position
from fxreparam.meta import device_recorded, storage, written
from fxreparam.registry import PassContext, register_pass

_aten = torch.ops.aten
_TEMPLATE_FACTORIES = {_aten.new_full.default, _aten.new_zeros.default, _aten.new_ones.default}
_TEMPLATE_METHODS = {"new_full", "new_zeros", "new_ones"}


def metadata_reads(node: fx.Node) -> list[fx.Node]:
    """The inputs ``node`` reads for their dtype and device only, not their values: the template of ``new_full``
    / ``new_zeros`` / ``new_ones`` with a size of plain ints, and ``type_as``'s second argument. (A recognizer:
    it belongs in :mod:`fxreparam.ops` once that file takes it.) Only inputs whose dtype and device capture
    recorded are named (a fake tensor: ShapeProp's metadata holds no device)."""
    args = node.args
    if (node.target in _TEMPLATE_FACTORIES or (node.op == "call_method" and node.target in _TEMPLATE_METHODS)) \
            and len(args) >= 2 and isinstance(args[0], fx.Node) and isinstance(args[1], (list, tuple)) \
            and all(isinstance(d, int) for d in args[1]):
        return [args[0]] if device_recorded(args[0]) else []
    is_type_as = node.target is _aten.type_as.default or (node.op == "call_method" and node.target == "type_as")
    read = args[1] if is_type_as and len(args) == 2 else None
    return [read] if isinstance(read, fx.Node) and device_recorded(read) else []


def _constant_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value is known before the forward runs: stored tensors and deterministic ops of them (and of
    the dtype and device of any other value, which capture fixed)."""
    const: set[fx.Node] = set()
    for node in graph.nodes:
        if written(node):
            continue  # written in place somewhere (symbolic_trace graphs): its value depends on when it is read
        if node.op == "get_attr" or (evaluate.deterministic(node) and all(
                n in const for n in node.all_input_nodes if n not in metadata_reads(node))):
            const.add(node)
    return const


def _stand_ins(const: set[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """An empty tensor of the recorded dtype and device for each non-constant value a constant reads for its
    metadata only: what evaluating the constant needs of it."""
    found: dict[fx.Node, torch.Tensor] = {}
    for node in const:
        for read in metadata_reads(node):
            if read not in const:
                dtype, device = storage(read)
                found[read] = torch.empty(0, dtype=dtype, device=device)
    return found


def _numel(value: Any) -> int:
    """Stored floating-point elements (index tensors are not weights)."""
    return value.numel() if isinstance(value, torch.Tensor) and value.is_floating_point() else 0


@dataclass
class PrecomputeBudget:
    """The elements precomputed constants may add to this model (:func:`fxreparam.cost.precompute_budget` of the
    model as first seen) and those spent so far, kept on the graph module across rounds."""

    total: int
    spent: int = 0

    @property
    def left(self) -> int:
        return max(0, self.total - self.spent)


def precompute_budget(gm: fx.GraphModule) -> PrecomputeBudget:
    """The budget of ``gm``, set from its stored elements the first time it is asked (before any fold)."""
    if _BUDGET not in gm.__dict__:
        gm.__dict__[_BUDGET] = PrecomputeBudget(cost.precompute_budget(cost.stored_elements(gm)))
    return gm.__dict__[_BUDGET]


_BUDGET = "_fxreparam_precompute_budget"


def precomputed_elements(gm: fx.GraphModule) -> int:
    """Stored elements precomputed constants added to ``gm`` so far (0 where ``fold_constants`` did not run): what
    the report shows and what :func:`fxreparam.cost.result_costlier` allows as ``precomputed``."""
    budget = gm.__dict__.get(_BUDGET)
    return budget.spent if budget is not None else 0


def _merged_into_summed_convs(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor) -> bool:
    """Whether every reader of the kernel ``value`` (computed at ``node``) is a conv summed with a stored conv of the
    same input at least as large (ECBSR's masked branches beside their 3x3): ``branch_sum`` merges it there, so
    storing it grows nothing in the result (docs/identities.md s3)."""
    if value.dim() < 3 or not node.users:
        return False
    for user in node.users:
        read = ops.computed_kernel_conv(user, node, value.dim() - 2)
        if read is None:
            return False
        source, stride, groups = read
        if not branches.summed_with(user, branches.conv_absorbs(gm, source, tuple(value.shape[2:]), stride, groups)):
            return False
    return True


@register_pass("fold_constants", "evaluate parameter-only subgraphs (Dirac, weight norm, parametrize) once into "
                                 "plain weights", aliases=("dirac",))
def fold_constants(ctx: PassContext) -> int:
    gm = ctx.gm
    const = _constant_nodes(gm.graph)
    # The values a data-dependent op reads: computed constants with a consumer outside the constant set.
    boundary = [n for n in const if n.op != "get_attr" and any(u not in const for u in n.users)]
    env: dict[fx.Node, Any] = dict(_stand_ins(const))
    # The stored tensors each constant is computed from (distinct: a chain of select / select_scatter reads one
    # tensor along many paths, and counting paths would make a kernel built from a few scalars look free).
    sources: dict[fx.Node, frozenset[fx.Node]] = dict.fromkeys(env, frozenset())

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
                sources[n] = frozenset((n,)) if n.op == "get_attr" else frozenset().union(
                    *(sources[i] for i in n.all_input_nodes))
        except Exception as err:  # an op that cannot run outside the forward: leave it to run there
            ctx.refuse(node, f"constant {node.name} could not be precomputed: {type(err).__name__}: {err}")
            continue
        value = env[node]
        if not isinstance(value, torch.Tensor) or value.is_sparse:
            continue
        kernel = all(u in const or ops.reads_as_kernel(u, node) for u in node.users)
        budget = precompute_budget(gm)
        stored = sum(_numel(env[s]) for s in sources[node])
        if kernel and _merged_into_summed_convs(gm, node, value):
            stored = max(stored, value.numel())  # it grows a conv that is there anyway: nothing added in the end
        why = cost.why_not_stored(value.numel(), stored, kernel=kernel, budget_left=budget.left)
        if why is not None:
            ctx.refuse(node, f"constant {node.name} is computed in forward: {why}", costlier=True)
            continue
        budget.spent += cost.stored_growth(value.numel(), stored, kernel=kernel)
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

"""One cost model: the weights a layer stores and the multiply-accumulates it does per sample.

Op counts are not the measure: a fold that turns a depthwise conv into a dense one halves
nothing and multiplies the work. Every pass asks :func:`why_costlier` before it emits a
layer that replaces others, and the report prints totals from :func:`graph_cost`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import astuple, dataclass

import torch
from torch import fx

from . import ops
from .meta import concrete_shape, fetch_attr

__all__ = ["FOOTPRINT_LABELS", "PRECOMPUTE_FRACTION", "Cost", "Footprint", "footprint",
           "graph_cost", "kernel_cost", "node_positions", "precompute_budget", "result_costlier", "stored_elements",
           "stored_growth", "why_costlier", "why_not_stored"]


@dataclass(frozen=True)
class Cost:
    """Stored weights (elements, bias included) and multiply-accumulates per sample."""

    weights: int
    macs: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.weights + other.weights, self.macs + other.macs)


def _positions(shape: tuple[int, ...] | None, channel_dim: int) -> int:
    """Output positions per sample: the product of the dims after the channel axis (1 where unknown)."""
    if shape is None:
        return 1
    return math.prod(shape[channel_dim + 1:]) if channel_dim >= 0 else 1


def kernel_cost(weight: torch.Tensor, bias: torch.Tensor | None, positions: int, *, transposed: bool = False,
                input_positions: int | None = None) -> Cost:
    """Cost of a conv or linear kernel applied at ``positions`` output positions per sample.

    A conv does ``O * I/g * prod(k)`` MACs per output position (all of ``weight``); a transposed conv does
    all of ``weight`` per *input* position (``input_positions``).
    """
    stored = weight.numel() + (bias.numel() if bias is not None else 0)
    per = input_positions if transposed and input_positions is not None else positions
    return Cost(stored, weight.numel() * per)


PRECOMPUTE_FRACTION = 0.01
"""The precompute budget: constants computed in forward (an anchor grid built from ``arange``, a gathered bias)
are evaluated once and stored while the elements they add, summed over the whole model, stay within this fraction
of the stored elements of the model as captured. Each removes executed ops; the bound keeps the memory they take
small and known."""


def precompute_budget(model_stored: int) -> int:
    """Stored elements that precomputed constants may add to a model storing ``model_stored``."""
    return int(PRECOMPUTE_FRACTION * model_stored)


def stored_growth(numel: int, source_numel: int, *, kernel: bool) -> int:
    """The stored elements charged to the precompute budget for storing a constant of ``numel`` elements computed
    from ``source_numel`` stored ones. A conv or linear kernel replaces its sources (nothing else reads them once it
    is stored): it is charged what it grew by. Any other constant is charged whole, an upper bound: its sources may
    stay stored for other readers."""
    return max(0, numel - source_numel) if kernel else numel


def why_not_stored(numel: int, source_numel: int, *, kernel: bool, budget_left: int = 0) -> str | None:
    """Why a constant of ``numel`` elements computed from ``source_numel`` stored ones should stay in the
    forward rather than be stored, or ``None``: it is stored where it does not grow (a DiracNet kernel), or where
    its charge (:func:`stored_growth`) fits in ``budget_left``, what is left of the model's
    :func:`precompute_budget`. A kernel the forward builds by padding or masking a smaller parameter counts too: the
    result never stores more than the model it was given beyond that budget."""
    growth = stored_growth(numel, source_numel, kernel=kernel)
    if numel <= source_numel or growth <= budget_left:
        return None
    return (f"it would grow to {numel:,} stored elements from {source_numel:,}, adding {growth:,}: more than the "
            f"{budget_left:,} left of the precompute budget ({PRECOMPUTE_FRACTION:.0%} of the model's stored elements)")


def why_costlier(before: Iterable[Cost], after: Cost) -> str | None:
    """Why replacing layers costing ``before`` by one costing ``after`` is a regression, or ``None``."""
    total = sum(before, Cost(0, 0))
    if after.weights > total.weights:
        return f"it would store {after.weights:,} weights where the layers it replaces store {total.weights:,}"
    if after.macs > total.macs:
        return f"it would do {after.macs:,} multiply-accumulates per sample where the layers it replaces do " \
               f"{total.macs:,}"
    return None


def node_positions(node: fx.Node, channel_dim: int) -> int:
    """Positions per sample of ``node``'s value (after its channel axis), from capture's shapes."""
    return _positions(concrete_shape(node), channel_dim)


def _kernel_shape(gm: fx.GraphModule, node: fx.Node) -> tuple[tuple[int, ...], bool] | None:
    """The weight shape of a conv or linear node (stored or computed in forward), and whether it is a conv."""
    layer = ops.weighted(gm, node)
    if layer is not None:
        return tuple(layer.weight.shape), layer.is_conv
    kind = ops.op_kind(gm, node)
    if kind not in ("conv", "linear") or node.op != "call_function" or len(node.args) < 2:
        return None
    weight = node.args[1]
    shape = concrete_shape(weight) if isinstance(weight, fx.Node) else None
    return (shape, kind == "conv") if shape is not None else None


def graph_cost(gm: fx.GraphModule) -> Cost:
    """Total kernel weights and MACs per sample of the conv and linear layers of ``gm``, at the captured shapes.

    A transposed conv is counted like a conv at its output positions (an upper bound).
    """
    total = Cost(0, 0)
    for node in gm.graph.nodes:
        found = _kernel_shape(gm, node) if node.op in ("call_module", "call_function") else None
        if found is None:
            continue
        shape, is_conv = found
        out = concrete_shape(node)
        numel = math.prod(shape)
        if is_conv:
            dims = len(shape) - 2
            positions = _positions(out, 1 if out is not None and len(out) == dims + 2 else 0)
        else:
            positions = math.prod(out[1:-1]) if out is not None and len(out) > 2 else 1
        total += Cost(numel, numel * positions)
    return total


@dataclass(frozen=True)
class Footprint:
    """What a whole graph costs: stored floating elements, MACs per sample at the captured shape, and the conv,
    linear, batch-norm and elementwise (add/sub/mul/div) ops it executes."""

    stored: int
    macs: int
    conv: int = 0
    linear: int = 0
    batch_norm: int = 0
    elementwise: int = 0

    def costlier_than(self, other: Footprint) -> list[str]:
        """Each measure in which ``self`` costs more than ``other``, as ``"stored elements 10 > 8"``."""
        return [f"{label} {mine:,} > {theirs:,}" for label, mine, theirs in
                zip(FOOTPRINT_LABELS, astuple(self), astuple(other)) if mine > theirs]


FOOTPRINT_LABELS = ("stored elements", "MACs per sample", "conv", "linear", "batch_norm", "elementwise")
"""How the report names each field of :class:`Footprint`, in order."""


def stored_elements(gm: fx.GraphModule) -> int:
    """Floating elements of the parameters and buffers ``gm`` holds and of the plain tensor attributes its graph
    reads (torch.export's lifted constants, which the finalized module stores as buffers), each tensor once however
    often it is read."""
    attrs = [fetch_attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"] if hasattr(gm, "graph") else []
    tensors = {id(t): t for t in [*gm.parameters(), *gm.buffers(), *attrs]
               if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return sum(t.numel() for t in tensors.values())


def footprint(gm: fx.GraphModule) -> Footprint:
    """The :class:`Footprint` of ``gm``: op kinds through the recognizers, MACs from :func:`graph_cost`."""
    kinds = [ops.op_kind(gm, n) for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    count = {k: kinds.count(k) for k in ("conv", "linear", "batch_norm", "add_sub", "mul_div")}
    return Footprint(stored_elements(gm), graph_cost(gm).macs, count["conv"], count["linear"], count["batch_norm"],
                     count["add_sub"] + count["mul_div"])


def result_costlier(captured: fx.GraphModule | Footprint, folded: fx.GraphModule | Footprint, *,
                    precomputed: int = 0) -> str | None:
    """The whole-result guarantee: where the ``folded`` result costs more than the ``captured`` input graph (stored
    elements, MACs, conv/linear/BN/elementwise ops), or ``None`` when it costs no more in any of them. Stored
    elements may exceed the input's by ``precomputed``, the elements that precomputed constants added within the
    model's :func:`precompute_budget` (each removed executed ops). Take the captured footprint before the passes
    run (they rewrite the graph in place)."""
    before = captured if isinstance(captured, Footprint) else footprint(captured)
    after = folded if isinstance(folded, Footprint) else footprint(folded)
    allowed = Footprint(before.stored + precomputed, *astuple(before)[1:])
    worse = after.costlier_than(allowed)
    return "the result costs more than its input: " + "; ".join(worse) if worse else None

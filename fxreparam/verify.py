"""Verification: the optimized model must compute what the original computes.

Both run in float64 copies on the example inputs and on fresh random inputs of the same
shapes; the relative error ``||y' - y|| / ||y||`` of every floating output is compared
with a tolerance set by the model's dtype (the folded weights are rounded to it once).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["TOLERANCE", "Verification", "compare", "relative_error"]

# Relative error allowed for a model stored in each dtype: a few hundred ulps of rounding of
# the folded weights, compounded over depth. A wrong fold is off by orders of magnitude more.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@dataclass
class Verification:
    """The outcome of a comparison: worst relative error, the bound, and how many inputs were tried."""

    error: float
    tolerance: float
    trials: int

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (f"{verdict}: max relative error {self.error:.2e} "
                f"(tolerance {self.tolerance:.0e}, float64, {self.trials} inputs)")


def relative_error(reference: Any, candidate: Any) -> float:
    """Worst ``||c - r|| / ||r||`` over the floating tensors of two output trees of the same structure."""
    ref_leaves, ref_spec = pytree.tree_flatten(reference)
    cand_leaves, cand_spec = pytree.tree_flatten(candidate)
    if ref_spec != cand_spec:
        return float("inf")
    worst = 0.0
    for r, c in zip(ref_leaves, cand_leaves):
        if not isinstance(r, torch.Tensor) or not r.is_floating_point():
            if isinstance(r, torch.Tensor) and not torch.equal(r, c):
                return float("inf")
            continue
        if r.shape != c.shape:
            return float("inf")
        r, c = r.double(), c.double()
        finite = torch.isfinite(r)
        if not torch.equal(finite, torch.isfinite(c)):
            return float("inf")  # inf or nan where the other is finite
        if not torch.equal(torch.nan_to_num(r[~finite]), torch.nan_to_num(c[~finite])):
            return float("inf")  # non-finite in the same places, but not the same ones (nan, +inf, -inf)
        r, c = r[finite], c[finite]
        diff = torch.linalg.vector_norm(c - r).item()
        scale = torch.linalg.vector_norm(r).item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def _float64(x: Any) -> Any:
    return x.detach().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _fresh(x: Any, generator: torch.Generator) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
    return x


def input_sets(args: tuple, kwargs: dict, trials: int, seed: int = 0) -> list[tuple[tuple, dict]]:
    """The example inputs and ``trials - 1`` fresh random inputs of the same shapes, all float64."""
    sets = [pytree.tree_map(_float64, (args, kwargs))]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(trials - 1):
        sets.append(pytree.tree_map(lambda x: _fresh(x, generator), (args, kwargs)))
    return sets


def float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model``: every floating parameter and buffer converted."""
    return copy.deepcopy(model).double()


def compare(reference: nn.Module | Callable, candidate: nn.Module | Callable, args: tuple, kwargs: dict,
            tolerance: float, trials: int = 3) -> Verification:
    """Run both (already float64) on the example and random inputs; the worst relative error."""
    worst = 0.0
    with torch.no_grad():
        for a, k in input_sets(args, kwargs, trials):
            worst = max(worst, relative_error(reference(*a, **k), candidate(*a, **k)))
    return Verification(worst, tolerance, trials)

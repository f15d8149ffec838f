"""What every example prints: op counts before and after, the error, and eager CPU timings."""

from __future__ import annotations

import torch

import fxreparam
from fxreparam.timing import time_ms


def eager_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int = 20) -> float:
    """Median eager forward time in milliseconds, after warm-up."""
    return time_ms(model, x, repeats)


def summarize(name: str, model: torch.nn.Module, folded: torch.nn.Module, x: torch.Tensor) -> None:
    """Print the report's op counts, the verification error and eager CPU time before and after."""
    rep = fxreparam.report(folded)
    print(f"== {name} ==")
    print(f"{'ops':<12}{'before':>10}{'after':>10}")
    for key, before in rep.before.as_dict().items():
        print(f"{key:<12}{before:>10}{rep.after.as_dict()[key]:>10}")
    print(f"verification: {rep.verification}")
    if rep.refusals:
        print("refused:", *[f"  {r}" for r in rep.refusals], sep="\n")
    shape = "x".join(map(str, x.shape))
    print(f"eager CPU ({torch.get_num_threads()} threads), input {shape}: training structure "
          f"{eager_ms(model, x):.2f} ms, folded {eager_ms(folded, x):.2f} ms")

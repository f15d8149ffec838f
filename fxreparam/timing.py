"""Wall-clock timing shared by the CLI, the benchmarks and the examples."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["time_ms"]


def time_ms(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, repeat: int, warmup: int = 3) -> float:
    """Median wall time of ``fn(x)`` in milliseconds over ``repeat`` runs after ``warmup`` (CUDA synchronized)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeat):
            sync()
            start = time.perf_counter()
            fn(x)
            sync()
            if i >= warmup:
                times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)

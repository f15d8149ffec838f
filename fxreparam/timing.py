"""Wall-clock timing shared by the CLI, the benchmarks and the examples."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["time_interleaved", "time_ms"]


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


def time_interleaved(fns: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, repeat: int, warmup: int = 3
                     ) -> dict[str, float]:
    """Median wall time in milliseconds of each ``fns[name](x)``, the functions taking turns run by run, so
    that a change in the machine's load (another process, the clock) falls on all of them alike."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for i in range(warmup + repeat):
            for name, fn in fns.items():
                sync()
                start = time.perf_counter()
                fn(x)
                sync()
                if i >= warmup:
                    times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}

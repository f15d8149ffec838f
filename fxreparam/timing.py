"""Wall-clock timing shared by the CLI, the benchmarks and the examples."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Spread", "interleaved_times", "spread_interleaved", "time_interleaved", "time_ms"]


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


@dataclass(frozen=True)
class Spread:
    """Run-to-run spread of one variant's wall times, in milliseconds: what a single median hides."""

    min: float
    median: float
    max: float

    @classmethod
    def of(cls, times: list[float]) -> Spread:
        """The spread of a list of run times."""
        return cls(min(times), statistics.median(times), max(times))

    def overlaps(self, other: Spread) -> bool:
        """Whether the two ``[min, max]`` ranges overlap: then their ratio is within the run-to-run noise."""
        return self.min <= other.max and other.min <= self.max


def interleaved_times(fns: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, repeat: int, warmup: int = 3
                      ) -> dict[str, list[float]]:
    """Wall times in milliseconds of each ``fns[name](x)``, the functions taking turns run by run, so that a
    change in the machine's load (another process, the clock) falls on all of them alike."""
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
    return times


def time_interleaved(fns: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, repeat: int, warmup: int = 3
                     ) -> dict[str, float]:
    """Median wall time in milliseconds of each ``fns[name](x)``, timed by :func:`interleaved_times`."""
    return {name: statistics.median(t) for name, t in interleaved_times(fns, x, repeat, warmup).items()}


def spread_interleaved(fns: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, repeat: int, warmup: int = 3
                       ) -> dict[str, Spread]:
    """Min / median / max wall time of each ``fns[name](x)``, timed by :func:`interleaved_times`."""
    return {name: Spread.of(t) for name, t in interleaved_times(fns, x, repeat, warmup).items()}

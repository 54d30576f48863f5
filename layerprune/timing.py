"""Timing calls in interleaved rounds, by the wall clock and by this process's CPU time: the one way the demo's
comparison and the benchmarks time what they compare."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Timing:
    """One candidate's timed calls, a round each: their wall seconds, the CPU seconds this process spent in them
    (time.process_time: every thread's, onnxruntime's intra-op threads included, so spinning threads count) and
    what each returned."""

    seconds: list[float]
    results: list[Any]
    cpu_seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return float(np.median(self.seconds))

    @property
    def cpu_median(self) -> float:
        return float(np.median(self.cpu_seconds))


def timed_rounds(candidates: dict[str, Callable[[], Any]], rounds: int,
                 warm_up: dict[str, Callable[[], Any]] | None = None) -> dict[str, Timing]:
    """Each candidate called once untimed (or its `warm_up` call), then `rounds` rounds in which every candidate
    is called once in turn (A B C, A B C, ...), timed with time.perf_counter and time.process_time. Interleaved,
    a change in the machine's load (other jobs on shared cores, the clock) falls on every candidate alike instead
    of on whichever ran last; the median over rounds is the figure to report."""
    for name, call in candidates.items():
        (warm_up or {}).get(name, call)()
    timings = {name: Timing([], []) for name in candidates}
    for _ in range(rounds):
        for name, call in candidates.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            result = call()
            timings[name].seconds.append(time.perf_counter() - started)
            timings[name].cpu_seconds.append(time.process_time() - cpu_started)
            timings[name].results.append(result)
    return timings

"""Interleaved timing shared by the benchmarks: each call timed in turn, so load changes hit all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def interleaved_medians(calls: list[Callable[[], Any]], reps: int, inner: int,
                        clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Median seconds per call of each zero-argument callable, repetitions interleaved (after one warm-up call each).

    ``clock`` is wall time by default; ``time.process_time`` (CPU seconds of
    every thread of this process) is steadier on a machine others load.

    Example:
        >>> [t >= 0 for t in interleaved_medians([lambda: jax.numpy.ones(2)], reps=2, inner=1)]
        [True]
    """
    for call in calls:
        jax.block_until_ready(call())
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(reps):
        for i, call in enumerate(calls):
            start = clock()
            for _ in range(inner):
                out = call()
            jax.block_until_ready(out)
            times[i].append((clock() - start) / inner)
            del out  # Freed here, not inside the next call's timing (large outputs take a while to free).
    return [statistics.median(t) for t in times]

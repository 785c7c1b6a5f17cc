"""Timing several steps under the same load: warm-up, then round-robin timed passes.

Torch-free, so the planner's measuring code and the profiler share it."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

# How a point's repeats become its time (``--statistic`` of the planner's calibration).
STATISTICS: dict[str, Callable[[Sequence[float]], float]] = {
    "median": statistics.median,
    "min": min,
}


def timed_rounds(
    timers: Sequence[Callable[[], float]], warmup: int, repeats: int
) -> list[list[float]]:
    """``times[i][p]``, timer i's p-th timed call.

    Every timer's ``warmup`` untimed calls first, then ``repeats`` rounds of one call of
    each; round p starts at timer p (mod n), so that no timer always follows the same
    one, and a change in the machine's load during the run shifts every timer's passes
    alike instead of the few timed while it lasted."""
    n = len(timers)
    for timer in timers:
        for _ in range(warmup):
            timer()
    times = [[0.0] * repeats for _ in range(n)]
    for p in range(repeats):
        for j in range(n):
            i = (p + j) % n
            times[i][p] = timers[i]()
    return times

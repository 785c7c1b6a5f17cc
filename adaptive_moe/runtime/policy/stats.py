"""Per-strategy statistics of a layer: how often each strategy ran and its mean forward
time, recorded without synchronising the device (``core.timing`` marks read lazily)."""

from __future__ import annotations

from collections import defaultdict

import torch

from adaptive_moe.core import timing
from adaptive_moe.core.strategy import Strategy


class StrategyStats:
    """How often each strategy ran and its forward time (``core.timing`` marks: CUDA
    events are read lazily so that recording never synchronises the device)."""

    def __init__(self) -> None:
        self.count: dict[Strategy, int] = defaultdict(int)
        self.total_ms: dict[Strategy, float] = defaultdict(float)
        self.timed: dict[Strategy, int] = defaultdict(int)
        self._pending: list[tuple[Strategy, timing.Mark, timing.Mark]] = []
        self._compiles = 0

    def start(self, device: torch.device) -> timing.Mark:
        self._compiles = compile_events()
        return timing.mark(device)

    def stop(self, strategy: Strategy, started: timing.Mark, device: torch.device) -> None:
        self.count[strategy] += 1
        # Counted, not timed: a strategy's first run (warm-up: kernel JIT and autotuning,
        # allocator growth) and any run during which torch.compile compiled something.
        if self.count[strategy] == 1 or compile_events() != self._compiles:
            return
        self._pending.append((strategy, started, timing.mark(device)))
        if len(self._pending) > 256 or isinstance(started, float):
            self._drain(block=False)

    def _drain(self, block: bool) -> None:
        keep = []
        for strategy, a, b in self._pending:
            if block or timing.ready(b):
                self.total_ms[strategy] += timing.elapsed_ms(a, b)
                self.timed[strategy] += 1
            else:
                keep.append((strategy, a, b))
        self._pending = keep

    def report(self) -> dict[Strategy, dict[str, float]]:
        self._drain(block=True)
        return {
            s: {
                "count": n,
                "timed": self.timed[s],
                "mean_ms": self.total_ms[s] / max(1, self.timed[s]),
            }
            for s, n in sorted(self.count.items())
        }


@torch.compiler.disable
def compile_events() -> int:
    """How many frames torch.compile has converted in this process (0 where torch does
    not count them); a change between two reads means something compiled in between.
    One counter read: this runs twice per forward."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return counters["frames"]["total"]

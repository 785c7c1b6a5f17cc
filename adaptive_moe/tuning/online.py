"""Online re-measurement: keep a strategy table honest while training.

Every ``every``-th forward of a workload bucket runs one of the table's ``candidates``
fastest strategies for that bucket (round robin) instead of the best, and times its
forward and backward (CUDA events, or the host clock on CPU). At the layer's next
forward the time is reduced over the group (MAX: the slowest rank is the step time) and
recorded in the table, which re-picks the bucket's best. Every rank probes at the same
forwards and records the same reduced number, so all ranks keep choosing alike.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
import torch.distributed as dist

from adaptive_moe.core import timing
from adaptive_moe.core.checks import int_at_least, positive_int
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.tuning.table import StrategyTable


@dataclasses.dataclass(frozen=True)
class Exploration:
    """How often to re-measure, and among how many candidates.

    Attributes:
        every: probe on every ``every``-th forward of a bucket (>= 2).
        candidates: the table's this-many fastest strategies of the bucket (>= 1).
    """

    every: int = 50
    candidates: int = 3

    def __post_init__(self) -> None:
        int_at_least("Exploration.every", self.every, 2)
        positive_int("Exploration.candidates", self.candidates)


class _Clock:
    """Marks of one probe (``core.timing``): forward start and end, backward start and end."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[timing.Mark] = []

    def mark(self) -> None:
        self.marks.append(timing.mark(self.device))

    def total_ms(self) -> float | None:
        """Forward (marks 0-1) plus backward (marks 2-3); None if backward never ran."""
        if len(self.marks) < 4:
            return None
        a, b, c, d = self.marks[:4]
        return timing.elapsed_ms(a, b) + timing.elapsed_ms(c, d)


@dataclasses.dataclass
class _Probe:
    key: int
    strategy: Strategy
    clock: _Clock


class OnlineTuner:
    """Per-layer exploration state (see module docstring)."""

    def __init__(self, table: StrategyTable, exploration: Exploration):
        self.table, self.cfg = table, exploration
        self.calls: dict[int, int] = defaultdict(int)
        self.pending: _Probe | None = None

    def settle(self, group: dist.ProcessGroup | None, device: torch.device) -> None:
        """Record the last probe's time (a collective when the layer is distributed)."""
        probe, self.pending = self.pending, None
        if probe is None:
            return
        ms = probe.clock.total_ms()
        value = torch.tensor([ms if ms is not None else -1.0], device=device)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        if value.item() > 0:
            self.table.record(probe.key, probe.strategy, value.item())

    def choose(self, max_tokens: int) -> tuple[Strategy, _Probe | None]:
        """The strategy for this forward, and a probe to time it with (or None)."""
        key = self.table.buckets.key(max_tokens)
        nearest = self.table.nearest_key(key)
        self.calls[key] += 1
        n = self.calls[key]
        if n % self.cfg.every:
            return self.table.best_for(key), None
        times = self.table.entries[nearest].times_ms
        ranked = sorted(times, key=lambda s: (times[s], s))[: self.cfg.candidates]
        strategy = ranked[(n // self.cfg.every) % len(ranked)]
        return strategy, _Probe(nearest, strategy, None)  # type: ignore[arg-type]

    def start(self, probe: _Probe, x: torch.Tensor) -> None:
        probe.clock = _Clock(x.device)
        probe.clock.mark()

    def finish(self, probe: _Probe, x: torch.Tensor, y: torch.Tensor) -> None:
        """Mark the forward's end and hook the backward's start (y's grad) and end (x's)."""
        probe.clock.mark()
        if y.requires_grad and x.requires_grad:
            y.register_hook(lambda g: (probe.clock.mark(), g)[1])
            x.register_hook(lambda g: (probe.clock.mark(), g)[1])
        self.pending = probe

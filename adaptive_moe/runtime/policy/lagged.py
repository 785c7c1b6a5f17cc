"""The previous forward's workload, read without synchronising the device.

A layer on one process needs its routing workload on the host only to pick an expert
kernel (the table's, or the one measured for that workload's bucket); the dispatch
itself can run on device-side offsets (``runtime.inference``). Copying this forward's
counts to the host would stall the host until the router has run, and the GPU then
idles while the host launches the rest of the forward (about 1 ms per step on the
fine-grained shapes in benchmarks/RESULTS.md). Instead each forward starts an
asynchronous copy of two numbers into pinned host memory and the next forward of the
same layer reads them: the kernel is chosen from a workload one step old.

    kept     [E] int64 on the device: slots per expert after capacity drops
    host     [2] int64 pinned host memory: (busiest expert's slots, total slots)
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Workload:
    """One forward's workload, as the strategy lookup keys it.

    Attributes:
        tokens: T, the tokens of that forward.
        max_tokens: slots of the busiest expert.
        slots: slots over all experts.
    """

    tokens: int
    max_tokens: int
    slots: int


class LaggedWorkload:
    """Holds the asynchronous copy of the last recorded forward's workload.

    Single-threaded use by one layer; the host reads the buffer only after the event
    recorded behind its latest copy has completed."""

    def __init__(self) -> None:
        self._host: torch.Tensor | None = None  # [2] int64, pinned on CUDA
        self._ready: torch.cuda.Event | None = None
        self._tokens = 0  # T of the forward whose copy is in flight
        self._value: Workload | None = None

    def previous(self) -> Workload | None:
        """The most recent recorded workload whose copy has landed (None before any).

        Never waits: the copy was issued a whole forward ago, and if the device has not
        reached it yet the workload before it is returned."""
        if self._ready is not None and self._ready.query():
            self._ready = None
            self._value = Workload(self._tokens, int(self._host[0]), int(self._host[1]))
        return self._value

    def remember(self, workload: Workload) -> None:
        """Record a workload already on the host (a forward that synchronised anyway)."""
        self._ready = None  # an older copy in flight is superseded
        self._value = workload

    def record(self, tokens: int, kept: torch.Tensor) -> None:
        """Start copying ``kept`` [E]'s maximum and sum to the host (``tokens``: T)."""
        stats = torch.stack([kept.max(), kept.sum()])  # [2] int64
        if stats.device.type != "cuda":
            self._value = Workload(tokens, *(int(v) for v in stats.tolist()))
            return
        self.previous()  # keep the last landed value; a copy still in flight is superseded
        if self._host is None:
            self._host = torch.empty(2, dtype=torch.int64, pin_memory=True)
        # Stream order: this copy lands after any earlier one into the same buffer.
        self._host.copy_(stats, non_blocking=True)
        self._tokens = tokens
        self._ready = torch.cuda.Event()
        self._ready.record()

    def __deepcopy__(self, memo: dict[int, object]) -> LaggedWorkload:
        return LaggedWorkload()  # a copy measures its own forwards

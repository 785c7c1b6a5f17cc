"""The one timer: marks on the device's timeline (CUDA events, read lazily so that taking
a mark never synchronises the device) or the host clock on CPU.

    start = mark(device); ...; end = mark(device)
    if ready(end): ms = elapsed_ms(start, end)     # elapsed_ms waits for end if needed
"""

from __future__ import annotations

import time

import torch

Mark = torch.cuda.Event | float


def mark(device: torch.device) -> Mark:
    """Now, on ``device``'s current stream (CUDA) or the host clock (anything else)."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def ready(m: Mark) -> bool:
    """Whether the device has reached ``m`` (host marks always have)."""
    return isinstance(m, float) or m.query()


def elapsed_ms(start: Mark, end: Mark) -> float:
    """Milliseconds from ``start`` to ``end`` (waits for ``end`` on the device)."""
    if isinstance(start, float) and isinstance(end, float):
        return (end - start) * 1e3
    end.synchronize()
    return start.elapsed_time(end)

"""Workload buckets: the key under which a forward's routing load is looked up.

The workload of one forward is ``max_tokens``: the largest number of (token, choice)
rows any expert receives across the whole group, i.e. ``max_e sum_ranks count[e]``.
Every rank computes it from the same all-reduced counts, so every rank reaches the same
key and therefore the same strategy.

    geometric (default)  key 0 holds max_tokens 0; key n >= 1 holds
                         [ratio**(n-1), ratio**n), so keys grow with log(max_tokens)
    linear               key = max_tokens // window (Tutel's floor(c / R), R = 128)

Pure Python, no torch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from adaptive_moe.core.checks import non_negative_int, positive_int

BucketMode = Literal["geometric", "linear"]
BUCKET_MODES: tuple[str, ...] = ("geometric", "linear")


def _check_count(name: str, value: object) -> int:
    non_negative_int(name, value)
    return value  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Buckets:
    """How ``max_tokens`` values are grouped into keys (see module docstring).

    Attributes:
        mode: ``"geometric"`` or ``"linear"``.
        ratio: geometric mode: each bucket spans a factor ``ratio`` (> 1).
        window: linear mode: each bucket spans ``window`` values (>= 1).
    """

    mode: BucketMode = "geometric"
    ratio: float = 2.0
    window: int = 128

    def __post_init__(self) -> None:
        if self.mode not in BUCKET_MODES:
            raise ValueError(f"Buckets.mode must be one of {BUCKET_MODES}, got {self.mode!r}")
        ratio_ok = isinstance(self.ratio, (int, float)) and not isinstance(self.ratio, bool)
        if not (ratio_ok and math.isfinite(self.ratio) and self.ratio > 1):
            raise ValueError(f"Buckets.ratio must be a finite number > 1, got {self.ratio!r}")
        positive_int("Buckets.window", self.window)

    def key(self, max_tokens: int) -> int:
        """The bucket holding ``max_tokens``; non-decreasing in ``max_tokens``."""
        n = _check_count("max_tokens", max_tokens)
        if self.mode == "linear":
            return n // self.window
        if n == 0:
            return 0
        key = 1 + math.floor(math.log(n) / math.log(self.ratio))
        # log() may land a hair off an exact power; settle on ratio**(key-1) <= n < ratio**key
        # computed with the same pow() that _lower_edge() uses.
        while key > 1 and self._lower_edge(key) > n:
            key -= 1
        while self._lower_edge(key + 1) <= n:
            key += 1
        return key

    def representative(self, key: int) -> int:
        """A ``max_tokens`` value inside bucket ``key`` (its geometric or arithmetic
        middle): what the profiler measures for that bucket. ``key(representative(k))
        == k``. Raises ValueError for a geometric bucket that holds no integer (possible
        when ``ratio`` < 2)."""
        k = _check_count("key", key)
        if self.mode == "linear":
            return k * self.window + (self.window - 1) // 2
        if k == 0:
            return 0
        lo, hi = self._lower_edge(k), self._lower_edge(k + 1)  # bucket holds [lo, hi)
        first, last = math.ceil(lo), math.ceil(hi) - 1
        if first > last:
            raise ValueError(
                f"bucket {k} = [{lo:g}, {hi:g}) holds no integer max_tokens "
                f"(ratio={self.ratio} is finer than 1 token there)"
            )
        middle = round(math.sqrt(lo * hi))
        return min(max(middle, first), last)

    def _lower_edge(self, key: int) -> float:
        return float(self.ratio) ** (key - 1)

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "ratio": float(self.ratio), "window": self.window}


def workload_range(
    tokens: int, world: int, num_experts: int, top_k: int, capacity_factor: float = 0.0
) -> tuple[int, int]:
    """(balanced, extreme) ``max_tokens`` of a forward with ``tokens`` per rank: every
    expert equally loaded, and every token of the group choosing the same expert (capped
    by the capacity when ``capacity_factor != 0``)."""
    lo = math.ceil(tokens * world * top_k / num_experts)
    hi = tokens * world
    if capacity_factor:
        per_rank = top_k * math.ceil(abs(capacity_factor) * math.ceil(tokens / num_experts))
        hi = min(hi, world * per_rank)
    return lo, max(lo, hi)


def sweep_keys(buckets: Buckets, lo: int, hi: int, count: int) -> list[tuple[int, int]]:
    """Up to ``count`` (key, max_tokens) pairs spread evenly over the keys from
    ``key(lo)`` to ``key(hi)``, both ends included; max_tokens is the bucket's
    representative clipped to [lo, hi] (so it stays inside its bucket)."""
    first, last = buckets.key(lo), buckets.key(hi)
    n = min(count, last - first + 1)
    keys = sorted({first + round(i * (last - first) / max(1, n - 1)) for i in range(n)})
    out = []
    for key in keys:
        try:
            target = buckets.representative(key)
        except ValueError:  # a geometric bucket with no integer in it: nothing to measure
            continue
        out.append((key, min(max(target, lo), hi)))
    return out

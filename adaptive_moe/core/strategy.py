"""The ``Strategy`` value: how one MoE forward is executed over the fixed layout.

A strategy never changes what is computed, only which collectives run:

    r       0 = DP (all-gather expert weights, no token all-to-all);
            1 = EP+DP; a divisor of the shard count s up to s = EP+MP (tokens repeated
            to r hidden slices, partial outputs summed).
    a2a     "linear": one all-to-all over the group;
            "2dh": intra-node all-to-all, then inter-node all-to-all among ranks with the
            same local index (Tutel's two-dimensional hierarchical algorithm).
    degree  tokens split into this many chunks so the all-to-all of one chunk overlaps
            the expert compute of another.
    kernel  the local expert-compute variant (see ``adaptive_moe.runtime.experts.kernels``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from adaptive_moe.core.checks import is_int, non_negative_int

A2A = Literal["linear", "2dh"]
Kernel = Literal["loop", "scatter", "bmm", "grouped_mm", "gemv"]

A2A_ALGOS: tuple[str, ...] = ("linear", "2dh")
KERNELS: tuple[str, ...] = ("loop", "scatter", "bmm", "grouped_mm", "gemv")
# Kernels whose second GEMM rebuilds the activation output in backward instead of keeping
# it (``runtime.experts.kernels.Remat``); the calculator counts one [rows, h] tensor less for them.
REBUILDS_ACTIVATION: tuple[str, ...] = ("scatter", "grouped_mm", "gemv")
DEGREES: tuple[int, ...] = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True, order=True)
class Strategy:
    """A frozen, hashable, serialisable execution strategy (see module docstring)."""

    r: int = 1
    a2a: A2A = "linear"
    degree: int = 1
    kernel: Kernel = "loop"

    def __post_init__(self) -> None:
        non_negative_int("Strategy.r", self.r)
        if self.a2a not in A2A_ALGOS:
            raise ValueError(f"Strategy.a2a must be one of {A2A_ALGOS}, got {self.a2a!r}")
        if not is_int(self.degree) or self.degree not in DEGREES:
            raise ValueError(f"Strategy.degree must be one of {DEGREES}, got {self.degree!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"Strategy.kernel must be one of {KERNELS}, got {self.kernel!r}")

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Strategy:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown Strategy fields {sorted(unknown)}")
        return cls(**data)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"r={self.r},{self.a2a},d={self.degree},{self.kernel}"

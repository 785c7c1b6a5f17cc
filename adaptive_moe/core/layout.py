"""The fixed parameter layout: which share of the expert weights each rank stores.

Pure functions, no torch. With W ranks and E experts (notation in ``config``):

    E >= W (E % W == 0): s = 1, rank i stores experts [i*E/W, (i+1)*E/W) whole.
    E <  W (W % E == 0): s = W/E, rank i stores expert i // s, hidden slice j = i % s,
                         i.e. d_ff rows [j*h/s, (j+1)*h/s) of the gate part and of the
                         up part, and the same columns of down_proj.

Every strategy reads this same layout, so switching strategy moves no parameter.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """This rank's share of the experts.

    Attributes:
        world: W, ranks in the expert group.
        rank: this rank's index in the group.
        num_experts: E.
        d_ff: h, the full hidden size of one expert.
        shards: s, ranks sharing one expert (1 when E >= W).
        local_experts: global ids of the experts stored here.
        local_hidden: the slice of d_ff stored here.
    """

    world: int
    rank: int
    num_experts: int
    d_ff: int

    def __post_init__(self) -> None:
        w, e = self.world, self.num_experts
        if w < 1 or not 0 <= self.rank < w:
            raise ValueError(f"rank must be in [0, world={w}), got {self.rank}")
        if e >= w and e % w:
            raise ValueError(
                f"num_experts={e} must be a multiple of the group size {w} "
                f"(or divide it) so every rank stores the same share"
            )
        if e < w and w % e:
            raise ValueError(
                f"num_experts={e} must divide the group size {w} (or be a multiple of it) "
                f"so every rank stores the same share"
            )
        if self.d_ff % self.shards:
            raise ValueError(
                f"d_ff={self.d_ff} must be divisible by the shard count "
                f"{self.shards} = group size {w} / num_experts {e}"
            )

    @property
    def shards(self) -> int:
        return max(1, self.world // self.num_experts)

    @property
    def experts_per_rank(self) -> int:
        return max(1, self.num_experts // self.world)

    @property
    def hidden_per_rank(self) -> int:
        return self.d_ff // self.shards

    @property
    def local_experts(self) -> range:
        if self.shards > 1:
            e = self.rank // self.shards
            return range(e, e + 1)
        n = self.experts_per_rank
        return range(self.rank * n, (self.rank + 1) * n)

    @property
    def hidden_slice_index(self) -> int:
        return self.rank % self.shards

    @property
    def local_hidden(self) -> slice:
        j, n = self.hidden_slice_index, self.hidden_per_rank
        return slice(j * n, (j + 1) * n)

    def owner(self, expert: int, hidden_slice: int = 0) -> int:
        """Rank storing ``expert`` (and, when s > 1, its hidden slice ``hidden_slice``)."""
        if self.shards > 1:
            return expert * self.shards + hidden_slice
        return expert // self.experts_per_rank

    def valid_r(self) -> tuple[int, ...]:
        """Valid parallelism degrees: 0 (DP) and the divisors of s."""
        s = self.shards
        return (0, *(r for r in range(1, s + 1) if s % r == 0))

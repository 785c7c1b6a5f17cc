"""Where every routed row goes under a strategy, computed once per forward on the host.

Inputs are the kept-slot counts of every rank (``counts[src][e]``, exchanged by the
dispatcher), the fixed layout and the strategy's (r, degree). Nothing is padded: each
source sends exactly its real rows.

A *block* is the rows one source sends one destination for one expert:
    s == 1 (E >= W): block (dst, e) for each expert e stored on dst: all c[src][e] rows.
    s > 1  (E < W):  destination dst = e*s + g*q + m (q = s/r ranks per hidden block g,
                     m the rank within it) gets part m of the q balanced parts of
                     expert e's rows; each of the r hidden blocks g gets every row once,
                     so the rows are sent r times and their partial outputs summed.
Each block is split into ``degree`` balanced parts; chunk i carries part i of every
block, so chunk i's all-to-all can overlap chunk i-1's expert compute.

On the sending side rows are named by their position in the expert-sorted slot order
(``grouping.ExpertRows``): every block is a contiguous range there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.runtime.experts.grouping import cumulative


def part(n: int, parts: int, i: int) -> tuple[int, int]:
    """(start, length) of the i-th of ``parts`` balanced parts of n rows."""
    base, extra = divmod(n, parts)
    return i * base + min(i, extra), base + (1 if i < extra else 0)


def ranges_to_index(starts: list[int], lengths: list[int]) -> np.ndarray:
    """Concatenation of ``range(s, s + n)`` for each pair, as one int64 host array."""
    lens = np.asarray(lengths, dtype=np.int64)
    begins = np.asarray(starts, dtype=np.int64)
    ends_before = np.cumsum(lens) - lens
    return np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(begins - ends_before, lens)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One pipelining chunk, as host arrays (the dispatcher uploads them in one batch).

    Attributes:
        sizes: [W][W] rows each source sends each destination in this chunk.
        send_positions: [N_send] positions in this rank's expert-sorted slot order, in
            send order (by destination).
        recv_expert: [N_recv] local expert index of each received row (source order).
        recv_grouped: [N_recv] received rows grouped by local expert (stable, so source
            order within an expert): known here, so no device sort is needed.
        recv_counts: received rows per local expert.
    """

    sizes: tuple[tuple[int, ...], ...]
    send_positions: np.ndarray
    recv_expert: np.ndarray
    recv_grouped: np.ndarray
    recv_counts: tuple[int, ...]


def _blocks_to(
    layout: ShardLayout, r: int, src_counts: Sequence[int], dst: int
) -> list[tuple[int, int, int]]:
    """(local expert index on dst, start in src's sorted order, length) of each block."""
    offsets = cumulative(src_counts)
    s = layout.shards
    if s == 1:
        first = dst * layout.experts_per_rank
        return [
            (e - first, offsets[e], src_counts[e])
            for e in range(first, first + layout.experts_per_rank)
        ]
    q = s // r
    e, m = dst // s, (dst % s) % q
    start, length = part(src_counts[e], q, m)
    return [(0, offsets[e] + start, length)]


def build_plan(
    counts: Sequence[Sequence[int]], layout: ShardLayout, r: int, degree: int
) -> tuple[Chunk, ...]:
    """The chunks of this rank (``layout.rank``) for strategy (r >= 1, degree)."""
    w, me = layout.world, layout.rank
    if r < 1 or layout.shards % r:
        raise ValueError(f"r={r} is not an exchange strategy for shard count {layout.shards}")
    blocks = [[_blocks_to(layout, r, counts[src], dst) for dst in range(w)] for src in range(w)]
    chunks = []
    for i in range(degree):
        sizes = tuple(
            tuple(sum(part(n, degree, i)[1] for _, _, n in blocks[src][dst]) for dst in range(w))
            for src in range(w)
        )
        starts, lengths = [], []
        for dst in range(w):
            for _, start, n in blocks[me][dst]:
                off, length = part(n, degree, i)
                starts.append(start + off)
                lengths.append(length)
        experts, rows = [], []
        for src in range(w):
            for local, _, n in blocks[src][me]:
                experts.append(local)
                rows.append(part(n, degree, i)[1])
        recv_expert = np.repeat(np.asarray(experts, dtype=np.int64), rows)
        recv_counts = np.bincount(recv_expert, minlength=layout.experts_per_rank)
        chunks.append(
            Chunk(
                sizes=sizes,
                send_positions=ranges_to_index(starts, lengths),
                recv_expert=recv_expert,
                recv_grouped=np.argsort(recv_expert, kind="stable"),
                recv_counts=tuple(recv_counts.tolist()),
            )
        )
    return tuple(chunks)

"""Where every routed row goes under a strategy, computed once per forward on the host.

Inputs are the kept-slot counts of every rank (``counts[src][e]``, exchanged by the
layer), the fixed layout and the strategy's (r, degree). Nothing is padded: each
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

import torch

from adaptive_moe.core.layout import ShardLayout


def part(n: int, parts: int, i: int) -> tuple[int, int]:
    """(start, length) of the i-th of ``parts`` balanced parts of n rows."""
    base, extra = divmod(n, parts)
    return i * base + min(i, extra), base + (1 if i < extra else 0)


def ranges_to_index(starts: list[int], lengths: list[int], device: torch.device) -> torch.Tensor:
    """Concatenation of ``range(s, s + n)`` for each pair, as one int64 tensor."""
    total = sum(lengths)
    if total == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    lens = torch.tensor(lengths, dtype=torch.long)
    begins = torch.tensor(starts, dtype=torch.long)
    ends_before = torch.cumsum(lens, 0) - lens
    idx = torch.arange(total, dtype=torch.long) + torch.repeat_interleave(
        begins - ends_before, lens
    )
    return idx.to(device)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One pipelining chunk.

    Attributes:
        sizes: [W][W] rows each source sends each destination in this chunk.
        send_positions: [N_send] positions in this rank's expert-sorted slot order, in
            send order (by destination).
        recv_expert: [N_recv] local expert index of each received row (source order).
        recv_counts: received rows per local expert (host ints).
    """

    sizes: tuple[tuple[int, ...], ...]
    send_positions: torch.Tensor
    recv_expert: torch.Tensor
    recv_counts: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class DispatchPlan:
    """All chunks of one forward (see module docstring)."""

    chunks: tuple[Chunk, ...]
    max_expert_tokens: int


def _blocks_to(
    layout: ShardLayout, r: int, src_counts: list[int], dst: int
) -> list[tuple[int, int, int]]:
    """(local expert index on dst, start in src's sorted order, length) of each block."""
    offsets = [0]
    for c in src_counts:
        offsets.append(offsets[-1] + c)
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
    counts: list[list[int]],
    layout: ShardLayout,
    r: int,
    degree: int,
    device: torch.device,
) -> DispatchPlan:
    """Plan the exchange of this rank (``layout.rank``) for strategy (r >= 1, degree)."""
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
        recv_expert = torch.repeat_interleave(
            torch.tensor(experts, dtype=torch.long), torch.tensor(rows, dtype=torch.long)
        ).to(device)
        recv_counts = [0] * layout.experts_per_rank
        for local, n in zip(experts, rows):
            recv_counts[local] += n
        send_positions = ranges_to_index(starts, lengths, device)
        chunks.append(Chunk(sizes, send_positions, recv_expert, tuple(recv_counts)))
    max_tokens = max(
        (sum(counts[src][e] for src in range(w)) for e in range(len(counts[0]))), default=0
    )
    return DispatchPlan(tuple(chunks), max_tokens)

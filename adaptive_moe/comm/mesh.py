"""The process-group mesh of one expert group, built once and passed explicitly.

Notation (see ``adaptive_moe.core.config``): W ranks in the expert group, m = ranks_per_node,
N = W / m nodes, s = shard count (ranks sharing one expert). Group ranks are
node-contiguous, as torchrun numbers them: group rank g sits on node g // m with local
index g % m.

    group            the expert group, W ranks
    intra            {node*m + j : j < m}              the ranks of my node
    inter            {n*m + local_rank : n < N}        my local index on every node
    shard_blocks[r]  for each r dividing s, q = s // r, expert e = g // s,
                     block b = (g % s) // q:  {e*s + b*q + i : i < q}
                     (the ranks whose hidden slices are all-gathered under strategy r)

A subgroup whose ranks equal an already known group reuses that group (``intra`` of a
single node is ``group`` itself), so no redundant communicator is created.

Building is collective over the *default* (world) group: ``dist.new_group`` has to be
called by every rank of the world for every subgroup, members or not, in the same order.
So every rank of the world calls ``build_mesh`` the same number of times, each with its
own expert group (the expert groups must partition the world, or all be the world).
When ``group`` is a proper subgroup the ranks first exchange their group memberships
with one ``all_gather_object`` over the world (with NCCL, the current CUDA device must be
set). Build the mesh once, when the layer is constructed, never in forward.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Iterator, Mapping

import torch.distributed as dist
from torch.distributed import ProcessGroup

from adaptive_moe.core.checks import check_divides, divisors

RankTuple = tuple[int, ...]
Layout = tuple[RankTuple, int, int]  # (global ranks, ranks_per_node, shards) of a group


@dataclasses.dataclass(frozen=True, eq=False)
class Mesh:
    """The groups of one expert group as seen from this rank (see module docstring).

    Attributes:
        group: the expert group; None for a single process (W = 1).
        world: W, ranks in ``group``.
        rank: this rank's index in ``group``.
        ranks_per_node: m.
        nodes: N = W / m.
        node: rank // m.
        local_rank: rank % m.
        intra: the ranks of my node; None when m == 1.
        inter: the ranks with my local index on every node; None when N == 1.
        shards: s, ranks sharing one expert.
        shard_blocks: r -> the group of s // r consecutive ranks whose hidden slices
            are all-gathered under strategy r, for every divisor r of s; None where
            s // r == 1.
        global_ranks: group rank -> global (default-group) rank.
    """

    group: ProcessGroup | None
    world: int
    rank: int
    ranks_per_node: int
    nodes: int
    node: int
    local_rank: int
    intra: ProcessGroup | None
    inter: ProcessGroup | None
    shards: int
    shard_blocks: Mapping[int, ProcessGroup | None]
    global_ranks: RankTuple


def default_group(process_group: ProcessGroup | None) -> ProcessGroup | None:
    """``process_group``, else the world group if one is initialised, else None (a single
    process): what every ``process_group=None`` argument of this package means."""
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def build_mesh(
    group: ProcessGroup | None, ranks_per_node: int | None = None, shards: int = 1
) -> Mesh:
    """Build the mesh of ``group`` (collective over the world group, see module docstring).

    Args:
        group: the expert group, or None for a single process (no group is created).
        ranks_per_node: m; None takes LOCAL_WORLD_SIZE (set by torchrun) when it divides
            the group size, else the group size (one node).
        shards: s, ranks sharing one expert; must divide the group size.
    """
    world = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this rank ({dist.get_rank()}) is not a member of group")
    m = resolve_ranks_per_node(ranks_per_node, world)
    _check_divides("shards", shards, world)
    if world == 1:
        me = dist.get_rank() if dist.is_initialized() else 0
        return Mesh(
            group=group,
            world=1,
            rank=0,
            ranks_per_node=1,
            nodes=1,
            node=0,
            local_rank=0,
            intra=None,
            inter=None,
            shards=1,
            shard_blocks=types.MappingProxyType({1: None}),
            global_ranks=(me,),
        )
    ranks = tuple(dist.get_process_group_ranks(group))
    if list(ranks) != sorted(ranks):
        raise ValueError(f"group must list its global ranks in increasing order, got {list(ranks)}")
    groups = _create_subgroups(group, ranks, m, shards)
    node, local = divmod(rank, m)
    blocks = {r: groups.get(_shard_block(ranks, rank, shards // r)) for r in divisors(shards)}
    return Mesh(
        group=group,
        world=world,
        rank=rank,
        ranks_per_node=m,
        nodes=world // m,
        node=node,
        local_rank=local,
        intra=groups.get(_intra(ranks, rank, m)) if m > 1 else None,
        inter=groups.get(_inter(ranks, rank, m)) if m < world else None,
        shards=shards,
        shard_blocks=types.MappingProxyType(blocks),
        global_ranks=ranks,
    )


def _check_divides(name: str, value: object, world: int) -> None:
    check_divides(name, value, world, f"the group size {world}")


def resolve_ranks_per_node(ranks_per_node: int | None, world: int) -> int:
    if ranks_per_node is None:
        local = os.environ.get("LOCAL_WORLD_SIZE", "")
        fits = local.isdigit() and int(local) > 0 and world % int(local) == 0
        return int(local) if fits else world
    _check_divides("ranks_per_node", ranks_per_node, world)
    return ranks_per_node


def _intra(ranks: RankTuple, rank: int, m: int) -> RankTuple:
    start = rank // m * m
    return ranks[start : start + m]


def _inter(ranks: RankTuple, rank: int, m: int) -> RankTuple:
    return ranks[rank % m :: m]


def _shard_block(ranks: RankTuple, rank: int, q: int) -> RankTuple:
    start = rank // q * q  # blocks of q tile each expert's s ranks, as q divides s
    return ranks[start : start + q] if q > 1 else ()


def _subgroup_ranks(ranks: RankTuple, m: int, s: int) -> Iterator[RankTuple]:
    """Every subgroup of one expert group, in a fixed order (the same on every rank)."""
    w = len(ranks)
    if 1 < m < w:
        for start in range(0, w, m):
            yield _intra(ranks, start, m)
        for local in range(m):
            yield _inter(ranks, local, m)
    for r in divisors(s):
        q = s // r
        if q > 1:
            for start in range(0, w, q):
                yield _shard_block(ranks, start, q)


def _create_subgroups(
    group: ProcessGroup, ranks: RankTuple, m: int, shards: int
) -> dict[RankTuple, ProcessGroup]:
    """Create (collectively, over the world) the subgroups of every expert group; return
    the ones this rank belongs to, keyed by their global ranks."""
    layouts = _expert_group_layouts(ranks, m, shards)
    me = dist.get_rank()
    known: dict[RankTuple, ProcessGroup] = {ranks: group}
    seen = {layout[0] for layout in layouts}
    for members, lm, ls in layouts:
        for sub in _subgroup_ranks(members, lm, ls):
            if sub in seen:
                continue
            seen.add(sub)
            created = dist.new_group(list(sub))
            if me in sub:
                known[sub] = created
    return known


def _expert_group_layouts(ranks: RankTuple, m: int, shards: int) -> list[Layout]:
    """(global ranks, m, s) of every expert group of the world, in world-rank order."""
    if len(ranks) == dist.get_world_size():
        return [(ranks, m, shards)]
    gathered: list[Layout | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (ranks, m, shards))
    layouts: dict[RankTuple, Layout] = {}
    for world_rank, layout in enumerate(gathered):
        assert layout is not None  # filled by all_gather_object
        members = layout[0]
        if world_rank not in members or layouts.setdefault(members, layout) != layout:
            raise ValueError(
                f"build_mesh: the expert groups must partition the world and every member "
                f"must pass the same ranks_per_node and shards; world rank {world_rank} "
                f"passed {layout}, which conflicts with {layouts.get(members)}"
            )
    covered = sorted(r for members in layouts for r in members)
    if covered != list(range(dist.get_world_size())):
        raise ValueError(
            f"build_mesh: the expert groups {sorted(layouts)} must partition the world "
            f"ranks 0..{dist.get_world_size() - 1} (every rank calls build_mesh once)"
        )
    return list(layouts.values())

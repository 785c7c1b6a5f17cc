"""Tests of adaptive_moe.comm: mesh, linear / 2DH exchange (blocking and overlapped, with
gradients), parameter all-gather with reduce-scatter backward, count all-gather.

References are independent of the library: the exchange is checked against an
all-gather of every rank's send buffer sliced by the size matrix, and against the
(src, dst, index) tags written into every row; the gather against shards regenerated
from per-rank seeds. Exchanges are permutations, so every comparison is exact.
One spawned gloo run per world size (W = 2, 4, 8) carries all the distributed checks.
"""

from __future__ import annotations

import itertools
import time

import pytest
import torch
import torch.distributed as dist

from adaptive_moe.comm import (
    Mesh,
    all_gather_counts,
    all_gather_rows,
    build_mesh,
    exchange,
    exchange_start,
    plan_exchange,
)
from tests.dist_utils import run_distributed

CPU = torch.device("cpu")
REST = (2, 3)  # trailing row shape: 6 values, the first 3 are the (src, dst, index) tag


# --- helpers shared by the in-process and the distributed tests ---------------------


def size_cases(world: int, seed: int) -> list[list[list[int]]]:
    """Size matrices: random, with a rank that sends nothing and one that receives
    nothing, all zero, only self-sends, and one dominant chunk."""
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(0, 5, (world, world), generator=g)
    holes = torch.randint(0, 4, (world, world), generator=g)
    holes[0, :] = 0  # rank 0 sends nothing
    holes[:, world - 1] = 0  # the last rank receives nothing
    holes[1, world - 1 if world > 2 else 0] = 0
    one = torch.zeros(world, world, dtype=torch.int64)
    one[world - 1, 0] = 9
    return [
        m.tolist()
        for m in (rand, holes, torch.zeros_like(rand), torch.diag(torch.arange(1, world + 1)), one)
    ]


def tagged_send_buffer(sizes, rank: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """This rank's send buffer, chunks in destination order; row = (src, dst, i, noise)."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    chunks = []
    for dst, n in enumerate(sizes[rank]):
        row = torch.rand((n, 6), generator=g, dtype=torch.float64)
        row[:, 0], row[:, 1], row[:, 2] = rank, dst, torch.arange(n)
        chunks.append(row)
    return torch.cat(chunks).to(dtype).reshape(-1, *REST)  # [send rows, *REST]


def expected_tags(sizes, rank: int) -> torch.Tensor:
    """(src, dst, i) of every row this rank must receive, chunks in source order."""
    return torch.tensor(
        [(src, rank, i) for src in range(len(sizes)) for i in range(sizes[src][rank])],
        dtype=torch.float64,
    ).reshape(-1, 3)


def transpose(sizes):
    return [list(col) for col in zip(*sizes)]


# --- in-process tests ---------------------------------------------------------------


def fake_mesh(world: int, rank: int, m: int) -> Mesh:
    """A Mesh carrying only the numbers a plan reads (no process groups)."""
    return Mesh(
        None,
        world,
        rank,
        m,
        world // m,
        rank // m,
        rank % m,
        None,
        None,
        1,
        {1: None},
        tuple(range(world)),
    )


def axis_members(mesh: Mesh, axis: str) -> list[int]:
    m = mesh.ranks_per_node
    if axis == "intra":
        return [mesh.node * m + j for j in range(m)]
    if axis == "inter":
        return [n * m + mesh.local_rank for n in range(mesh.nodes)]
    return list(range(mesh.world))


def simulate(plans, meshes, xs):
    """Run every rank's route in one process, delivering each stage's split chunks to
    the peers of its axis group, as all_to_all_single would."""
    bufs = list(xs)
    for k in range(len(plans[0].route.stages)):
        stages = [p.route.stages[k] for p in plans]
        parts = []
        for buf, stage in zip(bufs, stages):
            send = buf if stage.order is None else buf[stage.order]
            parts.append(send.split(list(stage.send)))
        new = []
        for r, (stage, mesh) in enumerate(zip(stages, meshes)):
            peers = axis_members(mesh, stage.axis)
            got = [parts[p][peers.index(r)] for p in peers]
            assert [len(c) for c in got] == list(stage.recv)
            assert not stage.idle or all(sum(stages[p].send) == 0 for p in peers)
            new.append(torch.cat(got))
        bufs = new
    return bufs


@pytest.mark.parametrize("world,m", [(4, 2), (8, 2), (12, 3), (16, 4)])
@pytest.mark.parametrize("algo", ["linear", "2dh"])
def test_plan_routes_every_row_in_process(world, m, algo):
    for sizes in size_cases(world, seed=world * 10 + m):
        meshes = [fake_mesh(world, r, m) for r in range(world)]
        plans = [plan_exchange(torch.tensor(sizes), mesh, algo, CPU) for mesh in meshes]
        xs = [tagged_send_buffer(sizes, r, seed=1) for r in range(world)]
        outs = simulate(plans, meshes, xs)
        back = simulate([p.inverse() for p in plans], meshes, outs)
        for r in range(world):
            assert len(plans[r].route.stages) == (2 if algo == "2dh" else 1)
            assert torch.equal(outs[r].reshape(-1, 6)[:, :3], expected_tags(sizes, r))
            assert torch.equal(back[r], xs[r])
            assert plans[r].inverse().inverse().sizes == plans[r].sizes


def test_single_process_degenerates_to_identity():
    mesh = build_mesh(None, None, 1)
    assert (mesh.world, mesh.rank, mesh.nodes, mesh.intra, mesh.inter) == (1, 0, 1, None, None)
    assert dict(mesh.shard_blocks) == {1: None}
    for algo in ("linear", "2dh"):
        plan = plan_exchange([[5]], mesh, algo, CPU)
        x = torch.randn(5, 4, requires_grad=True)
        y = exchange(x, plan, mesh)
        assert y is x
        assert exchange_start(x, plan.inverse(), mesh).wait() is x
    shard = torch.randn(3, 2)
    assert all_gather_rows(shard, None) is shard
    counts = torch.tensor([1, 2, 3])
    assert torch.equal(all_gather_counts(counts, None), counts.unsqueeze(0))


def test_bad_input_raises_value_error():
    mesh = build_mesh(None, None, 1)
    with pytest.raises(ValueError, match="ranks_per_node"):
        build_mesh(None, 2, 1)
    with pytest.raises(ValueError, match="shards"):
        build_mesh(None, None, 2)
    four = fake_mesh(4, 1, 2)
    with pytest.raises(ValueError, match="4 x 4"):
        plan_exchange([[1, 2], [3, 4]], four, "linear", CPU)
    with pytest.raises(ValueError, match="non-negative"):
        plan_exchange([[0, -1, 0, 0]] + [[0] * 4] * 3, four, "2dh", CPU)
    with pytest.raises(ValueError, match="integers"):
        plan_exchange([[0.5, 0, 0, 0]] + [[0] * 4] * 3, four, "linear", CPU)
    with pytest.raises(ValueError, match="integers"):
        plan_exchange(torch.ones(4, 4), four, "linear", CPU)
    with pytest.raises(ValueError, match="4 x 4"):
        plan_exchange([[0, 0, 0, 0]] * 3 + [[0, 0]], four, "2dh", CPU)
    with pytest.raises(ValueError, match="algo"):
        plan_exchange([[1]], mesh, "ring", CPU)
    plan = plan_exchange([[3]], mesh, "linear", CPU)
    with pytest.raises(ValueError, match="3 rows"):
        exchange(torch.zeros(4, 2), plan, mesh)
    with pytest.raises(ValueError, match="rank 1 of 4"):
        exchange(torch.zeros(3, 2), plan, four)
    with pytest.raises(ValueError, match="integer"):
        all_gather_counts(torch.zeros(3), None)
    pending = exchange_start(torch.zeros(3, 2), plan, mesh)
    pending.wait()
    with pytest.raises(RuntimeError, match="already"):
        pending.wait()


# --- distributed checks (run inside the spawned ranks) ------------------------------


def reference_exchange(x: torch.Tensor, sizes, group) -> torch.Tensor:
    """All-gather every rank's (padded) send buffer and slice out the chunks for me."""
    world, me = len(sizes), dist.get_rank(group)
    rows = [sum(row) for row in sizes]
    buf = x.new_zeros((max(rows), *x.shape[1:]))
    buf[: len(x)] = x
    bufs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf, group=group)
    chunks = []
    for src in range(world):
        start = sum(sizes[src][:me])
        chunks.append(bufs[src][start : start + sizes[src][me]])
    return torch.cat(chunks)


def check_exchange(mesh: Mesh, sizes, algo: str, seed: int, dtype=torch.float64) -> None:
    """Forward vs reference and tags, exact inverse, gradient vs reference."""
    plan = plan_exchange(sizes, mesh, algo, CPU)
    x = tagged_send_buffer(sizes, mesh.rank, seed, dtype).requires_grad_(dtype.is_floating_point)
    out = exchange(x, plan, mesh)
    ref = reference_exchange(x.detach(), sizes, mesh.group)
    assert out.dtype == dtype and out.shape == (plan.recv_rows, *REST)
    assert torch.equal(out.detach(), ref), (algo, sizes)
    tags = out.detach().double().reshape(-1, 6)[:, :3]
    assert torch.equal(tags, expected_tags(sizes, mesh.rank)), (algo, sizes)
    assert torch.equal(exchange(out.detach(), plan.inverse(), mesh), x.detach())
    if not dtype.is_floating_point:
        return
    g = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(seed + mesh.rank), dtype=torch.float64
    ).to(dtype)
    (grad,) = torch.autograd.grad((out * g).sum(), x)
    assert torch.equal(grad, reference_exchange(g, transpose(sizes), mesh.group)), (algo, sizes)


def check_overlapped(mesh: Mesh, cases, algos, reverse_wait: bool, seed: int) -> None:
    """Several exchanges in flight at once (start all, then wait), outputs and gradients
    vs the blocking references; plans may mix algorithms."""
    plans = [plan_exchange(s, mesh, a, CPU) for s, a in zip(cases, algos)]
    xs = [tagged_send_buffer(s, mesh.rank, seed + i).requires_grad_() for i, s in enumerate(cases)]
    pending = [exchange_start(x, p, mesh) for x, p in zip(xs, plans)]
    order = range(len(plans))[::-1] if reverse_wait else range(len(plans))
    outs = {i: pending[i].wait() for i in order}
    gs = [
        torch.randn(
            outs[i].shape, generator=torch.Generator().manual_seed(seed + i), dtype=torch.float64
        )
        for i in range(len(plans))
    ]
    loss = sum((outs[i] * gs[i]).sum() for i in range(len(plans)))
    grads = torch.autograd.grad(loss, xs)
    for i, sizes in enumerate(cases):
        assert torch.equal(outs[i].detach(), reference_exchange(xs[i].detach(), sizes, mesh.group))
        assert torch.equal(grads[i], reference_exchange(gs[i], transpose(sizes), mesh.group))


def check_pipelined_chain(mesh: Mesh, sizes, algo: str, seed: int) -> None:
    """Degree-2 dispatch -> compute -> combine, overlapped, against the blocking chain:
    forward and gradient must be identical."""
    plan = plan_exchange(sizes, mesh, algo, CPU)
    w = torch.randn(REST, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    chunks = [tagged_send_buffer(sizes, mesh.rank, seed + i).requires_grad_() for i in range(2)]

    def blocking(x):
        return exchange(exchange(x, plan, mesh) * w, plan.inverse(), mesh)

    ref = [blocking(x) for x in chunks]
    ref_grads = torch.autograd.grad(sum((y**2).sum() for y in ref), chunks)
    starts = [exchange_start(x, plan, mesh) for x in chunks]
    combines = [exchange_start(p.wait() * w, plan.inverse(), mesh) for p in starts]
    ys = [p.wait() for p in combines]
    grads = torch.autograd.grad(sum((y**2).sum() for y in ys), chunks)
    for y, r, gr, rg in zip(ys, ref, grads, ref_grads):
        assert torch.equal(y, r) and torch.equal(gr, rg)


def check_start_does_not_block(mesh: Mesh, algo: str) -> None:
    """exchange_start returns while a peer has not even started; wait then blocks."""
    sizes = [[2] * mesh.world for _ in range(mesh.world)]
    plan = plan_exchange(sizes, mesh, algo, CPU)
    x = tagged_send_buffer(sizes, mesh.rank, seed=0)
    dist.barrier(group=mesh.group)
    if mesh.rank == mesh.world - 1:
        time.sleep(1.0)
    t0 = time.perf_counter()
    pending = exchange_start(x, plan, mesh)
    launched = time.perf_counter() - t0
    out = pending.wait()
    total = time.perf_counter() - t0
    assert torch.equal(out, reference_exchange(x, sizes, mesh.group))
    if mesh.rank == 0:
        assert launched < 0.5 and total > 0.8, (launched, total)


def check_gather(group, seed: int) -> None:
    """all_gather_rows forward / backward (reduce-scatter sum) and all_gather_counts vs
    shards regenerated from every member's global rank."""
    members = dist.get_process_group_ranks(group) if group is not None else [dist.get_rank()]
    me = dist.get_rank()

    def shard_of(r):
        return torch.randn(
            3, 4, generator=torch.Generator().manual_seed(seed + r), dtype=torch.float64
        )

    def weight_of(r):
        return torch.randn(
            3 * len(members),
            4,
            dtype=torch.float64,
            generator=torch.Generator().manual_seed(seed + 100 + r),
        )

    shard = shard_of(me).requires_grad_()
    full = all_gather_rows(shard, group)
    assert torch.equal(full.detach(), torch.cat([shard_of(r) for r in members]))
    (grad,) = torch.autograd.grad((full * weight_of(me)).sum(), shard)
    i = members.index(me)
    expected = sum(weight_of(r)[3 * i : 3 * i + 3] for r in members)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)  # fp64 sum order
    counts = torch.tensor([me, 10 * me, 7], dtype=torch.int64)
    stacked = all_gather_counts(counts, group)
    assert torch.equal(stacked, torch.tensor([[r, 10 * r, 7] for r in members]))


def ranks_of(group) -> list[int] | None:
    return None if group is None else dist.get_process_group_ranks(group)


SUITE_CHECKS = 2 * (5 + 3) + 3  # per algorithm: 5 size cases, 2 overlapped, 1 chain; + 3


def exchange_suite(mesh: Mesh, seed: int) -> int:
    """Every exchange check on one mesh; returns how many were run."""
    done = 0
    cases = size_cases(mesh.world, seed)
    for algo in ("linear", "2dh"):
        for i, sizes in enumerate(cases):
            check_exchange(mesh, sizes, algo, seed + i)
            done += 1
        check_overlapped(mesh, cases[:2], [algo, algo], reverse_wait=False, seed=seed)
        check_overlapped(mesh, cases[1:4], [algo] * 3, reverse_wait=True, seed=seed)
        check_pipelined_chain(mesh, cases[0], algo, seed)
        done += 3
    check_overlapped(mesh, cases[:2], ["linear", "2dh"], reverse_wait=False, seed=seed)
    check_exchange(mesh, cases[0], "2dh", seed, torch.bfloat16)
    check_exchange(mesh, cases[1], "2dh", seed, torch.int64)
    return done + 3


def worker_small(rank: int, world: int, default_m: int) -> int:
    """W = 2 and W = 4: exchanges for every ranks_per_node, gathers over shard blocks.
    ``default_m``: the ranks_per_node build_mesh must default to under the run's
    LOCAL_WORLD_SIZE."""
    done = 0
    for m in [d for d in (1, 2, 4) if world % d == 0]:
        mesh = build_mesh(dist.group.WORLD, m, world)
        assert (mesh.nodes, mesh.node, mesh.local_rank) == (world // m, rank // m, rank % m)
        done += exchange_suite(mesh, seed=100 * m)
    check_start_does_not_block(build_mesh(dist.group.WORLD, world // 2, 1), "2dh")
    mesh = build_mesh(dist.group.WORLD, None, world)
    assert mesh.ranks_per_node == default_m
    for r, block in mesh.shard_blocks.items():
        q = world // r
        want = None if q == 1 else list(range(rank // q * q, rank // q * q + q))
        assert ranks_of(block) == want
        check_gather(block, seed=r)
        done += 1
    check_gather(mesh.group, seed=99)
    return done + 1


def worker_eight(rank: int, world: int) -> int:
    """W = 8: mesh memberships, errors, 2-node and 4-node 2DH, strided subgroups."""
    for shards in (1, 2, 4, 8):
        mesh = build_mesh(dist.group.WORLD, 4, shards)
        node = list(range(rank // 4 * 4, rank // 4 * 4 + 4))
        assert (mesh.world, mesh.nodes, mesh.node, mesh.local_rank) == (8, 2, rank // 4, rank % 4)
        assert ranks_of(mesh.intra) == node
        assert ranks_of(mesh.inter) == [rank % 4, rank % 4 + 4]
        assert sorted(mesh.shard_blocks) == [r for r in (1, 2, 4, 8) if shards % r == 0]
        for r, block in mesh.shard_blocks.items():
            q = shards // r
            want = list(range(rank // q * q, rank // q * q + q)) if q > 1 else None
            assert ranks_of(block) == want, (shards, r)
    with pytest.raises(ValueError, match="ranks_per_node"):
        build_mesh(dist.group.WORLD, 3, 1)
    done = exchange_suite(build_mesh(dist.group.WORLD, 4, 1), seed=4)
    # Two interleaved expert groups of 4: group rank != global rank.
    groups = [dist.new_group([0, 2, 4, 6]), dist.new_group([1, 3, 5, 7])]
    mine = groups[rank % 2]
    mesh = build_mesh(mine, 2, 2)
    assert mesh.global_ranks == tuple(range(rank % 2, 8, 2)) and mesh.rank == rank // 2
    assert ranks_of(mesh.intra) == list(mesh.global_ranks[rank // 4 * 2 : rank // 4 * 2 + 2])
    assert ranks_of(mesh.inter) == list(mesh.global_ranks[mesh.local_rank :: 2])
    assert ranks_of(mesh.shard_blocks[1]) == ranks_of(mesh.intra)
    check_gather(mesh.shard_blocks[1], seed=5)
    return done + exchange_suite(mesh, seed=7)


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_comm_two_ranks():
    # LOCAL_WORLD_SIZE=3 does not divide 2: the default is one node of 2.
    done = run_distributed(worker_small, 2, (2,), timeout=110, env={"LOCAL_WORLD_SIZE": "3"})
    assert done == [2 * SUITE_CHECKS + 2 + 1] * 2  # m in {1, 2}; shard blocks r in {1, 2}


@pytest.mark.dist
@pytest.mark.timeout(150)
def test_comm_four_ranks():
    done = run_distributed(worker_small, 4, (2,), timeout=140, env={"LOCAL_WORLD_SIZE": "2"})
    assert done == [3 * SUITE_CHECKS + 3 + 1] * 4  # m in {1, 2, 4}; r in {1, 2, 4}


@pytest.mark.dist
@pytest.mark.timeout(250)
def test_comm_eight_ranks():
    done = run_distributed(worker_eight, 8, timeout=240)
    assert done == [2 * SUITE_CHECKS] * 8  # m = 4 on the world, m = 2 on a subgroup


def test_size_cases_cover_the_edge_cases():
    """The matrices the distributed tests use do contain the cases they claim to."""
    for world in (2, 4, 8):
        cases = size_cases(world, seed=3)
        assert sum(cases[1][0]) == 0
        assert all(row[world - 1] == 0 for row in cases[1])
        assert any(not any(itertools.chain(*c)) for c in cases)

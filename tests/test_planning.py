"""Tests of the scale planner's cost model pieces against what the executor runs.

References: the row matrices of every chunk come from ``runtime.dispatch.build_plan`` run
for each rank, the per-stage splits of linear and 2DH exchanges from
``comm.alltoall.plan_exchange`` (its route, forward and reverse), and the gathered
shard sizes from the ``Experts`` parameters of the ``ShardLayout``. All in one process:
planning needs no process group.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from adaptive_moe.comm.alltoall import plan_exchange
from adaptive_moe.comm.mesh import Mesh, divisors
from adaptive_moe.core.config import ExpertConfig
from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.core.strategy import DEGREES, Strategy
from adaptive_moe.planning.cost_model import (
    Cluster,
    LayerSpec,
    _pipeline,
    check_memory,
    cpu_overlap,
    dispatch_sizes,
    expert_rows,
    kernel_ms,
    measure_host_ms,
    plan_bytes,
    strategy_cost,
    weight_gathers,
    workload_counts,
    workload_runs,
)
from adaptive_moe.planning.grouped import Runs
from adaptive_moe.planning.kernel_profile import KernelProfile, measure_kernel_profile, roofline
from adaptive_moe.planning.links import PRESETS, Link, LinkModel, fit_links
from adaptive_moe.planning.planner import candidate_strategies, plan_table
from adaptive_moe.planning.plot import plot_scaling, scaling_curves
from adaptive_moe.planning.reference import exchange_seconds, exchange_stages
from adaptive_moe.runtime.dispatch.plan import build_plan
from adaptive_moe.runtime.experts.stacked import Experts
from adaptive_moe.tuning.table import StrategyTable

CPU = torch.device("cpu")
# (W, E): s = 1 with several experts per rank, and s = W / E > 1
CASES = [(2, 4), (2, 2), (4, 8), (4, 2), (4, 1), (8, 16), (8, 4), (8, 2)]


def _mesh(world: int, rank: int, m: int) -> Mesh:
    """The fields plan_exchange reads; no process group is needed to plan."""
    return Mesh(None, world, rank, m, world // m, rank // m, rank % m, None, None, 1, {}, ())


def _random_counts(world: int, experts: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    counts = g.integers(0, 13, size=(world, experts))
    counts[0, :] = 0  # a rank that routes nothing
    counts[:, -1] = 0  # an expert nobody picks
    return counts


@pytest.mark.parametrize(("world", "experts"), CASES)
def test_dispatch_sizes_equal_build_plan_on_every_rank(world, experts):
    counts = _random_counts(world, experts, seed=world * 31 + experts)
    for r in ShardLayout(world, 0, experts, 64).valid_r()[1:]:
        for degree in DEGREES:
            ours = list(dispatch_sizes(counts, ShardLayout(world, 0, experts, 64), r, degree))
            per_expert = expert_rows(counts, ShardLayout(world, 0, experts, 64), r, degree)
            for rank in range(world):
                plan = build_plan(counts.tolist(), ShardLayout(world, rank, experts, 64), r, degree)
                assert len(plan) == len(ours) == degree
                for chunk, sizes, rows in zip(plan, ours, per_expert):
                    assert chunk.sizes == tuple(map(tuple, sizes.tolist())), (r, degree, rank)
                    # what this rank computes on: its received rows per local expert
                    assert chunk.recv_counts == tuple(rows[rank].tolist())
                    assert sum(chunk.recv_counts) == int(sizes[:, rank].sum())


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("algo", ["linear", "2dh"])
def test_exchange_stages_equal_plan_exchange_routes(world, algo):
    g = np.random.default_rng(world)
    sizes = g.integers(0, 6, size=(world, world))
    sizes[1, :] = 0
    for m in divisors(world):
        for mat in (sizes, sizes.T.copy(), np.zeros_like(sizes)):
            ours = exchange_stages(mat, m, algo)
            back = exchange_stages(mat.T, m, algo)
            for rank in range(world):
                plan = plan_exchange(mat, _mesh(world, rank, m), algo, CPU)
                for route, stages in ((plan.route, ours), (plan.reverse, back)):
                    assert [s.axis for s in route.stages] == [s.axis for s in stages]
                    for theirs, mine in zip(route.stages, stages):
                        assert theirs.send == tuple(mine.send[rank].tolist()), (m, rank)
                        assert theirs.recv == tuple(mine.recv[rank].tolist()), (m, rank)
                        if theirs.idle:  # nobody in this rank's axis group moves a row
                            assert not mine.send[rank].any() and not mine.recv[rank].any()
                assert plan.send_rows == int(mat[rank].sum())


@pytest.mark.parametrize(("world", "experts"), CASES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("glu", [False, True])
def test_weight_gathers_are_the_layout_shards(world, experts, bias, glu):
    d, h = 8, 16
    layout = ShardLayout(world, 0, experts, h)
    params = dict(
        Experts(ExpertConfig(d, h, experts, glu, "silu", bias), layout).named_parameters()
    )
    nbytes = {k: v.numel() * v.element_size() for k, v in params.items()}
    w1 = "gate_up_proj" if glu else "up_proj"
    layer = LayerSpec(d, h, experts, 1, glu=glu, bias=bias, dtype="float32")
    for m in divisors(world):
        cluster = Cluster(world, m, PRESETS["a100-ndv4"])
        for r in layout.valid_r():
            got = {g.name: g for g in weight_gathers(layer, cluster, r)}
            want: dict[str, tuple[int, int]] = {}
            q = world if r == 0 else layout.shards // r
            if world > 1 and q > 1:  # Executor._all_expert_weights / _block_weights
                want["w1"] = (nbytes[w1], q)
                want["down_proj"] = (nbytes["down_proj"], q)
                if bias:
                    want["b1"] = (nbytes[w1 + "_bias"], q)
            if bias and world > 1:  # Executor._full_down_bias, every strategy
                want["down_proj_bias"] = (nbytes["down_proj_bias"], world)
            assert {k: (g.shard_bytes, g.ranks) for k, g in got.items()} == want, (m, r)
            for g in got.values():
                if g.name != "down_proj_bias" and r >= 1:
                    # a shard block of q consecutive ranks (Mesh.shard_blocks)
                    blocks = [range(b, b + q) for b in range(0, world, q)]
                    one_node = all(len({i // m for i in blk}) == 1 for blk in blocks)
                    assert g.level == ("intra" if one_node else "inter")


def test_workload_counts_hit_the_bucket_workload():
    counts = workload_counts(8, 16, 2, 64, 300)
    assert counts.shape == (8, 16)
    assert counts.sum() == 8 * 64 * 2
    assert counts.sum(0).max() == 300 == counts.sum(0)[0]
    assert counts.sum(0)[1:].max() - counts.sum(0)[1:].min() <= 1
    with pytest.raises(ValueError, match="max_tokens must be in"):
        workload_counts(8, 16, 2, 64, 8 * 64 + 1)


def test_pipeline_schedule_by_hand():
    # dispatch 2,2 ; compute 3,3 ; return 1,1 (all started: no in-line part).
    # Queue: D1 0-2, D2 2-4; C1 2-5, R1 max(4, 5) = 5-6; C2 5-8, R2 8-9.
    assert _pipeline([(2, 0), (2, 0)], [3, 3], [(1, 0), (1, 0)]) == 9
    # one chunk: nothing overlaps
    assert _pipeline([(2, 0)], [3], [(1, 0)]) == 6
    # 2DH's in-line second stage runs on the compute side: D1 0-2, its rest 2-3, C1 3-6,
    # R1 started 6-7, its rest 7-7.5
    assert _pipeline([(2, 1)], [3], [(1, 0.5)]) == 7.5
    # with two chunks the in-line parts cannot hide behind the other chunk's compute:
    # D1 0-2, D2 2-4; rest+C1 2-6, R1 6-7; rest+C2 6-10, R2 10-11; R1's rest 10-10.5,
    # R2's 11-11.5
    assert _pipeline([(2, 1), (2, 1)], [3, 3], [(1, 0.5), (1, 0.5)]) == 11.5


def _tiny_compute():
    return roofline("a100", d_model=64, glu=True, dtype="float32")


def test_strategy_cost_uses_build_plan_sizes_and_hides_with_degree():
    layer = LayerSpec(64, 128, 4, 2, dtype="float32")
    cluster = Cluster(8, 2, PRESETS["a100-ndv4"])
    counts = workload_counts(8, 4, 2, 256, 1500)
    s = Strategy(1, "2dh", 4, "bmm")
    default = strategy_cost(layer, cluster, _tiny_compute(), s, counts)
    plan = build_plan(counts.tolist(), layer.layout(8), 1, 4)
    given = [np.array(c.sizes) for c in plan]
    same = strategy_cost(layer, cluster, _tiny_compute(), s, counts, chunk_sizes=given)
    for field in ("compute_ms", "a2a_ms", "gather_ms", "hidden_ms", "total_ms"):
        assert math.isclose(getattr(same, field), getattr(default, field), rel_tol=1e-12)
    assert default.hidden_ms > 0
    assert math.isclose(
        default.total_ms,
        default.compute_ms + default.a2a_ms + default.gather_ms - default.hidden_ms,
    )
    # degree 1 hides nothing; a measured (CPU) profile is pipelined alike
    cpu = KernelProfile(
        "cpu",
        "float32",
        64,
        True,
        "silu",
        "2.13",
        "2026-12-01",
        ("bmm",),
        (64, 128),
        (1, 2),
        (1, 1024),
        {"bmm": [[[1.0, 2.0]] * 2] * 2},
    )
    one = strategy_cost(layer, cluster, cpu, Strategy(1, "2dh", 1, "bmm"), counts)
    assert one.hidden_ms == 0 and one.total_ms > 0
    assert strategy_cost(layer, cluster, cpu, s, counts).hidden_ms > 0
    # CPU ranks without a spare core hide nothing: 8 ranks on 2 cores
    busy = Cluster(8, 2, PRESETS["a100-ndv4"], backend="gloo", overlap=cpu_overlap(8, 2))
    flat = strategy_cost(layer, busy, cpu, s, counts)
    assert flat.hidden_ms == 0 and math.isclose(
        flat.total_ms, flat.compute_ms + flat.a2a_ms + flat.gather_ms
    )
    assert cpu_overlap(2, 8) == 1.0 and cpu_overlap(4, 6) == 0.5
    with pytest.raises(ValueError, match="overlap must be"):
        Cluster(8, 2, PRESETS["a100-ndv4"], overlap=1.5)
    with pytest.raises(ValueError, match="r must be one of"):
        strategy_cost(layer, cluster, cpu, Strategy(3, "linear", 1, "bmm"), counts)


def test_2dh_moves_the_same_bytes_in_fewer_inter_messages():
    # equal splits: 2dh's inter stage carries m-fold larger messages to N-1 peers
    w, m = 32, 8
    sizes = np.full((w, w), 10)
    lin = exchange_stages(sizes, m, "linear")[0]
    two = exchange_stages(sizes, m, "2dh")
    assert two[1].send.sum(1).tolist() == [w * 10] * w
    assert (two[1].send[0] > 0).sum() == w // m and (lin.send[0] > 0).sum() == w
    free = LinkModel(Link(0.0, 10.0), Link(5.0, 1e9), call_us=0.0, copy_GBps=1e9)
    # with latency only on the inter level, 2dh pays 3 inter messages instead of 24
    t_lin = exchange_seconds(sizes, m, free, "linear", 1)
    t_2dh = exchange_seconds(sizes, m, free, "2dh", 1)
    assert math.isclose(t_lin, 24 * 5e-6 + 7 * 10 / 10e9, rel_tol=1e-6)
    assert math.isclose(t_2dh, 7 * 10 * 4 / 10e9 + 3 * 5e-6, rel_tol=1e-6)


def test_posted_messages_overlap_their_latency():
    # one all_to_all_single posts its 24 inter messages at once: the last leaves 23
    # issue intervals after the first and lands alpha later (issue None: in series)
    w, m = 32, 8
    sizes = np.full((w, w), 10)
    posted = LinkModel(Link(0.0, 10.0), Link(5.0, 1e9, 0.5), call_us=0.0, copy_GBps=1e9)
    t_lin = exchange_seconds(sizes, m, posted, "linear", 1)
    assert math.isclose(t_lin, (5 + 23 * 0.5) * 1e-6 + 7 * 10 / 10e9, rel_tol=1e-6)
    assert LinkModel.from_dict(posted.to_dict()) == posted
    assert Link(3.0, 1.0).posted_seconds(np.array([0, 1, 4])).tolist() == [0.0, 3e-6, 12e-6]
    with pytest.raises(ValueError, match="issue_us"):
        Link(3.0, 1.0, -1.0)


# ---- kernel profile and links -------------------------------------------------------------


def _synthetic_profile() -> KernelProfile:
    hidden, experts, rows = (16, 64), (1, 4), (1, 8, 64)
    f = lambda h, n, r: 0.01 + 1e-4 * h * n * r
    grid = [[[f(h, n, r) for r in rows] for n in experts] for h in hidden]
    grid[1][1] = grid[1][1][:2]  # the largest point was skipped
    return KernelProfile(
        "cpu",
        "float32",
        32,
        True,
        "silu",
        "2.13",
        "2026-12-01",
        ("bmm",),
        hidden,
        experts,
        rows,
        {"bmm": grid},
    )


def test_kernel_profile_interpolates_and_extrapolates(tmp_path):
    p = _synthetic_profile()
    f = lambda h, n, r: 0.01 + 1e-4 * h * n * r
    assert math.isclose(p.time_ms("bmm", 4, 8, 16), f(16, 4, 8))  # a grid point
    mid = p.time_ms("bmm", 1, 20, 16)
    assert f(16, 1, 8) < mid < f(16, 1, 64)  # between its neighbours
    assert math.isclose(p.time_ms("bmm", 1, 128, 16), 2 * f(16, 1, 64))  # proportional
    assert math.isclose(p.time_ms("bmm", 4, 64, 64), 8 * f(64, 4, 8))  # from the ragged end
    assert math.isclose(p.time_ms("bmm", 1, 0, 16), f(16, 1, 1))  # floor
    p.save(tmp_path / "k.json")
    assert KernelProfile.load(tmp_path / "k.json") == p
    with pytest.raises(ValueError, match="not in this profile"):
        p.time_ms("loop", 1, 1, 16)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(ValueError, match="not a kernel profile"):
        KernelProfile.load(tmp_path / "bad.json")


@pytest.mark.timeout(60)
def test_measure_kernel_profile_tiny_on_cpu():
    p = measure_kernel_profile(
        16, [8, 16], [1, 2], [1, 4], kernels=["loop", "bmm"], warmup=0, repeats=1, progress=False
    )
    assert p.device == "cpu" and p.kernels == ("loop", "bmm")
    assert all(t > 0 for k in p.kernels for g in p.times_ms[k] for row in g for t in row)
    with pytest.raises(ValueError, match="kernels must be"):
        measure_kernel_profile(16, [8], [1], [1], kernels=["nope"], progress=False)


def test_fit_links_recovers_the_figures(tmp_path):
    truth = {"intra": Link(4.0, 20.0), "inter": Link(9.0, 3.0)}
    call = 30e-6
    paths = []
    for w, m in ((2, 2), (4, 4), (8, 8), (4, 1), (8, 1)):
        level = "intra" if m == w else "inter"
        peers = w - 1 if level == "intra" else w - m
        res = []
        for nbytes in (1 << 12, 1 << 16, 1 << 20):
            t = call + truth[level].seconds(peers, nbytes * peers / w)
            res.append({"bytes": nbytes, "method": "linear", "time_us": t * 1e6})
        path = tmp_path / f"a2a-{w}-{m}.json"
        path.write_text(json.dumps({"meta": {"world": w, "ranks_per_node": m}, "results": res}))
        paths.append(path)
    fit = fit_links(paths)
    for level in ("intra", "inter"):
        got, want = getattr(fit, level), truth[level]
        assert math.isclose(got.alpha_us, want.alpha_us, rel_tol=1e-6)
        assert math.isclose(got.bandwidth_GBps, want.bandwidth_GBps, rel_tol=1e-6)
    assert math.isclose(fit.call_us, 30.0, rel_tol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        fit_links([])
    (tmp_path / "junk.json").write_text("[]")
    with pytest.raises(ValueError, match="expected"):
        fit_links([tmp_path / "junk.json"])


def test_fit_links_one_level_uses_linear_and_2dh_rows(tmp_path):
    link, call, copy = Link(40.0, 0.5), 200e-6, 5.0
    paths = []
    for w, m in ((4, 2), (8, 2)):
        n, res = w // m, []
        for nbytes in (1 << 14, 1 << 18, 1 << 22):
            t_lin = call + link.seconds(w - 1, nbytes * (w - 1) / w)
            moved = nbytes * (m - 1) / m + nbytes * (n - 1) / n
            t_2dh = 2 * call + link.seconds(m - 1 + n - 1, moved) + 4 * nbytes / (copy * 1e9)
            res += [
                {"bytes": nbytes, "method": "linear", "time_us": t_lin * 1e6},
                {"bytes": nbytes, "method": "2dh", "time_us": t_2dh * 1e6},
            ]
        path = tmp_path / f"a2a-{w}.json"
        path.write_text(json.dumps({"meta": {"world": w, "ranks_per_node": m}, "results": res}))
        paths.append(path)
    fit = fit_links(paths, copy_GBps=copy, one_level=True)
    assert fit.intra == fit.inter
    assert math.isclose(fit.intra.alpha_us, 40.0, rel_tol=1e-6)
    assert math.isclose(fit.intra.bandwidth_GBps, 0.5, rel_tol=1e-6)
    assert math.isclose(fit.call_us, 200.0, rel_tol=1e-6)


def test_fit_links_fits_the_ring_step_to_timed_all_gathers():
    link, call, step = Link(40.0, 0.5), 200e-6, 900e-6

    def linear(w, nbytes):
        t = call + link.seconds(w - 1, nbytes * (w - 1) / w)
        return {"bytes": nbytes, "method": "linear", "time_us": t * 1e6}

    def gather(w, shard):  # W - 1 dependent steps of one shard each
        t = call + (w - 1) * (step + shard / (link.bandwidth_GBps * 1e9))
        return {"bytes": shard, "method": "allgather", "time_us": t * 1e6}

    sizes = (1 << 14, 1 << 18, 1 << 22)
    meta8, meta4 = {"world": 8, "ranks_per_node": 8}, {"world": 4, "ranks_per_node": 4}
    four = {"meta": meta4, "results": [linear(4, b) for b in sizes]}  # separates the call
    eight = [linear(8, b) for b in sizes]
    fit = fit_links([four, {"meta": meta8, "results": eight + [gather(8, b // 8) for b in sizes]}])
    assert math.isclose(fit.call_us, 200.0, rel_tol=1e-6)
    assert math.isclose(fit.intra.alpha_us, 40.0, rel_tol=1e-6)
    assert math.isclose(fit.step_us, 900.0, rel_tol=1e-6)
    # without timed all-gathers a ring step costs the alpha, as before
    plain = fit_links([four, {"meta": meta8, "results": eight}])
    assert plain.step_us is None and plain.intra == fit.intra
    assert LinkModel.from_dict(fit.to_dict()) == fit
    assert (
        LinkModel.from_dict({k: v for k, v in plain.to_dict().items() if k != "step_us"}) == plain
    )


def test_a_ring_gather_pays_the_fitted_step_per_hop():
    layer = LayerSpec(16, 32, 4, 2, dtype="float32")
    links = LinkModel(Link(3.0, 2.0), Link(7.0, 1.0), call_us=50.0, copy_GBps=10.0)
    stepped = dataclasses.replace(links, step_us=400.0)
    for world, m in ((8, 8), (8, 2)):
        cluster = Cluster(world, m, links)
        for g in weight_gathers(layer, cluster, 0):  # r = 0: every expert over all W ranks
            bw = (links.inter if g.level == "inter" else links.intra).bandwidth_GBps * 1e9
            alpha = (links.inter if g.level == "inter" else links.intra).alpha_us
            hops = world - 1
            assert math.isclose(
                g.seconds(links), 50e-6 + hops * (alpha * 1e-6 + g.shard_bytes / bw)
            )
            assert math.isclose(g.seconds(stepped), 50e-6 + hops * (400e-6 + g.shard_bytes / bw))
    # the exchanges do not use it: all-to-all messages are posted at once
    counts = workload_counts(8, 4, 2, 32, 192)
    s = Strategy(1, "linear", 2, "bmm")
    prof = roofline("a100", 16, dtype="float32")
    cluster, other = Cluster(8, 2, links), Cluster(8, 2, stepped)
    a = strategy_cost(layer, cluster, prof, s, counts)
    b = strategy_cost(layer, other, prof, s, counts)
    assert a.a2a_ms == b.a2a_ms and a.compute_ms == b.compute_ms and b.gather_ms > a.gather_ms


def test_host_planning_time_is_added_in_line():
    layer = LayerSpec(16, 32, 4, 2, dtype="float32")
    cluster = Cluster(4, 2, PRESETS["a100-ndv4"])
    counts = workload_counts(4, 4, 2, 32, 64)
    s = Strategy(1, "2dh", 2, "bmm")
    host = measure_host_ms(layer, cluster, counts, s, repeats=1)
    assert host > 0 and measure_host_ms(layer, cluster, counts, Strategy(0), repeats=1) == 0
    base = strategy_cost(layer, cluster, _tiny_compute(), s, counts)
    more = strategy_cost(layer, cluster, _tiny_compute(), s, counts, host_ms=host)
    assert math.isclose(more.total_ms - base.total_ms, host) and more.host_ms == host


def test_predicted_table_round_trips_and_shipped_v1_tables_still_load(tmp_path):
    layer = LayerSpec(64, 128, 8, 2)
    table = plan_table(
        layer,
        Cluster(16, 8, PRESETS["h100-ndr"]),
        roofline("h100", 64),
        64,
        num_buckets=2,
        progress=False,
    )
    assert table.predicted["model"].startswith("adaptive_moe.planning")
    table.save(tmp_path / "p.msgpack")
    back = StrategyTable.load(tmp_path / "p.msgpack")
    assert back == table and back.predicted == table.predicted
    shipped = sorted((Path(__file__).parents[1] / "profiles").glob("*.msgpack"))
    v1 = [p for p in shipped if msgpack.unpackb(p.read_bytes())["version"] == 1]
    assert v1 and all(StrategyTable.load(p).predicted is None for p in v1)
    predicted = sorted((Path(__file__).parents[1] / "profiles" / "predicted").glob("*.msgpack"))
    assert predicted and all(StrategyTable.load(p).predicted for p in predicted)
    with pytest.raises(ValueError, match="plain data"):
        StrategyTable(table.fingerprint, table.shape, predicted={"x": object()})


def test_uneven_experts_cost_as_each_kernel_runs_them():
    f = lambda n, r: 1.0 + 0.01 * n * r  # time of n experts of r rows each
    rows = (1, 8, 64)
    grid = [[[f(n, r) for r in rows] for n in (2,)]]
    p = KernelProfile(
        "cpu",
        "float32",
        8,
        True,
        "silu",
        "2.13",
        "2026-12-01",
        ("loop", "bmm", "scatter"),
        (16,),
        (2,),
        rows,
        {k: grid for k in ("loop", "bmm", "scatter")},
    )
    uneven = np.array([8, 64])
    assert math.isclose(kernel_ms(p, "bmm", uneven, 16), f(2, 64))  # padded to the largest
    assert math.isclose(kernel_ms(p, "loop", uneven, 16), (f(2, 8) + f(2, 64)) / 2)
    assert f(2, 8) < kernel_ms(p, "scatter", uneven, 16) < f(2, 64)  # at the mean, 36 rows


def test_scaling_curves_families_and_skipped_worlds(tmp_path):
    layer = LayerSpec(64, 128, 4, 2)
    curves, skipped = scaling_curves(
        layer,
        lambda w: Cluster(w, min(2, w), PRESETS["a100-ndv4"]),
        roofline("a100", 64),
        [2, 3, 8],
        64,
        progress=False,
    )
    assert skipped == [3]
    assert {
        "r=0 (DP)",
        "r=1 (EP+DP) linear",
        "r=1 (EP+DP) 2dh",
        "r=s (EP+MP) linear",
        "best",
    } <= set(curves)
    assert set(curves["best"]) == {2, 8} and set(curves["r=s (EP+MP) linear"]) == {8}
    for w, (_, ms) in curves["best"].items():  # the best is the minimum of every family
        assert ms == min(line[w][1] for line in curves.values() if w in line)
    plot_scaling(curves, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="at least one curve"):
        plot_scaling({}, tmp_path / "empty.png")


# ---- the rank-class evaluation against the dense reference ---------------------------------


@pytest.mark.parametrize(
    ("world", "experts", "m"),
    [
        (8, 4, 2),
        (8, 16, 4),
        (16, 4, 4),
        (16, 64, 4),
        (12, 6, 3),
        (32, 8, 8),
        (16, 16, 2),
        (8, 2, 8),
    ],
)
def test_rank_classes_equal_the_dense_reference(world, experts, m):
    """strategy_cost on rank classes (the planner's path) against the dense [W, W]
    matrices of ``reference`` (``chunk_sizes``): every strategy (linear and 2DH, every
    degree, r), balanced and skewed synthetic workloads (runs cut inside nodes) and
    random counts (every rank its own run), to 1e-12."""
    layer = LayerSpec(64, 128, experts, 2, dtype="float32")
    links = PRESETS["a100-ndv4"]
    posted = dataclasses.replace(links, inter=Link(3.0, 25.0, 0.5), intra=Link(2.0, 300.0, 0.25))
    tokens = 16
    balanced = -(-world * tokens * 2 // experts)
    workloads = [workload_counts(world, experts, 2, tokens, x) for x in (balanced, world * tokens)]
    workloads.append(_random_counts(world, experts, seed=world + experts))
    for counts, cluster in itertools.product(
        workloads, [Cluster(world, m, links), Cluster(world, m, posted)]
    ):
        for s in candidate_strategies(layer, cluster, ("scatter", "bmm", "loop")):
            if s.r == 0:
                continue
            fast = strategy_cost(layer, cluster, _tiny_compute(), s, counts)
            chunks = list(dispatch_sizes(counts, layer.layout(world), s.r, s.degree))
            ref = strategy_cost(layer, cluster, _tiny_compute(), s, counts, chunk_sizes=chunks)
            for field in ("compute_ms", "a2a_ms", "hidden_ms", "total_ms"):
                want = getattr(ref, field)
                assert math.isclose(getattr(fast, field), want, rel_tol=1e-12), (s, field)
            assert fast.a2a_ms > 0


def test_workload_runs_are_the_dense_workload_and_memory_is_checked():
    for world, experts, x in ((16, 4, 200), (16, 64, 40), (7, 3, 90)):
        runs = workload_runs(world, experts, 2, 16, x)
        assert len(runs.rows) <= 4
        np.testing.assert_array_equal(runs.dense(), workload_counts(world, experts, 2, 16, x))
        np.testing.assert_array_equal(Runs.of(runs.dense()).dense(), runs.dense())
    layer = LayerSpec(2048, 1024, 1 << 20, 8)
    need = plan_bytes(layer, 1 << 20, 8)
    with pytest.raises(ValueError, match=r"needs about .* GiB, more than"):
        check_memory(need, need - 1, "planning")
    check_memory(need, need, "planning")

"""The dispatcher contract's pieces on one process: the host batch, the sync-free expert
counts, the dispatch plan's host-side grouping, and the phases run one by one against the
layer's forward."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import adaptive_moe as am
from adaptive_moe.comm.order import CollectiveOrder
from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.core.transfer import HostBatch
from adaptive_moe.runtime.dispatch.dispatcher import Dispatcher
from adaptive_moe.runtime.dispatch.plan import build_plan
from adaptive_moe.runtime.experts.grouping import expert_counts
from adaptive_moe.runtime.routing.router import Routing


def test_host_batch_views_hold_each_array():
    batch = HostBatch()
    parts = [[3, 1, 2], [], np.arange(5), (7,)]
    ids = [batch.add(p) for p in parts]
    views = batch.upload(torch.device("cpu"))
    assert len(views) == len(parts)
    for i, p in zip(ids, parts):
        assert views[i].dtype == torch.int64
        assert views[i].tolist() == list(np.asarray(p, dtype=np.int64))
    assert HostBatch().upload(torch.device("cpu")) == ()


@pytest.mark.parametrize("shape", [(0,), (17,), (9, 3)])
def test_expert_counts_match_bincount(shape):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 6, shape, generator=gen)
    flat = ids.flatten()
    expected = torch.bincount(flat[flat >= 0], minlength=6)
    assert torch.equal(expert_counts(ids, 6), expected)


def test_plan_groups_received_rows_like_a_device_sort():
    """The host-side grouping of the received rows is the stable sort by local expert
    the executor used to run on the device for every chunk."""
    rng = np.random.default_rng(0)
    layout = ShardLayout(world=4, rank=1, num_experts=8, d_ff=16)
    counts = rng.integers(0, 5, size=(4, 8)).tolist()
    for degree in (1, 2, 4):
        chunks = build_plan(counts, layout, 1, degree)
        received = sum(int(c.recv_expert.size) for c in chunks)
        assert received == sum(counts[src][e] for src in range(4) for e in (2, 3))
        for c in chunks:
            by_sort = torch.sort(torch.from_numpy(c.recv_expert), stable=True).indices
            assert c.recv_grouped.tolist() == by_sort.tolist()
            assert list(c.recv_counts) == np.bincount(c.recv_expert, minlength=2).tolist()


def test_phases_one_by_one_are_the_layer_forward():
    torch.manual_seed(0)
    layer = am.MoELayer(16, 24, 4, 2, bias=True, capacity_factor=1.0)
    x = torch.randn(11, 16)
    strategy = layer.default_strategy
    y = layer(x, strategy=strategy)

    dispatcher: Dispatcher = layer.executor.dispatcher(strategy)
    routing: Routing = layer.router(x)
    counts = dispatcher.exchange_counts(routing.kept_counts(4), routing.counts)
    assert counts.max_tokens == layer.last_max_tokens
    assert torch.equal(counts.demand, routing.counts)
    assert counts.demand_total == int(routing.counts.sum())
    order = CollectiveOrder(x.device)
    plan = dispatcher.plan(routing.topk_ids, counts, strategy)
    dispatched = dispatcher.dispatch(x, plan, layer.experts, order)
    computed = dispatcher.experts(dispatched, plan, order)
    y_phases = dispatcher.combine(computed, plan, routing.gates, order)
    torch.testing.assert_close(y_phases, y, rtol=0, atol=0)


def _count_weight_casts(rank: int, world: int) -> tuple[int, int, float]:
    """(casts of w1's shape with degree 1, with degree 4, max |y4 - y1|) under CPU
    autocast on this rank: the exchange path, chunked."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.n = shape, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == self.shape:
                self.n += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    layer = am.MoELayer(16, 24, 4, 2, bias=True, process_group=torch.distributed.group.WORLD)
    x = torch.randn(40, 16)
    out, casts = [], []
    for degree in (1, 4):
        strategy = am.Strategy(1, "linear", degree, "loop")
        mode = Casts(tuple(layer.experts.w1.shape))
        with torch.autocast("cpu", dtype=torch.bfloat16), mode:
            y = layer(x, strategy=strategy)
        y.float().sum().backward()
        out.append(y.detach().float())
        casts.append(mode.n)
    return casts[0], casts[1], float((out[1] - out[0]).abs().max())


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_pipelined_chunks_cast_the_weights_once_per_forward():
    """Under autocast the fp32 masters are cast to bf16 once per forward, however many
    chunks the strategy pipelines (it was once per chunk); the chunks' result is the
    unchunked one (the same bf16 weights, rows computed alike)."""
    from tests.dist_utils import run_distributed

    for one, four, diff in run_distributed(_count_weight_casts, 2):
        assert one == 1 and four == 1
        assert diff <= 1e-2  # bf16 rounding of rows computed in other groupings


def _one_rank_runs(rank: int, world: int) -> tuple[list[str], list[str], list[float]]:
    """(strategies whose forward ran other ops than the default's, profiled strategies,
    max |y_s - y_default| over every strategy) on a one-rank group."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from adaptive_moe.profiling.profiler import plan_sweep

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    def run(strategy):
        mode = Ops()
        with mode:
            y = layer(x, strategy=strategy)
        y.sum().backward()
        return y.detach(), mode.ops

    torch.manual_seed(0)
    layer = am.MoELayer(16, 24, 4, 2, process_group=torch.distributed.group.WORLD)
    x = torch.randn(40, 16)
    differ, diffs = [], []
    for strategy in layer.strategies():
        like = dataclasses.replace(strategy, r=1, a2a="linear", degree=1)
        (y, ops), (want, want_ops) = run(strategy), run(like)
        if ops != want_ops:
            differ.append(str(strategy))
        diffs.append(float((y - want).abs().max()))
    profiled = [str(s) for s in plan_sweep(layer, 40, num_buckets=1).strategies]
    return differ, profiled, diffs


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_one_rank_group_runs_every_strategy_locally_and_profiles_kernels_only():
    """A one-rank group (torchrun --nproc-per-node 1) keeps every strategy valid, but
    runs each as its kernel's (r=1, linear, d=1) strategy: the same ops, no chunks; the
    profiler measures one strategy per kernel, since the others are the same run."""
    from tests.dist_utils import run_distributed

    [(differ, profiled, diffs)] = run_distributed(_one_rank_runs, 1)
    assert differ == []
    assert profiled and all(s.startswith("r=1,linear,d=1,") for s in profiled)
    assert len(set(profiled)) == len(profiled)
    assert max(diffs) == 0.0

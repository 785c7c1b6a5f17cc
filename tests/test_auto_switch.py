"""Automatic switching: with a synthetic table the layer runs exactly the strategy the
table names for each workload bucket, on every rank alike; exploration re-measures the
top candidates and updates the table identically on every rank."""

from __future__ import annotations

import pytest
import torch

import adaptive_moe as am
from adaptive_moe.tuning.online import Exploration
from adaptive_moe.tuning.table import Measurement, StrategyTable
from tests.dist_utils import run_distributed

D, H, E, T = 8, 16, 4, 16
HOW = Measurement(
    repeats=1,
    warmup=0,
    timer="perf_counter",
    tokens_per_rank=T,
    max_tokens=1,
    skew=1.0,
    date="2026-11-23T00:00:00Z",
)


def _synthetic_table(layer):
    """Each bucket's best is a different strategy (chosen by the bucket key)."""
    table = StrategyTable(layer.fingerprint(), layer.layer_shape())
    strategies = [s for s in layer.strategies() if s.kernel == "loop"]
    for key in range(0, 12):
        best = strategies[key % len(strategies)]
        times = {s: 2.0 + i for i, s in enumerate(strategies) if s != best}
        times[best] = 1.0
        table.add_bucket(key, times, HOW)
    return table


def _skewed_input(rank, hot_fraction, layer):
    """Tokens whose 1st choice is expert 0 with probability ``hot_fraction``."""
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(T, D, generator=g)
    hot = torch.rand(T, generator=g) < hot_fraction
    x[:, 0] = torch.where(hot, 5.0 + x[:, 0].abs(), -5.0 - x[:, 0].abs())
    return x


def _worker(rank, world):
    torch.manual_seed(0)
    layer = am.MoELayer(D, H, E, 1, ranks_per_node=2 if world == 4 else None)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0  # expert 0 gets the "hot" tokens
        layer.router.weight[1:, 1:4] = torch.eye(3)
    table = _synthetic_table(layer)
    layer.use_table(table)
    seen = []
    for frac in (0.0, 0.3, 0.6, 1.0):
        x = _skewed_input(rank, frac, layer).requires_grad_(True)
        layer(x).sum().backward()
        expected = table.lookup(layer.last_max_tokens)
        assert layer.last_strategy == expected, (layer.last_strategy, expected)
        seen.append((layer.last_max_tokens, str(layer.last_strategy)))
    counts = layer.stats()
    assert sum(v["count"] for v in counts.values()) == 4
    return seen


@pytest.mark.dist
@pytest.mark.timeout(200)
@pytest.mark.parametrize("world", [2, 4])
def test_layer_runs_the_strategy_the_table_names(world):
    results = run_distributed(_worker, world, (), timeout=180)
    assert all(r == results[0] for r in results), "ranks chose differently"
    assert len({s for _, s in results[0]}) >= 2, "the workloads did not hit different buckets"


def _explore_worker(rank, world):
    torch.manual_seed(0)
    layer = am.MoELayer(D, H, E, 2, explore=Exploration(every=2, candidates=3))
    table = _synthetic_table(layer)
    layer.use_table(table)
    ran = []
    for step in range(8):
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(step)).requires_grad_(True)
        layer(x).sum().backward()
        ran.append(str(layer.last_strategy))
    key = table.buckets.key(layer.last_max_tokens)
    times = {str(s): ms for s, ms in table.entries[table.nearest_key(key)].times_ms.items()}
    return ran, times


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_exploration_probes_candidates_and_updates_table_alike():
    results = run_distributed(_explore_worker, 2, (), timeout=100)
    (ran0, times0), (ran1, times1) = results
    assert ran0 == ran1 and times0 == times1
    assert len(set(ran0)) >= 2, "no candidate other than the best was probed"
    # Real measured times (ms of this CPU) replaced some synthetic 1.0/2.0/... values.
    assert any(abs(v - round(v)) > 1e-9 for v in times0.values())


def test_bad_exploration_settings():
    with pytest.raises(ValueError, match="every"):
        Exploration(every=1)
    with pytest.raises(ValueError, match="candidates"):
        Exploration(candidates=0)

"""A predicted ``StrategyTable``: every strategy's cost-model time per workload bucket.

The buckets are the profiler's (``profiler.sweep_keys`` over ``workload_range``), each
bucket's workload the profiler's synthetic one (``cost_model.workload_counts``), and the
strategies the ones ``MoELayer`` offers on that cluster (``candidate_strategies``), so a
predicted table is used exactly like a measured one: ``MoELayer(..., table=path)`` on a
matching world, with ``explore=Exploration(...)`` replacing predictions by measurements
of the top candidates as training runs.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from adaptive_moe.core.strategy import DEGREES, Strategy
from adaptive_moe.planning.cost_model import (
    Cluster,
    CostBreakdown,
    LayerSpec,
    check_memory,
    measure_host_ms,
    plan_bytes,
    strategy_cost,
    workload_runs,
)
from adaptive_moe.planning.grouped import Runs
from adaptive_moe.planning.kernel_profile import ComputeModel, KernelProfile
from adaptive_moe.tuning.table import (
    Fingerprint,
    LayerShape,
    Measurement,
    StrategyTable,
)
from adaptive_moe.tuning.table import torch_version as running_torch
from adaptive_moe.tuning.workload import Buckets, sweep_keys, workload_range

MODEL_NAME = "adaptive_moe.planning.cost_model/1"


def candidate_strategies(
    layer: LayerSpec,
    cluster: Cluster,
    kernels: Sequence[str],
    max_degree: int | None = None,
) -> list[Strategy]:
    """The strategies ``MoELayer.strategies()`` lists on this cluster for ``kernels``:
    r = 0 (degree 1, linear), and every r >= 1 dividing s with linear (and 2DH when the
    cluster has several nodes of several ranks) at every degree."""
    if not kernels:
        raise ValueError("kernels must name at least one expert kernel")
    if cluster.world == 1:
        return [Strategy(1, "linear", 1, k) for k in kernels]
    algos = ["linear"]
    if cluster.nodes > 1 and cluster.ranks_per_node > 1:
        algos.append("2dh")
    degrees = [d for d in DEGREES if max_degree is None or d <= max_degree]
    out = [Strategy(0, "linear", 1, k) for k in kernels]
    for r in layer.layout(cluster.world).valid_r()[1:]:
        out += [Strategy(r, a, d, k) for a in algos for d in degrees for k in kernels]
    return out


def predict_bucket(
    layer: LayerSpec,
    cluster: Cluster,
    compute: ComputeModel,
    strategies: Sequence[Strategy],
    counts: np.ndarray | Runs,
    *,
    measure_host: bool = False,
) -> dict[Strategy, CostBreakdown]:
    """Every strategy's predicted breakdown for one workload ``counts`` [W, E];
    ``measure_host``: add the host planning time measured on this machine (once per
    r, degree and algorithm)."""
    cache: dict = {}
    host: dict[tuple[int, int, str], float] = {}
    out = {}
    for s in strategies:
        key = (s.r, s.degree, s.a2a)
        if measure_host and key not in host:
            host[key] = measure_host_ms(layer, cluster, counts, s, repeats=1)
        out[s] = strategy_cost(
            layer, cluster, compute, s, counts, cache=cache, host_ms=host.get(key, 0.0)
        )
    return out


def model_inputs(
    layer: LayerSpec, cluster: Cluster, compute: ComputeModel, tokens: int, **extra: Any
) -> dict[str, Any]:
    """What a predicted table records about how it was predicted (plain data)."""
    return {
        "model": MODEL_NAME,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "layer": dataclasses.asdict(layer),
        "world": cluster.world,
        "ranks_per_node": cluster.ranks_per_node,
        "overlap": cluster.overlap,
        "links": cluster.links.to_dict(),
        "compute": compute.describe(),
        "tokens_per_rank": tokens,
        **extra,
    }


def plan_table(
    layer: LayerSpec,
    cluster: Cluster,
    compute: ComputeModel,
    tokens: int,
    *,
    buckets: Buckets | None = None,
    num_buckets: int = 6,
    capacity_factor: float = 0.0,
    kernels: Sequence[str] | None = None,
    max_degree: int | None = None,
    backend: str | None = None,
    torch_version: str | None = None,
    measure_host: bool = False,
    progress: bool = True,
    on_bucket: Callable[[int, dict[Strategy, CostBreakdown]], None] | None = None,
    max_bytes: int | None = None,
) -> StrategyTable:
    """The predicted table of ``layer`` on ``cluster`` (see module docstring).

    Args:
        compute: the kernel profile (or roofline) of one device of the cluster.
        tokens: T, tokens per rank.
        buckets: bucketing of the table, as ``profile_layer`` takes it (default
            ``Buckets()``).
        num_buckets: most buckets in the sweep.
        capacity_factor: the run's capacity factor; a nonzero one caps the sweep at the
            capacity.
        kernels: a subset of the compute model's kernels (default all).
        max_degree: leave out pipelining degrees above it.
        backend: the fingerprint's backend (default ``nccl`` on GPU, ``gloo`` on CPU).
        torch_version: the fingerprint's torch ``major.minor`` (default the kernel
            profile's, else the running torch's).
        measure_host: add the executor's host planning time per forward, measured here
            (``cost_model.measure_host_ms``; this CPU stands in for the cluster's).
        on_bucket: called with each bucket's key and breakdowns (e.g. to print them).
        max_bytes: refuse (ValueError with the estimate) a plan whose estimated memory
            exceeds it (``cost_model.plan_bytes``; default half of this machine's).
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive integer, got {tokens!r}")
    kernels = tuple(kernels) if kernels is not None else compute.kernels
    unknown = [k for k in kernels if k not in compute.kernels]
    if unknown or not kernels:
        raise ValueError(f"kernels must be a non-empty subset of {compute.kernels}, got {kernels}")
    layer.layout(cluster.world)  # ValueError when E and W do not fit
    w, m = cluster.world, cluster.ranks_per_node
    check_memory(plan_bytes(layer, w, m), max_bytes, f"planning W={w}, E={layer.num_experts}")
    if measure_host:  # build_plan holds the [W, E] counts as Python ints
        check_memory(40 * w * layer.num_experts, max_bytes, f"--measure-host at W={w}")
    buckets = buckets or Buckets()
    w, e, k = cluster.world, layer.num_experts, layer.top_k
    lo, hi = workload_range(tokens, w, e, k, capacity_factor)
    sweep = sweep_keys(buckets, lo, hi, num_buckets)
    strategies = candidate_strategies(layer, cluster, kernels, max_degree)
    balanced = tokens * w * k / e
    version = torch_version or (
        compute.torch_version if isinstance(compute, KernelProfile) else running_torch()
    )
    backend = backend or ("gloo" if compute.device == "cpu" else "nccl")
    if backend in ("nccl", "gloo") and cluster.backend != backend:
        cluster = dataclasses.replace(cluster, backend=backend)
    inputs = model_inputs(
        layer,
        cluster,
        compute,
        tokens,
        capacity_factor=capacity_factor,
        host_planning="measured here" if measure_host else "not modelled",
    )
    table = StrategyTable(
        Fingerprint(compute.device, w, cluster.ranks_per_node, backend, version),
        LayerShape(layer.d_model, layer.d_ff, e, k, layer.glu, layer.dtype, layer.layout(w).shards),
        buckets,
        predicted=inputs,
    )
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    bar = tqdm(sweep, unit="bucket", desc="plan", disable=not progress, dynamic_ncols=True)
    for key, max_tokens in bar:
        bar.set_postfix_str(f"bucket {key}: {max_tokens} rows, {len(strategies)} strategies")
        counts = workload_runs(w, e, k, tokens, max_tokens)
        costs = predict_bucket(
            layer, cluster, compute, strategies, counts, measure_host=measure_host
        )
        how = Measurement(1, 0, "predicted", tokens, max_tokens, max_tokens / balanced, now)
        table.add_bucket(key, {s: c.total_ms for s, c in costs.items()}, how)
        if on_bucket is not None:
            on_bucket(key, costs)
    return table


def margins(table: StrategyTable, moe_layers: int | None = None) -> str:
    """Per bucket: the best strategy, its time, the next best and the margin; with
    ``moe_layers``, also the step's MoE time (forward + backward of every MoE layer,
    each at this bucket's workload) with the best and the runner-up strategy."""
    step = f"  {'MoE/step ms':>11} {'next':>9}" if moe_layers else ""
    lines = [
        f"{'bucket':>6} {'max rows':>9} {'skew':>5}  {'best':<24} {'ms':>9}  {'next':<24} "
        f"{'margin':>7}{step}"
    ]
    for key, entry in sorted(table.entries.items()):
        ranked = sorted(entry.times_ms.items(), key=lambda kv: (kv[1], kv[0]))
        best, t0 = ranked[0]
        nxt, t1 = ranked[1] if len(ranked) > 1 else (None, t0)
        margin = f"{(t1 / t0 - 1) * 100:6.1f}%" if nxt else f"{'-':>7}"
        line = (
            f"{key:>6} {entry.how.max_tokens:>9} {entry.how.skew:5.1f}  {best!s:<24} "
            f"{t0:9.3f}  {nxt!s:<24} {margin}"
        )
        if moe_layers:
            line += f"  {t0 * moe_layers:11.1f} {t1 * moe_layers:9.1f}"
        lines.append(line)
    return "\n".join(lines)

"""Adaptive vs static: one MoE layer through routing phases whose skew changes over time
(balanced -> one hot expert -> rotating hot expert), run with automatic switching (a
strategy table) and with every fixed strategy; per-phase and total times.

    torchrun --nproc-per-node 8 -m benchmarks.adaptive --d-model 2048 --d-ff 1024 \
        --experts 64 --top-k 8 --tokens 8192 --ranks-per-node 4 --out adaptive.json
    python -m benchmarks.adaptive --nproc 2            # CPU, spawned gloo ranks

Without --table the layer is profiled first (``profiling.profiler.profile_layer``). Each
step is forward + backward with synthetic routing (``profiling.profiler.synthetic_routing``)
at the phase's skew; the time of a phase is measured around all its steps (CUDA events /
host clock after a barrier) and the slowest rank's is reported. The decision overhead is
the host time of bucketing + table lookup per forward, against the layer's time.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from adaptive_moe.core.strategy import Strategy
from adaptive_moe.profiling.profiler import profile_layer, synthetic_routing, workload_range
from adaptive_moe.runtime.layer import MoELayer
from adaptive_moe.tuning.table import StrategyTable
from benchmarks._layer_job import add_layer_args, build_layer, run_job


def _phases(lo: int, hi: int, steps: int) -> list[tuple[str, list[tuple[int, int]]]]:
    """(name, [(max_tokens, routing seed)] per step) for each phase."""
    hot = max(lo, min(hi, hi // 2))
    return [
        ("balanced", [(lo, 1000 + i) for i in range(steps)]),
        ("one hot expert", [(hot, 7) for _ in range(steps)]),
        ("rotating hot expert", [(hot, 2000 + i) for i in range(steps)]),
    ]


def _run_phase(layer, steps, strategy, args, rank, world, device) -> float:
    """Slowest rank's ms for all steps of one phase."""
    shape = layer.layer_shape()
    batches = []
    for max_tokens, seed in steps:
        ids = synthetic_routing(
            args.tokens, world, shape.num_experts, shape.top_k, max_tokens, seed
        )[rank].to(device)
        weights = torch.full(ids.shape, 1.0 / shape.top_k, device=device)
        batches.append((ids, weights))
    g = torch.Generator(device="cpu").manual_seed(rank)
    x = torch.randn(args.tokens, shape.d_model, generator=g).to(device, layer._dtype)
    x.requires_grad_(True)
    _barrier(layer, device)
    start = time.perf_counter()
    for ids, weights in batches:
        layer.zero_grad(set_to_none=True)
        layer.forward_routed(x, ids, weights, strategy).sum().backward()
    _barrier(layer, device)
    ms = torch.tensor([(time.perf_counter() - start) * 1e3], device=device)
    if layer.mesh is not None and layer.mesh.world > 1:
        dist.all_reduce(ms, op=dist.ReduceOp.MAX, group=layer.mesh.group)
    return float(ms.item())


def _barrier(layer, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if layer.mesh is not None and layer.mesh.world > 1:
        dist.barrier(group=layer.mesh.group)


def _decision_us(layer: MoELayer, lo: int, hi: int) -> float:
    """Host microseconds per choose_strategy call (bucketing + lookup + validation)."""
    n = 2000
    start = time.perf_counter()
    for i in range(n):
        layer.choose_strategy(lo + (hi - lo) * i // n)
    return (time.perf_counter() - start) / n * 1e6


def _worker(rank: int, world: int, args: argparse.Namespace) -> dict | None:
    layer = build_layer(args)
    device = layer.experts.down_proj.device
    if args.table:
        table = StrategyTable.load(args.table)
    else:
        table = profile_layer(
            layer, args.tokens, num_buckets=args.buckets, repeats=5, warmup=2, progress=rank == 0
        )
    layer.use_table(table)
    lo, hi = workload_range(args.tokens, world, args.experts, args.top_k)
    phases = _phases(lo, hi, args.steps)
    contenders: list[Strategy | None] = [None, *layer.strategies()]  # None = automatic
    results: dict[str, dict[str, float]] = {}
    for name, steps in phases:
        _run_phase(layer, steps[:2], None, args, rank, world, device)  # warm-up
        results[name] = {
            ("auto" if s is None else str(s)): _run_phase(
                layer, steps, s, args, rank, world, device
            )
            for s in contenders
        }
    if rank != 0:
        return None
    default = str(layer.default_strategy)
    report = {
        "phases": results,
        "decision_us": _decision_us(layer, lo, hi),
        "default": default,
        "world": world,
        "device": str(device),
    }
    total = {k: sum(r[k] for r in results.values()) for k in results[phases[0][0]]}
    results["total"] = total
    print(
        f"\n{'phase':<22} {'auto ms':>9} {'best fixed':>28} {'ms':>9} {'auto/best':>9} "
        f"{'default ms':>10} {'speed-up':>8}"
    )
    for name, times in results.items():
        best = min((k for k in times if k != "auto"), key=times.get)
        print(
            f"{name:<22} {times['auto']:>9.2f} {best:>28} {times[best]:>9.2f} "
            f"{times['auto'] / times[best]:>9.3f} {times[default]:>10.2f} "
            f"{times[default] / times['auto']:>7.2f}x"
        )
    per_step_ms = total["auto"] / (3 * args.steps)
    print(
        f"decision overhead {report['decision_us']:.1f} us per forward = "
        f"{report['decision_us'] / 1e3 / per_step_ms:.2%} of a step"
    )
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_layer_args(p)
    p.add_argument("--steps", type=int, default=10, help="steps per phase")
    p.add_argument("--buckets", type=int, default=4, help="profiled buckets without --table")
    p.add_argument("--table", default=None)
    run_job(_worker, p.parse_args(), timeout_s=1200)


if __name__ == "__main__":
    main()

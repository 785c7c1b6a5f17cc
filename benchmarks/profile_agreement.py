"""How well one strategy measurement agrees with the next: the profiler's noise ceiling.

    python -m benchmarks.profile_agreement --world 4 --ranks-per-node 2 --repeats 10

On W spawned gloo CPU ranks (one thread each), the profiler's synthetic buckets and
its forward + backward pass of every strategy (``profiler._pass_timer``), measured by
each schedule twice, alternately (A of every schedule, then B of every schedule):

  sequential    per strategy: its warm-up, then its timed passes back to back;
  interleaved   every strategy's warm-up, then round-robin timed passes (pass p of
                every strategy before pass p + 1 of any), so drift in the machine's
                load hits every strategy alike.

Every pass's time of every rank is kept, and each statistic is computed from the same
passes: ``rank-median`` (the slowest rank's median, the profiler's statistic before
session 8), and per-pass ``max`` over ranks (the step's time) summarised by ``median``,
``q1`` (lower quartile) or ``min``. For each (schedule, statistic) and bucket it prints
Spearman, top-1 and regret of measurement B against A, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from adaptive_moe.core.launch import launch
from adaptive_moe.profiling import profiler
from adaptive_moe.runtime.layer import MoELayer
from benchmarks.plan_validation import add_sweep_arguments, spearman

SCHEDULES = ("sequential", "interleaved")
STATISTICS = ("rank-median", "median", "q1", "min")


def _passes(time_pass: dict, warmup: int, repeats: int, schedule: str) -> np.ndarray:
    """[S, R] this rank's ms of every timed pass of every strategy."""
    fns = list(time_pass.values())
    out = np.zeros((len(fns), repeats))
    if schedule == "sequential":
        for i, fn in enumerate(fns):
            for _ in range(warmup):
                fn()
            out[i] = [fn() for _ in range(repeats)]
        return out
    for fn in fns:
        for _ in range(warmup):
            fn()
    for p in range(repeats):
        for i, fn in enumerate(fns):
            out[i, p] = fn()
    return out


def _worker(rank: int, world: int, args: argparse.Namespace) -> dict | None:
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = min(args.ranks_per_node, world)
    layer = MoELayer(
        args.d_model, args.d_ff, args.experts, args.top_k, ranks_per_node=m, dtype=torch.float32
    )
    chosen = [s for s in layer.strategies() if s.kernel in args.kernels]
    plan = profiler.plan_sweep(layer, args.tokens, num_buckets=args.buckets, strategies=chosen)
    buckets = []
    for key, max_tokens in plan.workloads:
        batch = profiler._make_batch(layer, rank, world, args.tokens, max_tokens, args.seed + key)
        runs: dict[str, list] = {s: [] for s in SCHEDULES}
        loads = []
        with layer._profiling_routing(profiler._routed_as(batch)):
            timers = {s: profiler._pass_timer(layer, batch, s) for s in chosen}
            for _ in range(2):  # measurement A of every schedule, then B
                for schedule in SCHEDULES:
                    mine = _passes(timers, args.warmup, args.repeats, schedule)
                    every = torch.zeros(world, *mine.shape, dtype=torch.float64)
                    every[rank] = torch.from_numpy(mine)
                    dist.all_reduce(every)  # [W, S, R]: every rank's passes
                    runs[schedule].append(every.tolist())
                    loads.append(os.getloadavg()[0])
        buckets.append(
            {"key": key, "max_tokens": max_tokens, "runs": runs, "load": [min(loads), max(loads)]}
        )
    layer.zero_grad(set_to_none=True)
    if rank != 0:
        return None
    return {"world": world, "strategies": [str(s) for s in chosen], "buckets": buckets}


def summarise(passes: np.ndarray, stat: str) -> np.ndarray:
    """[S] one time per strategy from [W, S, R] passes."""
    if stat == "rank-median":
        return np.median(passes, axis=2).max(axis=0)
    step = passes.max(axis=0)  # [S, R]: the slowest rank of each pass
    if stat == "median":
        return np.median(step, axis=1)
    if stat == "q1":
        return np.percentile(step, 25, axis=1)
    return step.min(axis=1)


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, bool, float]:
    """(Spearman, top-1, regret) of measurement b against a."""
    best_a, best_b = int(np.argmin(a)), int(np.argmin(b))
    return spearman(list(b), list(a)), best_a == best_b, float(a[best_b] / a[best_a] - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_sweep_arguments(p, worlds="2,4", buckets=2, repeats=10)
    p.add_argument("--kernels", type=lambda v: tuple(v.split(",")), default=("loop", "bmm"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=None, help="write every pass as JSON")
    args = p.parse_args()
    results = []
    for w in [int(v) for v in args.worlds.split(",")]:
        t0 = time.time()
        result = launch(_worker, w, (args,), timeout_s=args.timeout, ranks_per_node=w)[0]
        result["wall_s"] = time.time() - t0
        results.append(result)
        print(f"W={w}: {result['wall_s']:.0f} s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results))
    print("| W | bucket (max rows) | load | schedule | statistic | Spearman | top-1 | regret |")
    print("|---:|---|---|---|---|---:|:-:|---:|")
    for sched in SCHEDULES:
        for stat in STATISTICS:
            rows = []
            for res in results:
                for b in res["buckets"]:
                    a, again = (np.asarray(x) for x in b["runs"][sched])
                    rho, top1, regret = agreement(summarise(a, stat), summarise(again, stat))
                    rows.append((rho, top1, regret))
                    lo, hi = b["load"]
                    print(
                        f"| {res['world']} | {b['key']} ({b['max_tokens']}) | {lo:.1f}-{hi:.1f} | "
                        f"{sched} | {stat} | {rho:.2f} | {'yes' if top1 else 'no'} | "
                        f"{regret * 100:.1f}% |"
                    )
            print(
                f"{sched}, {stat}: mean Spearman {statistics.mean(r[0] for r in rows):.2f}, "
                f"top-1 {sum(r[1] for r in rows)}/{len(rows)}, median regret "
                f"{statistics.median(r[2] for r in rows) * 100:.1f}%"
            )


if __name__ == "__main__":
    main()

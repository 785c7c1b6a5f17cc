"""Validate the scale planner: predicted vs measured strategy times on gloo CPU ranks.

    python -m benchmarks.plan_validation --worlds 2,4,8 --ranks-per-node 2 --out-dir pv/
    torchrun --nproc-per-node 8 -m benchmarks.plan_validation --ranks-per-node 4  # NCCL

For each world size W (spawned gloo CPU ranks, ``ranks_per_node`` simulating nodes on
one host), every rank at once:

  1. times the linear and 2DH ``exchange`` of equal splits at a few sizes (the
     ``benchmarks/alltoall.py`` measurement and JSON format, at the small messages this
     layer sends), written to ``a2a-w<W>.json``;
  2. measures the expert kernels' profile (``measure_kernel_profile``) while every
     rank measures too, so the cores are shared as in a step; the slowest rank's time
     of every grid point is kept (``kernels-w<W>.json``);
  3. measures every strategy with the profiler (``profile_layer``: synthetic routing
     per bucket, forward + backward, strategies interleaved in rounds, median of the
     slowest rank's times), twice with ``--remeasure`` (how well one measurement
     predicts the next: the noise ceiling);
  4. times the executor's host planning of every (r, degree, algorithm) per bucket
     (``cost_model.measure_host_ms``, slowest rank).

Then one link is fitted to each world's a2a file (``fit_links``: call latency,
per-message alpha, bandwidth; as ``plan --calibrate`` fits its own launch's: W ranks
sharing the host's cores make a collective's cost depend on W), or with ``--links
pooled`` one to every world's files (as ``--links-file`` takes several); gloo's
"nodes" share one host, so both levels get the same figures. The cost model predicts
every measured strategy on the bucket's exact synthetic counts
(``profiler.synthetic_routing``, the same seed). The strategy times are not used to
fit anything. Per bucket it reports the Spearman rank correlation of predicted and
measured times, whether the predicted best is the measured best (top-1), and the
measured time lost by running the predicted best instead (regret).
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

from adaptive_moe.comm import build_mesh
from adaptive_moe.core.launch import external_world_size, launch
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.planning.calibrate import (
    A2A_ROWS,
    ROWS_GRID,
    slowest_profile,
    time_alltoall,
)
from adaptive_moe.planning.cost_model import (
    Cluster,
    LayerSpec,
    cpu_overlap,
    measure_host_ms,
    strategy_cost,
)
from adaptive_moe.planning.kernel_profile import (
    KernelProfile,
    measure_kernel_profile,
    needed_shapes,
)
from adaptive_moe.planning.links import PRESETS, fit_links
from adaptive_moe.profiling.profiler import profile_layer, synthetic_routing
from adaptive_moe.runtime.layer import MoELayer


def _worker(rank: int, world: int, args: argparse.Namespace) -> dict | None:
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    nccl = dist.get_backend() == "nccl"  # under torchrun on GPUs: the same run on NCCL
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    if not nccl:
        torch.set_num_threads(1)
    dtype_name = args.dtype or ("bfloat16" if nccl else "float32")
    dtype = getattr(torch, dtype_name)
    m = min(args.ranks_per_node, world)
    mesh = build_mesh(dist.group.WORLD, m, 1)
    a2a = time_alltoall(
        mesh, args.d_model, A2A_ROWS, args.repeats * 2, device, dtype, args.statistic
    )
    hidden, experts = needed_shapes(args.experts, args.d_ff, [world])
    prof = measure_kernel_profile(
        args.d_model,
        hidden,
        experts,
        ROWS_GRID,
        dtype=dtype_name,
        device=device,
        kernels=args.kernels,
        warmup=1,
        repeats=2 * args.repeats,
        concurrent=world,
        statistic=args.statistic,
        progress=False,
    )
    prof = slowest_profile(prof, device)  # the slowest rank gates every step
    torch.manual_seed(0)
    layer = MoELayer(
        args.d_model,
        args.d_ff,
        args.experts,
        args.top_k,
        ranks_per_node=m,
        dtype=dtype,
        device=device,
    )
    chosen = [s for s in layer.strategies() if s.kernel in prof.kernels]
    t0 = time.time()
    sweep = dict(
        num_buckets=args.buckets,
        repeats=args.repeats,
        warmup=args.warmup,
        strategies=chosen,
        seed=args.seed,
        progress=rank == 0,
    )
    table = profile_layer(layer, args.tokens, **sweep)
    # the same sweep again: how well one measurement predicts the next (the noise ceiling)
    again = profile_layer(layer, args.tokens, **sweep) if args.remeasure else None
    # The host's per-forward planning, measured on every rank at once (the cores are
    # shared as in a step), slowest rank kept.
    spec = LayerSpec(args.d_model, args.d_ff, args.experts, args.top_k, dtype=dtype_name)
    cluster = Cluster(world, m, PRESETS["a100-ndv4"])  # links play no part in host time
    host = {}
    plans = sorted({(s.r, s.degree, s.a2a) for s in chosen if s.r >= 1})
    for key, e in sorted(table.entries.items()):
        counts = _counts(world, args, key, e.how.max_tokens)
        ms = [
            measure_host_ms(spec, cluster, counts, Strategy(r, a, d, prof.kernels[0]))
            for r, d, a in plans
        ]
        worst = torch.tensor(ms, dtype=torch.float64, device=device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        host[key] = [[list(p), t] for p, t in zip(plans, worst.tolist())]
    if rank != 0:
        return None
    buckets = [
        {
            "key": key,
            "max_tokens": e.how.max_tokens,
            "times_ms": [[s.to_dict(), ms] for s, ms in e.times_ms.items()],
            "host_ms": host[key],
            "again_ms": None
            if again is None
            else [[s.to_dict(), ms] for s, ms in again.entries[key].times_ms.items()],
        }
        for key, e in sorted(table.entries.items())
    ]
    return {
        "world": world,
        "ranks_per_node": m,
        "backend": "nccl" if nccl else "gloo",
        "dtype": dtype_name,
        "a2a": a2a,
        "profile": prof.to_dict(),
        "buckets": buckets,
        "profile_s": time.time() - t0,
    }


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(v: list[float]) -> np.ndarray:
        x = np.asarray(v, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for value in np.unique(x):  # ties share their mean rank
            r[x == value] = r[x == value].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _counts(world: int, args: argparse.Namespace, key: int, max_tokens: int) -> np.ndarray:
    """The exact counts [W, E] the profiler's routing of this bucket has."""
    ids = synthetic_routing(
        args.tokens, world, args.experts, args.top_k, max_tokens, args.seed + key
    )  # [W, T, k]
    return np.stack([np.bincount(ids[r].flatten(), minlength=args.experts) for r in range(world)])


def evaluate(runs: list[dict], args: argparse.Namespace, out_dir: Path) -> dict:
    paths = []
    for run in runs:
        path = out_dir / f"a2a-w{run['world']}.json"
        meta = {
            "world": run["world"],
            "ranks_per_node": run["ranks_per_node"],
            "device": "cpu",
            "backend": "gloo",
            "dtype": "float32",
        }
        path.write_text(json.dumps({"meta": meta, "results": run["a2a"]}, indent=1))
        paths.append(path)
    report: dict = {"links": {}, "worlds": []}
    # Every gloo "node" is the same host: one link, fitted to the linear and 2DH runs.
    pooled = fit_links(paths, copy_GBps=args.copy_gbps, one_level=True)
    for run, path in zip(runs, paths):
        w = run["world"]
        # per world: each world's own exchanges, as ``plan --calibrate`` fits its
        # launch's (W ranks on one host share its cores, so a collective's cost depends
        # on W); pooled: every world's files at once, as ``--links-file`` takes several
        # (the worlds' different message counts separate the call from the per-message
        # latency, which one world's all-to-alls alone cannot).
        links = (
            pooled
            if args.links == "pooled"
            else fit_links([path], copy_GBps=args.copy_gbps, one_level=True)
        )
        report["links"][w] = links.to_dict()
        layer = LayerSpec(
            args.d_model, args.d_ff, args.experts, args.top_k, dtype=run.get("dtype", "float32")
        )
        kpath = out_dir / f"kernels-w{w}.json"
        kpath.write_text(json.dumps(run["profile"], indent=1))
        prof = KernelProfile.load(kpath)
        backend = run.get("backend", "gloo")
        # gloo ranks of one host share its cores: no core is left for gloo's threads to
        # move data while the experts compute (the cores and ranks, not a fit)
        overlap = 1.0 if backend == "nccl" else cpu_overlap(w, os.cpu_count() or 1)
        cluster = Cluster(w, run["ranks_per_node"], links, backend=backend, overlap=overlap)
        rows = []
        for b in run["buckets"]:
            counts = _counts(w, args, b["key"], b["max_tokens"])
            measured = {Strategy.from_dict(s): ms for s, ms in b["times_ms"]}
            host = {(r, d, a): t for (r, d, a), t in b.get("host_ms") or []}
            plain: dict = {}
            without = {
                s: strategy_cost(layer, cluster, prof, s, counts, cache=plain).total_ms
                for s in measured
            }
            cache: dict = {}
            predicted = {
                s: strategy_cost(
                    layer,
                    cluster,
                    prof,
                    s,
                    counts,
                    cache=cache,
                    host_ms=host.get((s.r, s.degree, s.a2a), 0.0),
                ).total_ms
                for s in measured
            }
            order = sorted(measured)
            rho_plain = spearman([without[s] for s in order], [measured[s] for s in order])
            best_plain = min(order, key=lambda s: (without[s], s))
            rho = spearman([predicted[s] for s in order], [measured[s] for s in order])
            p_best = min(order, key=lambda s: (predicted[s], s))
            m_best = min(order, key=lambda s: (measured[s], s))
            noise = {}
            if b.get("again_ms"):
                again = {Strategy.from_dict(s): ms for s, ms in b["again_ms"]}
                a_best = min(order, key=lambda s: (again[s], s))
                noise = {
                    "spearman_again": spearman(
                        [again[s] for s in order], [measured[s] for s in order]
                    ),
                    "top1_again": a_best == m_best,
                    "regret_again": measured[a_best] / measured[m_best] - 1,
                }
            rows.append(
                {
                    "key": b["key"],
                    "max_tokens": b["max_tokens"],
                    "strategies": len(order),
                    "spearman": rho,
                    "top1": p_best == m_best,
                    "pred_best": str(p_best),
                    "meas_best": str(m_best),
                    "regret": measured[p_best] / measured[m_best] - 1,
                    "ratio_median": statistics.median(predicted[s] / measured[s] for s in order),
                    "best_ms": measured[m_best],
                    "times": {str(s): [predicted[s], measured[s], without[s]] for s in order},
                    "spearman_no_host": rho_plain,
                    "top1_no_host": best_plain == m_best,
                    "regret_no_host": measured[best_plain] / measured[m_best] - 1,
                    **noise,
                }
            )
        report["worlds"].append(
            {
                "world": w,
                "ranks_per_node": run["ranks_per_node"],
                "profile_s": run["profile_s"],
                "buckets": rows,
            }
        )
    return report


def markdown(report: dict) -> str:
    lines = [
        "| W | m | bucket (max rows) | strategies | Spearman | top-1 | predicted best | "
        "measured best | regret | predicted/measured (median) | without host term: Spearman, "
        "top-1, regret | re-measured: Spearman, top-1, regret |",
        "|---:|---:|---|---:|---:|:-:|---|---|---:|---:|---|---|",
    ]
    for wr in report["worlds"]:
        for b in wr["buckets"]:
            lines.append(
                f"| {wr['world']} | {wr['ranks_per_node']} | {b['key']} ({b['max_tokens']}) | "
                f"{b['strategies']} | {b['spearman']:.2f} | {'yes' if b['top1'] else 'no'} | "
                f"{b['pred_best']} | {b['meas_best']} | {b['regret'] * 100:.1f}% | "
                f"{b['ratio_median']:.2f} | {_no_host(b)} | {_again(b)} |"
            )
    return "\n".join(lines)


def _no_host(b: dict) -> str:
    top1 = "yes" if b["top1_no_host"] else "no"
    return f"{b['spearman_no_host']:.2f}, {top1}, {b['regret_no_host'] * 100:.1f}%"


def _summary(flat: list[dict], suffix: str) -> str:
    rhos = [
        b["spearman" + suffix] for b in flat if b["spearman" + suffix] == b["spearman" + suffix]
    ]
    return (
        f"mean Spearman {statistics.mean(rhos):.2f}, top-1 "
        f"{sum(b['top1' + suffix] for b in flat)}/{len(flat)}, median regret "
        f"{statistics.median(b['regret' + suffix] for b in flat) * 100:.1f}%"
    )


def _again(b: dict) -> str:
    if "spearman_again" not in b:
        return "-"
    top1 = "yes" if b["top1_again"] else "no"
    return f"{b['spearman_again']:.2f}, {top1}, {b['regret_again'] * 100:.1f}%"


def add_sweep_arguments(
    p: argparse.ArgumentParser, *, worlds: str, buckets: int, repeats: int
) -> None:
    """The gloo worlds, the layer shape and the sweep (shared with profile_agreement)."""
    p.add_argument("--worlds", default=worlds)
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-ff", type=int, default=128)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--buckets", type=int, default=buckets)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--warmup", type=int, default=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_sweep_arguments(p, worlds="2,4,8", buckets=3, repeats=5)
    p.add_argument(
        "--kernels",
        type=lambda v: tuple(v.split(",")),
        default=None,
        help="default loop,bmm on CPU, every available kernel on GPUs",
    )
    p.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on GPUs")
    p.add_argument("--copy-gbps", type=float, default=5.0, help="CPU memcpy GB/s (2DH reorders)")
    p.add_argument(
        "--links",
        choices=("per-world", "pooled"),
        default="per-world",
        help="fit a link to each world's exchanges, or one to all worlds' together",
    )
    p.add_argument(
        "--statistic",
        choices=("median", "min"),
        default="median",
        help="of the calibration's repeats (exchanges, kernels), as plan --calibrate",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("plan_validation"))
    p.add_argument("--reuse", action="store_true", help="re-evaluate the saved runs.json")
    p.add_argument(
        "--remeasure",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure every strategy twice to report the measurement's own agreement",
    )
    args = p.parse_args()
    if args.kernels is None and not torch.cuda.is_available():
        args.kernels = ("loop", "bmm")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    saved = args.out_dir / "runs.json"
    if args.reuse:
        runs = json.loads(saved.read_text())
    worlds = [int(v) for v in args.worlds.split(",")]
    if external_world_size():  # torchrun chose the one world size
        worlds = [external_world_size()]
    for w in () if args.reuse else worlds:
        t0 = time.time()
        result = launch(
            _worker, w, (args,), timeout_s=900, ranks_per_node=min(args.ranks_per_node, w)
        )[0]
        if result is None:  # a torchrun rank other than 0
            return
        print(f"W={w}: measured in {time.time() - t0:.0f} s", flush=True)
        runs.append(result)
    if not args.reuse:
        saved.write_text(json.dumps(runs))
    report = evaluate(runs, args, args.out_dir)
    (args.out_dir / "report.json").write_text(json.dumps(report, indent=1))
    for w, links in report["links"].items():
        print(f"W={w}: link fitted to its a2a run: {links}")
    print(markdown(report))
    flat = [b for wr in report["worlds"] for b in wr["buckets"]]
    print(f"buckets {len(flat)}: model {_summary(flat, '')}")
    print(f"model without the host term: {_summary(flat, '_no_host')}")
    again = [b for b in flat if "spearman_again" in b]
    if again:
        print(f"re-measured vs measured: {_summary(again, '_again')}")


if __name__ == "__main__":
    main()

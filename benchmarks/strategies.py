"""Time every strategy of one MoE layer, forward + backward, at a few routing skews.

    torchrun --nproc-per-node 8 -m benchmarks.strategies --d-model 2048 --d-ff 1024 \
        --experts 64 --top-k 8 --tokens 4096 --ranks-per-node 4 --out strategies.json
    python -m benchmarks.strategies --nproc 2          # CPU, spawned gloo ranks

Uses the profiler's measurement (synthetic routing whose busiest expert gets a chosen
number of rows; CUDA events or the host clock; median of repeats; the slowest rank's
median) and prints every strategy's time per workload, fastest first, with its speed-up
over the default strategy (r=1, linear, degree 1).
"""

from __future__ import annotations

import argparse

from adaptive_moe.profiling.profiler import profile_layer
from benchmarks._layer_job import add_layer_args, build_layer, run_job


def _worker(rank: int, world: int, args: argparse.Namespace) -> dict | None:
    layer = build_layer(args)
    table = profile_layer(
        layer,
        args.tokens,
        num_buckets=args.buckets,
        repeats=args.repeats,
        warmup=args.warmup,
        progress=rank == 0,
    )
    if rank != 0:
        return None
    default = layer.default_strategy
    out = {"fingerprint": vars(table.fingerprint), "shape": vars(table.shape), "buckets": []}
    for key, entry in sorted(table.entries.items()):
        base = entry.times_ms.get(default)
        print(
            f"\nbucket {key}: busiest expert {entry.how.max_tokens} rows "
            f"(skew {entry.how.skew:.2f}), {entry.how.repeats} repeats"
        )
        print(f"{'strategy':<28} {'ms':>9} {'vs default':>10}")
        rows = sorted(entry.times_ms.items(), key=lambda kv: kv[1])
        for strategy, ms in rows:
            speedup = f"{base / ms:.2f}x" if base else "-"
            print(f"{strategy!s:<28} {ms:>9.3f} {speedup:>10}")
        out["buckets"].append(
            {
                "key": key,
                "max_tokens": entry.how.max_tokens,
                "times_ms": {str(s): ms for s, ms in rows},
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_layer_args(p)
    p.add_argument("--buckets", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    run_job(_worker, p.parse_args(), timeout_s=600)


if __name__ == "__main__":
    main()

"""Time every strategy of one MoE layer, forward + backward, at a few routing skews.

    torchrun --nproc-per-node 8 benchmarks/strategies.py --d-model 2048 --d-ff 1024 \
        --experts 64 --top-k 8 --tokens 4096 --ranks-per-node 4 --out strategies.json
    python benchmarks/strategies.py --nproc 2          # CPU, spawned gloo ranks

Uses the profiler's measurement (synthetic routing whose busiest expert gets a chosen
number of rows; CUDA events or the host clock; median of repeats; the slowest rank's
median) and prints every strategy's time per workload, fastest first, with its speed-up
over the default strategy (r=1, linear, degree 1).
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

from adaptive_moe.launch import external_world_size, launch
from adaptive_moe.layer import MoELayer
from adaptive_moe.profiler import profile_layer


def _worker(rank: int, world: int, args: argparse.Namespace) -> dict | None:
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    layer = MoELayer(
        args.d_model,
        args.d_ff,
        args.experts,
        args.top_k,
        ranks_per_node=args.ranks_per_node,
        dtype=dtype,
        device=device,
    )
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
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-ff", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--buckets", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--nproc", type=int, default=2, help="spawned CPU ranks (ignored under torchrun)"
    )
    p.add_argument("--ranks-per-node", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    results = launch(
        _worker,
        external_world_size() or args.nproc,
        (args,),
        timeout_s=600,
        ranks_per_node=args.ranks_per_node,
    )
    if args.out and results[0] is not None:
        with open(args.out, "w") as f:
            json.dump(results[0], f, indent=1)


if __name__ == "__main__":
    main()

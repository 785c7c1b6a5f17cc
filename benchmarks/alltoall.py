"""Bus bandwidth of the token exchange: linear and 2DH ``exchange`` against a plain
``dist.all_to_all_single``, equal splits, in one run.

    torchrun --nproc-per-node 8 benchmarks/alltoall.py --out a2a.json
    torchrun --nproc-per-node 8 benchmarks/alltoall.py --ranks-per-node 4   # 2DH over 2 x 4

Message size S = bytes each rank sends in total (S / W to every rank, itself included).
t = the slowest rank's median over the repeats (CUDA events around each call);
algbw = S / t, busbw = algbw * (W - 1) / W (the nccl-tests convention for all-to-all).
The plan is built once per size, outside the timed region (its host time is reported).
With one rank nothing crosses a link: the table is printed all the same (busbw 0). On a
machine without a GPU it runs on CPU with gloo (a smoke run, not a measurement).
Before timing, ``verify`` checks the exchange on this backend (NCCL on GPUs): variable
splits with empty chunks, forward, inverse, and the overlapped form's gradient.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, not installed
from adaptive_moe.comm import Mesh, build_mesh, exchange, exchange_start, plan_exchange

ROW = 1024  # elements per row


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--ranks-per-node",
        type=int,
        default=None,
        help="m for 2DH (default: LOCAL_WORLD_SIZE, i.e. one node per torchrun host)",
    )
    p.add_argument("--min-mib", type=int, default=1, help="smallest message, MiB per rank")
    p.add_argument("--max-mib", type=int, default=256, help="largest message, MiB per rank")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None, help="write the results as JSON here (rank 0)")
    return p.parse_args()


def init() -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:  # plain `python benchmarks/alltoall.py`: a group of one
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device


def verify(mesh: Mesh, device: torch.device) -> None:
    """Every row tagged (src, dst, i) lands where it should, comes back unchanged, and
    the gradient of sum(y**2)/2 through start/wait is x again (y's inverse exchange)."""
    w, me = mesh.world, mesh.rank
    sizes = torch.randint(1, 5, (w, w), generator=torch.Generator().manual_seed(0))
    sizes[-1, 0] = 0  # an empty chunk
    for algo in ("linear", "2dh"):
        plan = plan_exchange(sizes, mesh, algo, device)
        sent = [(me, d, i) for d in range(w) for i in range(int(sizes[me, d]))]
        want = [(s, me, i) for s in range(w) for i in range(int(sizes[s, me]))]
        x = torch.tensor(sent, dtype=torch.float32, device=device).reshape(-1, 3)
        x.requires_grad_()
        y = exchange_start(x, plan, mesh).wait()
        (y.square().sum() / 2).backward()
        ok = (
            torch.equal(y.detach().cpu(), torch.tensor(want, dtype=torch.float32).reshape(-1, 3))
            and torch.equal(exchange(y.detach(), plan.inverse(), mesh), x.detach())
            and x.grad is not None
            and torch.equal(x.grad, x.detach())
        )
        if not ok:
            raise RuntimeError(f"exchange check failed on rank {me} ({algo}, sizes {sizes})")


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """The slowest rank's median time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest)


def host_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(
    mesh: Mesh, nbytes: int, dtype: torch.dtype, device: torch.device, args: argparse.Namespace
) -> list[dict[str, object]]:
    w = mesh.world
    rows = max(1, nbytes // (ROW * dtype.itemsize * w)) * w
    x = torch.randn(rows, ROW, device=device).to(dtype)  # [rows, ROW], rows/W to each rank
    out = torch.empty_like(x)
    sizes = [[rows // w] * w for _ in range(w)]
    world_group = dist.group.WORLD
    runs: dict[str, tuple[Callable[[], object], float]] = {
        "all_to_all_single": (
            lambda: dist.all_to_all_single(out, x, group=mesh.group or world_group),
            0.0,
        ),
    }
    for algo in ("linear", "2dh"):
        plan = plan_exchange(sizes, mesh, algo, device)
        plan_s = host_seconds(lambda a=algo: plan_exchange(sizes, mesh, a, device), 5)
        runs[algo] = (lambda p=plan: exchange(x, p, mesh), plan_s)
    results = []
    real = rows * ROW * dtype.itemsize
    for name, (fn, plan_s) in runs.items():
        dist.barrier()
        with torch.no_grad():
            t = timed(fn, device, args.warmup, args.repeats)
        algbw = real / t / 1e9
        results.append(
            {
                "bytes": real,
                "method": name,
                "time_us": t * 1e6,
                "algbw_GBps": algbw,
                "busbw_GBps": algbw * (w - 1) / w,
                "plan_us": plan_s * 1e6,
            }
        )
    return results


def table(results: list[dict[str, object]]) -> str:
    lines = [
        "| MiB/rank | method | time (us) | algbw (GB/s) | busbw (GB/s) | plan (us) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['bytes'] / 2**20:.0f} | {r['method']} | {r['time_us']:.1f} | "
            f"{r['algbw_GBps']:.2f} | {r['busbw_GBps']:.2f} | {r['plan_us']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    device = init()
    world = dist.get_world_size()
    group = dist.group.WORLD if world > 1 else None
    mesh = build_mesh(group, args.ranks_per_node, 1)
    verify(mesh, device)
    dtype = getattr(torch, args.dtype)
    results = []
    mib = args.min_mib
    while mib <= args.max_mib:
        results += measure(mesh, mib * 2**20, dtype, device, args)
        mib *= 2
    if dist.get_rank() == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        head = (
            f"{name}, W={world}, ranks_per_node={mesh.ranks_per_node}, nodes={mesh.nodes}, "
            f"{dist.get_backend()}, torch {torch.__version__}, {args.dtype}"
        )
        if world == 1:
            head += " (one rank: no communication, busbw is 0)"
        print(head)
        print(table(results))
        if args.out:
            meta = {
                "device": name,
                "world": world,
                "ranks_per_node": mesh.ranks_per_node,
                "nodes": mesh.nodes,
                "backend": str(dist.get_backend()),
                "torch": torch.__version__,
                "dtype": args.dtype,
                "warmup": args.warmup,
                "repeats": args.repeats,
            }
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Host time per MoE forward (and forward + backward) on spawned CPU gloo ranks.

    python -m benchmarks.host_overhead --world 1 2 4 --repeats 3

Tiny shapes (d = 16, h = 32, 32 tokens per rank) so that the host-side work of a
forward (routing bookkeeping, the dispatch plan, index tensors, collective launches)
dominates the time instead of the arithmetic. For each layout and strategy: the median
over ``--iters`` timed forwards of the slowest rank's wall time (ms), repeated
``--repeats`` times in fresh processes; the median of the repeats is printed.
``no_grad fwd`` is a forward under ``torch.no_grad()`` with no forced strategy: on one
process (``--world 1``) the static inference path, across ranks (default
``InferenceConfig``) the training path's exchange.

``--compile-experts`` (world 1 only) adds a bf16 layer forced to ``grouped_mm``, built
without and with ``compile_experts="inductor"``: on CPU the eager one runs the counted
path (grouped_mm groups rows on the device only on CUDA), the compiled one the
device-grouped path with its experts as one generated graph (compiled during warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist

from adaptive_moe.core.launch import launch
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.runtime.layer import MoELayer

D_MODEL, D_FF, TOKENS, TOP_K = 16, 32, 32, 2


def _strategies(world: int, experts: int) -> list[Strategy]:
    """r = 0 and every exchange r at degree 1 and 2 (linear all-to-all, loop kernel); one
    process runs r = 1 at degree 1 only."""
    if world == 1:
        return [Strategy(1, "linear", 1, "loop")]
    shards = max(1, world // experts)
    out = [Strategy(0, "linear", 1, "loop")]
    for r in (r for r in range(1, shards + 1) if shards % r == 0):
        out += [Strategy(r, "linear", 1, "loop"), Strategy(r, "linear", 2, "loop")]
    return out


def _time(step: Callable[[], None], iters: int, warmup: int) -> tuple[float, float]:
    """(wall, cpu) median ms of ``step()`` over ``iters`` calls, the slowest rank's.

    cpu is the CPU time of the calling (Python) thread: the host work of the forward,
    without the time it sleeps waiting for peers or the CPU time of gloo's own threads,
    so it depends much less than the wall time on how busy the shared machine is."""
    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(iters):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.thread_time()
        step()
        cpu.append((time.thread_time() - c0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    med = torch.tensor([statistics.median(wall), statistics.median(cpu)], dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return float(med[0]), float(med[1])


def _worker(
    rank: int, world: int, experts: int, iters: int, warmup: int, compiled: bool = False
) -> dict[str, tuple[float, float]]:
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    # One intra-op thread: a rank's only thread does the host work, so that a busy
    # machine's descheduled workers do not show up as the caller spin-waiting on them.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = MoELayer(D_MODEL, D_FF, experts, TOP_K, bias=True)
    torch.manual_seed(1 + rank)
    x = torch.randn(TOKENS, D_MODEL, requires_grad=True)
    out = {}
    for s in _strategies(world, experts):

        def fwd(s: Strategy = s) -> None:
            layer(x, strategy=s)

        def fwd_bwd(s: Strategy = s) -> None:
            (layer(x, strategy=s).square().sum() + layer.aux_loss).backward()

        name = f"r={s.r} degree={s.degree}"
        out[f"{name} fwd"] = _time(fwd, iters, warmup)
        out[f"{name} fwd+bwd"] = _time(fwd_bwd, iters, warmup)

    def no_grad_fwd() -> None:
        with torch.no_grad():
            layer(x)

    out["no_grad fwd"] = _time(no_grad_fwd, iters, warmup)
    if compiled and world == 1:
        out.update(_compiled_rows(experts, x, iters, warmup))
    return out


def _compiled_rows(
    experts: int, x: torch.Tensor, iters: int, warmup: int
) -> dict[str, tuple[float, float]]:
    """fwd + bwd of a bf16 grouped_mm layer, eager and with compile_experts."""
    grouped, xb = Strategy(1, "linear", 1, "grouped_mm"), x.detach().bfloat16().requires_grad_()
    out = {}
    for label, backend in (("eager", None), ("compile_experts", "inductor")):
        torch.manual_seed(0)
        layer = MoELayer(D_MODEL, D_FF, experts, TOP_K, dtype=torch.bfloat16,
                         compile_experts=backend)  # fmt: skip

        def fwd_bwd(layer: MoELayer = layer) -> None:
            (layer(xb, strategy=grouped).float().square().sum() + layer.aux_loss).backward()

        out[f"bf16 grouped_mm {label} fwd+bwd"] = _time(fwd_bwd, iters, warmup)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile-experts", action="store_true",
                   help="world 1: also bf16 grouped_mm eager vs compile_experts")  # fmt: skip
    args = p.parse_args()
    for world in args.world:
        for experts in [2 * world] + ([world // 2] if world >= 4 else []):  # s = 1, s = 2
            runs = [
                launch(
                    _worker,
                    world,
                    (experts, args.iters, args.warmup, args.compile_experts),
                    timeout_s=600,
                )[0]
                for _ in range(args.repeats)
            ]
            print(f"\nW={world} E={experts}: ms per call, median of {args.repeats} runs")
            print(f"  {'':40s} {'wall':>8s} {'cpu':>8s}   cpu of each run")
            for key in runs[0]:
                wall = statistics.median(r[key][0] for r in runs)
                cpus = [r[key][1] for r in runs]
                spread = ", ".join(f"{v:.2f}" for v in cpus)
                print(f"  {key:40s} {wall:8.3f} {statistics.median(cpus):8.3f}   [{spread}]")


if __name__ == "__main__":
    main()

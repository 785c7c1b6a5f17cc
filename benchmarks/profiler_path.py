"""What the profiler's old timed region left out: per kernel, one process, the old pass
(``forward_routed`` + backward from y: dispatch, experts, combine) against the profiler's
pass (``MoELayer.forward`` with the synthetic routing injected after the router, backward
from y and the balance and z-losses: router, count exchange, losses, shared expert too),
at the same synthetic routing, interleaved pass by pass so that a shared machine's noise
falls on both alike; medians.

    python -m benchmarks.profiler_path --d-model 256 --d-ff 128 --experts 64 --top-k 8 \
        --tokens 1024 --shared-d-ff 256
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable

import torch

from adaptive_moe.core import timing
from adaptive_moe.profiling import profiler
from adaptive_moe.runtime.layer import MoELayer


def _old_pass(layer: MoELayer, batch, weights: torch.Tensor, strategy) -> None:
    layer.zero_grad(set_to_none=True)
    batch.x.grad = None
    layer.forward_routed(batch.x, batch.topk_ids, weights, strategy).backward(batch.dy)


def _time_ms(device: torch.device, run: Callable[[], None]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = timing.mark(device)
    run()
    return timing.elapsed_ms(start, timing.mark(device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=128)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--shared-d-ff", type=int, default=0)
    p.add_argument("--skew", type=float, default=1.0, help="hot expert's load / balanced")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    layer = MoELayer(args.d_model, args.d_ff, args.experts, top_k=args.top_k,
                     shared_d_ff=args.shared_d_ff, dtype=dtype, device=device)  # fmt: skip
    lo, hi = profiler.workload_range(args.tokens, 1, args.experts, args.top_k)
    max_tokens = min(hi, max(lo, round(lo * args.skew)))
    batch = profiler._make_batch(layer, 0, 1, args.tokens, max_tokens, seed=0)
    weights = torch.full(batch.topk_ids.shape, 1.0 / args.top_k, device=device)
    print(f"{device} {dtype}, T={args.tokens}, busiest expert {max_tokens} rows")
    print(f"{'strategy':<28} {'old ms':>9} {'layer ms':>9} {'layer/old':>9}")
    with layer._profiling_routing(profiler._routed_as(batch)):
        for strategy in layer.strategies():
            passes = (
                functools.partial(_old_pass, layer, batch, weights, strategy),
                functools.partial(profiler._one_pass, layer, batch, strategy),
            )
            times: list[list[float]] = [[], []]
            for i in range(args.repeats + 3):
                for which, run in enumerate(passes):
                    ms = _time_ms(device, run)
                    if i >= 3:  # warm-up
                        times[which].append(ms)
            old, new = (statistics.median(t) for t in times)
            print(f"{strategy!s:<28} {old:9.3f} {new:9.3f} {new / old:9.2f}")


if __name__ == "__main__":
    main()

"""Where one MoE layer step spends its time: a torch.profiler summary of forward +
backward on one GPU (top operators by device time), for finding overheads.

    python -m benchmarks.trace_layer --shape fine256 --kernel scatter [--ffn swiglu]
        [--routing skew] [--router bfloat16]

``--kernel default`` runs the layer with no strategy (the zero-configuration path).

Device times are totals over ``--steps`` steps (gradients cleared before each, as in
benchmarks/layer.py); divide by the step count for per-step numbers.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import adaptive_moe as am
from benchmarks.layer import FFNS, SHAPES, skew_router


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="fine256", choices=sorted(SHAPES))
    p.add_argument("--kernel", default="scatter")
    p.add_argument("--ffn", default="gelu", choices=sorted(FFNS))
    p.add_argument("--routing", default="balanced", choices=("balanced", "skew"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--router", default="float32", help="router_matmul_dtype")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    t, d, h, e, k = SHAPES[args.shape]
    glu, activation = FFNS[args.ffn]
    torch.manual_seed(0)
    layer = am.MoELayer(
        d, h, e, k, glu=glu, activation=activation, dtype=torch.bfloat16, device="cuda",
        router_matmul_dtype=args.router,
    )  # fmt: skip
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if args.routing == "skew":
        x = skew_router(layer, x, k)
    gy = torch.randn_like(x)
    strategy = None if args.kernel == "default" else am.Strategy(kernel=args.kernel)
    params = [x, *layer.parameters()]

    def step() -> None:
        for q in params:
            q.grad = None
        layer(x, strategy=strategy).backward(gy)

    for _ in range(3):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(args.steps):
        step()
    end.record()
    end.synchronize()
    wall = start.elapsed_time(end) / args.steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / 1e3 / args.steps
    print(
        f"{args.shape} {args.ffn} {args.routing} {args.kernel} router {args.router}: "
        f"{args.steps} steps, {wall:.2f} ms per step, device busy {busy:.2f} ms per step"
    )
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()

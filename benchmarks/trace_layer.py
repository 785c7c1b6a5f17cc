"""Where one MoE layer step spends its time: a torch.profiler summary of forward +
backward on one GPU (top operators by device time), for finding overheads.

    python -m benchmarks.trace_layer --shape fine256 --kernel scatter [--ffn swiglu]
        [--routing skew] [--router bfloat16] [--master fp32] [--peer grouped_mm]
        [--sort cpu] [--compile-experts]

``--kernel default`` runs the layer with no strategy (the zero-configuration path).
``--master fp32``: fp32 weights and inputs under ``torch.autocast(bf16)``, as the trainer
runs. ``--peer grouped_mm``: trace ``benchmarks/train_step.py``'s plain baseline MoE FFN
(SwiGLU) with the layer's weights instead of the layer. ``--compile-experts``: the layer
built with ``compile_experts="inductor"``. Besides the table it prints the
host time per step (issuing the steps without waiting for the device), the device busy
time and the kernel launches per step: a host time above the busy time means the
device waits for the host.

Device times are totals over ``--steps`` steps (gradients cleared before each, as in
benchmarks/layer.py); divide by the step count for per-step numbers.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import adaptive_moe as am
from benchmarks.layer import FFNS, SHAPES, grouped_mm_twin, skew_router


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="fine256", choices=sorted(SHAPES))
    p.add_argument("--kernel", default="scatter")
    p.add_argument("--ffn", default="gelu", choices=sorted(FFNS))
    p.add_argument("--routing", default="balanced", choices=("balanced", "skew"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--router", default="float32", help="router_matmul_dtype")
    p.add_argument("--master", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--peer", default="", choices=("", "grouped_mm"))
    p.add_argument("--sort", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--compile-experts", action="store_true",
                   help="build the layer with compile_experts='inductor'")  # fmt: skip
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    t, d, h, e, k = SHAPES[args.shape]
    glu, activation = FFNS[args.ffn]
    torch.manual_seed(0)
    dtype = torch.float32 if args.master == "fp32" else torch.bfloat16
    layer = am.MoELayer(
        d, h, e, k, glu=glu, activation=activation, dtype=dtype, device="cuda",
        router_matmul_dtype=args.router,
        compile_experts="inductor" if args.compile_experts else None,
    )  # fmt: skip
    x = torch.randn(t, d, device="cuda", dtype=dtype, requires_grad=True)
    if args.routing == "skew":
        x = skew_router(layer, x, k)
    gy = torch.randn_like(x)
    strategy = None if args.kernel == "default" else am.Strategy(kernel=args.kernel)
    module, forward = layer, lambda: layer(x, strategy=strategy)
    if args.peer:
        module = grouped_mm_twin(layer, "cuda")
        forward = lambda: module(x.unsqueeze(0)).squeeze(0)
    params = [x, *module.parameters()]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.master == "fp32")

    def step() -> None:
        for q in params:
            q.grad = None
        with autocast:
            y = forward()
        y.backward(gy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    host = (time.perf_counter() - started) * 1e3 / args.steps
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
    launches = sum(e.count for e in kernels) / args.steps
    what = f"peer {args.peer}" if args.peer else f"{args.kernel} router {args.router}"
    what += " compile_experts" if args.compile_experts and not args.peer else ""
    print(
        f"{args.shape} {args.ffn} {args.routing} {what}, master {args.master}: "
        f"{args.steps} steps, {wall:.2f} ms per step, host {host:.2f} ms per step, "
        f"device busy {busy:.2f} ms per step, {launches:.0f} kernels per step"
    )
    sort = "cpu_time_total" if args.sort == "cpu" else "cuda_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))


if __name__ == "__main__":
    main()

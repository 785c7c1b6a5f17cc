"""Measure the kernel profile of this device for ``adaptive-moe plan --kernel-profile``.

    python -m benchmarks.kernel_profile --d-model 2048 --d-ff 1024 --experts 64 \
        --worlds 8,16,32,64,128,256,512,1024,2048 --out profiles/kernels-nvidia-h200-bf16.json

The grid's hidden sizes and expert counts default to what the strategies of ``--worlds``
compute with (``planning.kernel_profile.needed_shapes``); ``--hidden`` / ``--experts-grid``
pick a subset (the profile interpolates between them). Kernels are measured one after
another and the file is rewritten after each, so a run stopped by a time limit keeps
the kernels it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from adaptive_moe.planning.kernel_profile import (
    KernelProfile,
    measure_kernel_profile,
    needed_shapes,
)
from adaptive_moe.runtime.experts.kernels import available_kernels


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, required=True)
    p.add_argument("--d-ff", type=int, required=True)
    p.add_argument("--experts", type=int, required=True)
    p.add_argument("--worlds", type=_ints, default=(8, 16, 32, 64, 128, 256, 512, 1024, 2048))
    p.add_argument("--hidden", type=_ints, default=None, help="hidden sizes (default: needed)")
    p.add_argument("--experts-grid", type=_ints, default=None, help="expert counts")
    p.add_argument("--rows", type=_ints, default=(1, 16, 256, 4096, 32768))
    p.add_argument("--kernels", default=None, help="comma-separated, measured in this order")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--no-glu", action="store_true")
    p.add_argument("--max-total-rows", type=int, default=1 << 18)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--statistic",
        choices=("median", "min"),
        default="median",
        help="min on a machine shared with other work",
    )
    p.add_argument("--out", required=True)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hidden, experts = needed_shapes(args.experts, args.d_ff, args.worlds)
    hidden = args.hidden or hidden
    experts = args.experts_grid or experts
    kernels = args.kernels.split(",") if args.kernels else None
    if kernels is None:  # every kernel usable here for every hidden size
        usable = [
            set(
                available_kernels(
                    device, getattr(torch, args.dtype), d_model=args.d_model, hidden=h
                )
            )
            for h in hidden
        ]
        kernels = [
            k for k in ("grouped_mm", "bmm", "loop", "scatter") if all(k in u for u in usable)
        ]
    merged: KernelProfile | None = None
    for k in kernels:
        t0 = time.time()
        prof = measure_kernel_profile(
            args.d_model,
            hidden,
            experts,
            args.rows,
            glu=not args.no_glu,
            dtype=args.dtype,
            device=device,
            kernels=[k],
            max_total_rows=args.max_total_rows,
            warmup=args.warmup,
            repeats=args.repeats,
            statistic=args.statistic,
            progress=False,
        )
        if merged is None:
            merged = prof
        else:
            merged = dataclasses.replace(
                merged,
                kernels=(*merged.kernels, k),
                times_ms={**merged.times_ms, k: prof.times_ms[k]},
            )
        merged.save(args.out)
        print(f"{k}: {time.time() - t0:.1f} s, saved {args.out}", flush=True)
    assert merged is not None
    print(
        f"{merged.device}, {merged.dtype}, torch {merged.torch_version}: hidden {hidden}, "
        f"experts {experts}, rows {args.rows}"
    )
    for k in merged.kernels:
        for h, grid in zip(hidden, merged.times_ms[k]):
            for n, line in zip(experts, grid):
                print(f"{k:>10} h={h:<5} experts={n:<3} " + " ".join(f"{t:8.3f}" for t in line))


if __name__ == "__main__":
    main()

"""Where one MoE layer step spends its time: a torch.profiler summary of forward +
backward on one GPU (top operators by device time), for finding overheads.

    python -m benchmarks.trace_layer --shape fine256 --kernel scatter
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

import adaptive_moe as am
from benchmarks.layer import SHAPES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="fine256", choices=sorted(SHAPES))
    p.add_argument("--kernel", default="scatter")
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    t, d, h, e, k = SHAPES[args.shape]
    layer = am.MoELayer(
        d, h, e, k, glu=False, activation="gelu", dtype=torch.bfloat16, device="cuda"
    )
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn_like(x)
    strategy = am.Strategy(kernel=args.kernel)
    for _ in range(3):
        layer(x, strategy=strategy).backward(gy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            layer(x, strategy=strategy).backward(gy)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()

"""Grouped-query attention on CUDA: ``enable_gqa=True`` vs widening k and v first.

``adaptive_moe.training.model.Attention`` widens k/v itself in fp32 (torch's fused SDPA kernels
broadcast kv heads only in 16 bits, so fp32 with ``enable_gqa`` runs the math kernel) and
passes ``enable_gqa`` in 16 bits. This times both ways, forward + backward of causal SDPA
(including the widening), and the extra memory each allocates.

    python -m benchmarks.attention_gqa                      # mixtral-like: B4 S2048 H16 kv4
    python -m benchmarks.attention_gqa --batch 1 --seq 8192
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

MIB = float(1 << 20)


def _step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, widen: bool) -> None:
    if widen:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not widen)
    y.backward(torch.ones_like(y))


def measure(shape: tuple[int, int, int, int, int], dtype: torch.dtype, widen: bool) -> tuple:
    b, s, h, kv, d = shape
    q = torch.randn(b, h, s, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(b, kv, s, d, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(b, kv, s, d, device="cuda", dtype=dtype, requires_grad=True)
    ms = do_bench(lambda: _step(q, k, v, widen))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(q, k, v, widen)
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / MIB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs CUDA")
    shape = (args.batch, args.seq, args.heads, args.kv_heads, args.head_dim)
    print(f"{torch.cuda.get_device_name()}, B S H H_kv D = {shape}, fwd+bwd")
    print("| dtype | enable_gqa | widened k/v |")
    print("|---|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        cells = []
        for widen in (False, True):
            ms, mib = measure(shape, dtype, widen)
            cells.append(f"{ms:.2f} ms, {mib:.0f} MiB")
        print(f"| {str(dtype).removeprefix('torch.')} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tile-config sweep of the scatter kernels on the layer's own GEMMs, one GPU, bf16.

For each shape (T, d, h, E, k) of benchmarks/layer.py the plain-FFN layer runs six
grouped GEMMs per step; each is timed here with every candidate tile config and next to
its cuBLAS twin on balanced, already-grouped rows (torch.bmm, same FLOPs):

    fwd1   x [T, d] token space  -> hcat [M, h] grouped        scatter_gemm
    fwd2   a [M, h] grouped      -> y [T*k, d] slot space      scatter_gemm
    dx2    dy [T*k, d] slots     -> da [M, h] grouped          scatter_gemm (trans_w)
    dx1    dh [M, h] grouped     -> dx [T*k, d] slot space     scatter_gemm (trans_w)
    dw2    dy^T a                -> [E, d, h]                  group_weight_grad
    dw1    dh^T x                -> [E, h, d]                  group_weight_grad

    python -m benchmarks.gemm_sweep [--shapes olmoe,fine256] [--routing balanced,skew]
        [--out sweep.json]

Prints per (shape, routing, GEMM) the best config's ms and TFLOP/s, the autotuned
launcher's ms, and the bmm twin's ms.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
from triton.testing import do_bench

from adaptive_moe.runtime.experts.grouping import group_by_expert
from benchmarks.layer import SHAPES, SKEW_SHARE
from csrc_triton import scatter_gemm as sg


def _cfg(bm, bn, bk, warps, stages, group_key="GROUP_M", **flags):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, group_key: 8, **flags},
                         num_warps=warps, num_stages=stages)  # fmt: skip


GEMM_CANDIDATES = [
    _cfg(*c)
    for c in [
        (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
        (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (256, 128, 64, 8, 3),
        (64, 256, 64, 4, 3), (128, 64, 64, 4, 4), (64, 128, 128, 4, 3), (64, 64, 64, 4, 4),
        (64, 256, 64, 8, 4),
    ]
]  # fmt: skip
WGRAD_CANDIDATES = [
    _cfg(*c, group_key="GROUP_N", PREFETCH=p, TRANS_DY=t)
    for c in [(64, 128, 128, 8, 3), (32, 128, 128, 4, 4), (64, 128, 128, 8, 4)]
    for p in (False, True)
    for t in (False, True)
]  # fmt: skip


def routing(t, e, k, skew, device):
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(t, e, device=device, generator=g)
    if skew:
        logits[torch.rand(t, device=device, generator=g) < SKEW_SHARE, 0] = 1e4
    ids = torch.softmax(logits, -1).topk(k, -1).indices  # [T, k]
    return group_by_expert(ids.flatten(), e, k)


def problems(shape, skew, device):
    t, d, h, e, k = shape
    rows = routing(t, e, k, skew, device)
    m, n_slots = rows.num_rows, t * k
    g = torch.Generator(device=device).manual_seed(1)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, device=device, generator=g) * scale).bfloat16()

    x, a, dh = rnd(t, d), rnd(m, h), rnd(m, h)
    dy = rnd(n_slots, d)
    w1, w2 = rnd(e, h, d, scale=d**-0.5), rnd(e, d, h, scale=h**-0.5)
    route = (rows.sorted_slots, rows.offsets)
    gemm = dict(num_slots=n_slots)
    out = {
        "fwd1": ("gemm", (x, w1, None, *route), dict(gemm, fan_out=k, x_grouped=False,
                                                      y_grouped=True)),
        "fwd2": ("gemm", (a, w2, None, *route), dict(gemm, fan_out=k, x_grouped=True,
                                                      y_grouped=False)),
        "dx2": ("gemm", (dy, w2, None, *route), dict(gemm, fan_out=1, x_grouped=False,
                                                      y_grouped=True, trans_w=True)),
        "dx1": ("gemm", (dh, w1, None, *route), dict(gemm, fan_out=1, x_grouped=True,
                                                      y_grouped=False, trans_w=True)),
        "dw2": ("wgrad", (dy, a, *route), dict(fan_out=k, dy_grouped=False, x_grouped=True)),
        "dw1": ("wgrad", (dh, x, *route), dict(fan_out=k, dy_grouped=True, x_grouped=False)),
        # the same two with both operands already grouped (no gather): the gather's cost
        "dw2c": ("wgrad", (dy[rows.sorted_slots], a, *route),
                 dict(fan_out=k, dy_grouped=True, x_grouped=True)),
        "dw1c": ("wgrad", (dh, x[rows.input_rows], *route),
                 dict(fan_out=k, dy_grouped=True, x_grouped=True)),
    }  # fmt: skip
    # dw2's dy is slot space with fan_out 1 semantics for dy but a is grouped: fan_out only
    # matters for a token-space x, so k is right for dw1 and harmless for dw2.
    flops = 2 * m * d * h
    return rows, out, flops


def bmm_twin_ms(shape, device):
    t, d, h, e, k = shape
    rows = t * k // e
    g = torch.Generator(device=device).manual_seed(2)
    xa = torch.randn(e, rows, d, device=device, generator=g).bfloat16()
    wb = torch.randn(e, d, h, device=device, generator=g).bfloat16()
    return do_bench(lambda: torch.bmm(xa, wb), warmup=25, rep=100, return_mode="median")


def _time(fn, pos, kw, cfg) -> float:
    fn(*pos, **kw, config=cfg)  # compiles (or autotunes) outside the timing
    torch.cuda.synchronize()
    return do_bench(lambda: fn(*pos, **kw, config=cfg), warmup=10, rep=60, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="olmoe,fine256,mixtral")
    p.add_argument("--routing", default="balanced,skew")
    p.add_argument("--gemms", default="fwd1,fwd2,dx2,dx1,dw2,dw1,dw2c,dw1c")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    results = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        twin = bmm_twin_ms(shape, device)
        for routing_name in args.routing.split(","):
            rows, probs, flops = problems(shape, routing_name == "skew", device)
            for gemm_name in args.gemms.split(","):
                kind, pos, kw = probs[gemm_name]
                fn = sg.scatter_gemm if kind == "gemm" else sg.group_weight_grad
                cands = GEMM_CANDIDATES if kind == "gemm" else WGRAD_CANDIDATES
                timings = {}
                for cfg in cands:
                    try:
                        timings[str(cfg)] = _time(fn, pos, kw, cfg)
                    except triton.runtime.errors.OutOfResources:
                        continue
                tuned = _time(fn, pos, kw, None)
                best = min(timings, key=timings.get)
                rec = {"shape": name, "routing": routing_name, "gemm": gemm_name,
                       "max_rows": max(rows.counts), "tuned_ms": tuned, "best_ms": timings[best],
                       "best": best, "bmm_ms": twin, "tflops_best": flops / timings[best] / 1e9,
                       "all": timings}  # fmt: skip
                results.append(rec)
                print(f"{name:8s} {routing_name:8s} {gemm_name}: tuned {tuned:.3f} ms, best "
                      f"{timings[best]:.3f} ms ({rec['tflops_best']:.0f} TFLOP/s) {best}; "
                      f"bmm {twin:.3f} ms", flush=True)  # fmt: skip
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

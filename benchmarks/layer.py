"""Whole MoE layer, forward + backward, on one GPU: adaptive_moe's MoELayer with each
expert kernel against a naive per-expert loop (the transformers-style reference), on the
three shapes of shared/reference/peer-numbers.md, bf16, random routing.

    python benchmarks/layer.py [--shapes mixtral,olmoe,fine256] [--out results.json]

FLOPs counted as in peer-numbers.md: 12 * T * k * d * h (plain GELU FFN, fwd + bwd; the
router's 6 * T * d * E is added). Peak = extra memory allocated during one step beyond
what was allocated before it. Gradients are cleared before every timed call (a training
step zeroes them), so no time goes to accumulating into old gradients.
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch
import torch.nn.functional as F

import adaptive_moe as am

SHAPES = {  # name: (T, d, h, E, k)
    "mixtral": (8192, 4096, 14336, 8, 2),
    "olmoe": (16384, 2048, 1024, 64, 8),
    "fine256": (8192, 2048, 512, 256, 8),
}


def naive_layer(x, router_w, w1, w2, k):
    """Per-expert loop: route, then for each expert gather its tokens, run, scatter-add."""
    probs = torch.softmax(F.linear(x.float(), router_w), dim=-1)
    gates, ids = probs.topk(k, dim=-1)
    gates = (gates / gates.sum(-1, keepdim=True)).to(x.dtype)
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = F.gelu(x[tok] @ w1[e].T)
        out.index_add_(0, tok, (h @ w2[e].T) * gates[tok, slot, None])
    return out


def measure(fn, device, grads):
    """Median ms of ``fn`` (gradients in ``grads`` cleared before every call, as a
    training step's zero_grad does) and its peak extra memory in GiB."""
    from triton.testing import do_bench

    fn()  # warm-up: compiles kernels, fills caches
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    ms = do_bench(fn, warmup=50, rep=400, grad_to_none=grads, return_mode="median")
    return ms, peak


def run_shape(name, kernels, with_naive, device):
    t, d, h, e, k = SHAPES[name]
    torch.manual_seed(0)
    layer = am.MoELayer(
        d, h, e, k, glu=False, activation="gelu", dtype=torch.bfloat16, device=device
    )
    x = torch.randn(t, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn_like(x)
    flops = 12 * t * k * d * h + 6 * t * d * e
    rows = []
    for kernel in kernels:
        strategy = am.Strategy(kernel=kernel)
        if strategy not in layer.strategies():
            rows.append({"shape": name, "variant": f"MoELayer[{kernel}]", "skipped": "unavailable"})
            continue

        def step(strategy=strategy):
            layer(x, strategy=strategy).backward(gy)

        ms, peak = measure(step, device, [x, *layer.parameters()])
        rows.append(
            {
                "shape": name,
                "variant": f"MoELayer[{kernel}]",
                "ms": ms,
                "tflops": flops / ms / 1e9,
                "peak_gib": peak,
            }
        )
    if with_naive:
        w1 = layer.experts.up_proj.detach().requires_grad_(True)
        w2 = layer.experts.down_proj.detach().requires_grad_(True)
        rw = layer.router.weight.detach().requires_grad_(True)

        def naive_step():
            naive_layer(x, rw, w1, w2, k).backward(gy)

        ms, peak = measure(naive_step, device, [x, w1, w2, rw])
        rows.append(
            {
                "shape": name,
                "variant": "naive per-expert loop",
                "ms": ms,
                "tflops": flops / ms / 1e9,
                "peak_gib": peak,
            }
        )
    else:
        rows.append({"shape": name, "variant": "naive per-expert loop", "skipped": "minutes"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="mixtral,olmoe,fine256")
    parser.add_argument("--kernels", default="scatter,grouped_mm,bmm")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    device = torch.device("cuda")
    rows = []
    for name in args.shapes.split(","):
        rows += run_shape(name, args.kernels.split(","), name != "fine256", device)
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name(device)}, torch {torch.__version__}, bf16, fwd+bwd")
    print("| shape | variant | ms | TFLOP/s | peak extra GiB |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['shape']} | {r['variant']} | skipped ({r['skipped']}) | | |")
        else:
            print(
                f"| {r['shape']} | {r['variant']} | {r['ms']:.2f} | {r['tflops']:.0f} "
                f"| {r['peak_gib']:.2f} |"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""Whole MoE layer, forward + backward, on one GPU: adaptive_moe's MoELayer with each
expert kernel (and with no strategy at all: the zero-configuration default) against the
dense-GEMM ceilings measured in the same run, on the three shapes of
shared/reference/peer-numbers.md, bf16.

    python -m benchmarks.layer [--shapes mixtral,olmoe,fine256] [--ffn gelu,swiglu]
        [--routing balanced,skew] [--kernels scatter,grouped_mm,bmm,default,counted]
        [--router float32,bfloat16] [--naive] [--peers scattermoe,grouped_mm,grouped_mm_compiled]
        [--master bf16|fp32] [--compile-experts] [--out results.json]

Variants: a kernel name forces that kernel; ``default`` runs with no strategy (the
kernel measured on the first call, then chosen from the previous forward's workload,
so the forward groups rows on the device without a host sync); ``counted`` is the
default with that lagged workload cleared before every step, i.e. the forward that
copies the counts to the host (what every forward did before). ``--router`` builds the
layer with each ``router_matmul_dtype``.

``--peers scattermoe`` adds ScatterMoE's ``MLP`` / ``GLUMLP`` (github.com/shawntan/scattermoe,
importable as ``scattermoe``; not part of this repository) on the same inputs, router
weights and expert weights, the router computed as the layer's (fp32 logits, softmax,
top-k, renormalised): the peer measured in the same process by the same method, so its
time and peak memory compare with this project's rows directly.

FLOPs: plain GELU FFN 12 * T * k * d * h, SwiGLU 18 * T * k * d * h (fwd + bwd), plus the
router's 6 * T * d * E. Peak = extra memory allocated during one step beyond what was
allocated before it. Saved = the activation memory a forward leaves for its backward
(the distinct storages autograd saves, parameters and the input x left out): what a
deep model holds per MoE layer between its forward and its backward. Gradients are
cleared before every timed call (a training step zeroes them), so no time goes to
accumulating into old gradients.

``--peers grouped_mm`` adds the plain baseline of ``benchmarks/train_step.py`` part (b): its
MoE FFN (fp32 router, experts as two ``torch._grouped_mm`` over expert-sorted, aligned
rows) with this layer's weights; ``grouped_mm_compiled`` the same module under
``torch.compile`` (as the baseline's blocks are compiled there).

``--compile-experts`` adds the ``default`` and ``grouped_mm`` rows of a layer built with
``compile_experts="inductor"`` (same weights): the one-process training forward's
grouping, grouped_mm experts and combine as one compiled graph.

``--master fp32`` runs what the trainer runs under ``--precision bf16``: fp32 weights and
fp32 inputs, each step under ``torch.autocast(bf16)``, so every variant also pays for
casting its weights (the ceiling stays all-bf16).

Ceilings, measured in the same process (machines differ by up to ~20%, so only ratios
measured in one run compare):
    dense      one 8192^3 bf16 matmul, TFLOP/s
    bmm        the experts' GEMMs as torch.bmm on perfectly balanced, already-grouped rows
               [E, T*k/E, d] with the activation between, fwd + bwd, no routing, gather,
               scatter or combine (peer-numbers.md's "balanced bmm")
Every row prints ms, TFLOP/s, peak extra GiB and ``x bmm`` = ms / balanced-bmm ms.

Routing: ``balanced`` is the layer's own router on Gaussian inputs (softmax, top-k);
``skew`` adds one direction to every input and to expert 0's router row, scaled so
that ~96% of tokens have expert 0 among their top-k (the router still runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import warnings

import torch
import torch.nn.functional as F

import adaptive_moe as am
from adaptive_moe.runtime.policy.lagged import LaggedWorkload

SHAPES = {  # name: (T, d, h, E, k)
    "mixtral": (8192, 4096, 14336, 8, 2),
    "olmoe": (16384, 2048, 1024, 64, 8),
    "fine256": (8192, 2048, 512, 256, 8),
    "gpu1b": (8192, 1024, 2048, 16, 2),  # the gpu-1b training preset's MoE blocks
}
FFNS = {"gelu": (False, "gelu"), "swiglu": (True, "silu")}  # name: (glu, activation)
SKEW_SHARE = 0.96  # share of tokens with expert 0 in their top-k under --routing skew


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


def _peak_gib(fn, device) -> float:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def measure(fn, device, grads):
    """(median ms, peak GiB, peak GiB with fresh gradients) of ``fn``.

    Time: gradients in ``grads`` cleared before every call, as a training step's
    zero_grad does. Peak: extra memory of one step while the previous step's gradients
    are still allocated (peer-numbers.md's method: what the step itself needs), and the
    same with the gradients freed first (the step then also allocates them)."""
    from triton.testing import do_bench

    for _ in range(3):  # warm-up: compiles kernels, autotunes, settles the layer's choice
        fn()
    peak = _peak_gib(fn, device)
    for t in grads:
        t.grad = None
    fresh = _peak_gib(fn, device)
    ms = do_bench(fn, warmup=50, rep=400, grad_to_none=grads, return_mode="median")
    return ms, peak, fresh


def dense_tflops(device) -> float:
    """bf16 8192^3 matmul rate on random data (the machine's dense ceiling)."""
    from triton.testing import do_bench

    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(8192, 8192, device=device, generator=g).bfloat16() for _ in range(2))
    ms = do_bench(lambda: a @ b, warmup=50, rep=400, return_mode="median")
    return 2 * 8192**3 / ms / 1e9


def balanced_bmm_ms(shape, glu, activation, device) -> float:
    """fwd + bwd of the experts' GEMMs on balanced, already-grouped rows (see docstring)."""
    t, d, h, e, k = shape
    rows = t * k // e
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*s, scale=1.0):
        x = torch.randn(*s, device=device, generator=g) * scale
        return x.bfloat16().requires_grad_()

    x = rnd(e, rows, d)
    w1 = rnd(e, d, 2 * h if glu else h, scale=d**-0.5)
    w2 = rnd(e, h, d, scale=h**-0.5)
    gy = torch.randn(e, rows, d, device=device, generator=g).bfloat16()
    act = F.silu if activation == "silu" else F.gelu

    def step():
        hcat = torch.bmm(x, w1)
        a = act(hcat[..., :h]) * hcat[..., h:] if glu else act(hcat)
        torch.bmm(a, w2).backward(gy)

    return measure(step, device, [x, w1, w2])[0]


def skew_router(layer, x, k):
    """Bias the layer's router towards expert 0 through one input direction so that
    ~SKEW_SHARE of the tokens pick it; returns the shifted inputs (bisection on scale)."""
    g = torch.Generator(device=x.device).manual_seed(1)
    u = torch.randn(x.shape[1], device=x.device, generator=g)
    u = u / u.norm()
    xs = (x.float() + 2.0 * u).to(x.dtype)
    w = layer.router.weight
    base = w.detach().clone()
    lo, hi = 0.0, 64.0
    with torch.no_grad():
        for _ in range(30):
            mid = (lo + hi) / 2
            w.copy_(base)
            w[0] += mid * u
            ids = F.linear(xs.float(), w).topk(k, dim=-1).indices
            share = (ids == 0).any(-1).float().mean().item()
            lo, hi = (lo, mid) if share >= SKEW_SHARE else (mid, hi)
        w.copy_(base)
        w[0] += hi * u
    return xs.detach().requires_grad_()


def run_shape(
    name, ffn, routing, kernels, with_naive, device, ceiling_ms, router="float32", peers=(),
    master="bf16", compile_experts=False,
):  # fmt: skip
    t, d, h, e, k = SHAPES[name]
    glu, activation = FFNS[ffn]
    dtype = torch.float32 if master == "fp32" else torch.bfloat16

    def build(**options):
        torch.manual_seed(0)  # the same weights for every layer built here
        return am.MoELayer(
            d, h, e, k, glu=glu, activation=activation, dtype=dtype, device=device,
            router_matmul_dtype=router, **options,
        )  # fmt: skip

    layer = build()
    x = torch.randn(t, d, device=device, dtype=dtype, requires_grad=True)
    if routing == "skew":
        x = skew_router(layer, x, k)
    gy = torch.randn_like(x)
    flops = (18 if glu else 12) * t * k * d * h + 6 * t * d * e
    base = {"shape": name, "ffn": ffn, "routing": routing, "router": router, "master": master}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=master == "fp32")

    def row(variant, ms, peak, fresh, **extra):
        return {**base, "variant": variant, "ms": ms, "tflops": flops / ms / 1e9,
                "peak_gib": peak, "peak_fresh_gib": fresh, "x_bmm": ms / ceiling_ms,
                **extra}  # fmt: skip

    rows = _layer_rows(layer, kernels, x, gy, autocast, device, row, base, router)
    if compile_experts:
        compiled = build(compile_experts="inductor")
        with autocast:  # the same function as the eager layer (training forwards)
            ours = layer(x, strategy=am.Strategy(kernel="grouped_mm")).detach().float()
            theirs = compiled(x, strategy=am.Strategy(kernel="grouped_mm")).detach().float()
        rel = float((theirs - ours).norm() / ours.norm())
        found = _layer_rows(
            compiled,
            [k for k in kernels if k in ("default", "grouped_mm")],
            x,
            gy,
            autocast,
            device,
            row,
            base,
            router,
            " compile_experts",
        )
        rows += [{**r, "rel_err_vs_eager": rel} for r in found]  # fmt: skip
        del compiled
    if with_naive and not glu:
        w1 = layer.experts.up_proj.detach().requires_grad_(True)
        w2 = layer.experts.down_proj.detach().requires_grad_(True)
        rw = layer.router.weight.detach().requires_grad_(True)

        def naive_step():
            naive_layer(x, rw, w1, w2, k).backward(gy)

        rows.append(row("naive per-expert loop", *measure(naive_step, device, [x, w1, w2, rw])))
    for peer in peers:
        if peer.startswith("grouped_mm"):
            rows.append(_grouped_mm_row(peer, layer, x, gy, autocast, device, row))
        elif master == "fp32":
            rows.append({**base, "variant": peer, "skipped": "bf16 weights only (--master)"})
        else:
            rows.append(_peer_row(peer, layer, x, gy, k, device, row, base))
    return rows


def _layer_rows(layer, kernels, x, gy, autocast, device, row, base, router, suffix=""):
    """One row per forced kernel (or ``default`` / ``counted``) of ``layer``."""
    rows = []
    for kernel in kernels:
        strategy = None if kernel in ("default", "counted") else am.Strategy(kernel=kernel)
        if strategy is not None and strategy not in layer.strategies():
            rows.append({**base, "variant": f"MoELayer[{kernel}]", "skipped": "unavailable"})
            continue

        def step(strategy=strategy, counted=kernel == "counted"):
            if counted:  # no previous workload: the forward counts on the host
                layer.policy.workload = LaggedWorkload()
            with autocast:
                y = layer(x, strategy=strategy)
            y.backward(gy)

        ms, peak, fresh = measure(step, device, [x, *layer.parameters()])
        with autocast:
            extra = {"saved_gib": saved_gib(layer, lambda s=strategy: layer(x, strategy=s), [x])}
        label = f"MoELayer[{kernel}]"
        if strategy is None:
            extra["chose"] = str(layer.last_strategy.kernel)
            label = f"MoELayer[{kernel} -> {extra['chose']}]"
        if router != "float32":
            label += f" {router} router"
        rows.append(row(label + suffix, ms, peak, fresh, **extra))
    return rows


def grouped_mm_twin(layer, device) -> torch.nn.Module:
    """train_step's plain baseline MoE FFN (SwiGLU) holding the layer's weights."""
    from benchmarks.train_step import GroupedMoE

    cfg = layer.expert_cfg
    moe = GroupedMoE(cfg.d_model, cfg.d_ff, cfg.num_experts, layer.router_cfg.top_k)
    moe = moe.to(device=device, dtype=layer.experts.down_proj.dtype)
    with torch.no_grad():  # same [E, 2h, d] (gate rows, then up) and [E, d, h] layouts
        moe.router.weight.copy_(layer.router.weight)
        moe.w1.copy_(layer.experts.w1)
        moe.w2.copy_(layer.experts.down_proj)
    return moe


def _grouped_mm_row(peer, layer, x, gy, autocast, device, row):
    """train_step's plain baseline MoE FFN with the layer's weights (module docstring)."""
    cfg = layer.expert_cfg
    if not cfg.glu or cfg.activation != "silu":
        return {"shape": "-", "variant": peer, "skipped": "SwiGLU only"}
    moe = grouped_mm_twin(layer, device)
    fn = torch.compile(moe) if peer == "grouped_mm_compiled" else moe

    def forward():
        with autocast:
            return fn(x.unsqueeze(0)).squeeze(0)  # [T, d]

    with torch.no_grad():  # the same function as the layer, or the row means nothing
        with autocast:
            ours = layer(x).float()
        rel = float((forward().float() - ours).norm() / ours.norm())

    def step():
        forward().backward(gy)

    ms, peak, fresh = measure(step, device, [x, *moe.parameters()])
    return row(f"plain {peer} (train_step baseline)", ms, peak, fresh, rel_err_vs_layer=rel)


def _peer_row(peer, layer, x, gy, k, device, row, base):
    """The peer's expert MLP behind the layer's router (module docstring, ``--peers``)."""
    if peer != "scattermoe":
        raise ValueError(f"--peers: unknown peer {peer!r}; valid: scattermoe")
    try:
        from scattermoe.mlp import GLUMLP, MLP
    except ImportError:
        return {**base, "variant": "ScatterMoE", "skipped": "scattermoe not importable"}
    cfg = layer.expert_cfg
    e, d, h = cfg.num_experts, cfg.d_model, cfg.d_ff
    act = torch.nn.SiLU() if cfg.activation == "silu" else torch.nn.GELU()
    cls = GLUMLP if cfg.glu else MLP
    mlp = cls(d, h, e, k, activation=act).to(device=device, dtype=x.dtype)
    with torch.no_grad():  # ScatterMoE's weights are [E, out, in], like ours
        w1 = layer.experts.w1
        if cfg.glu:  # ours: gate rows then up rows; GLUMLP: act(second half) * first half
            w1 = torch.cat([w1[:, h:], w1[:, :h]], dim=1)
        mlp.experts.weight.copy_(w1)
        mlp.output_experts.weight.copy_(layer.experts.down_proj)
    rw = layer.router.weight.detach().clone().requires_grad_(True)

    def forward():
        probs = F.linear(x.float(), rw).softmax(-1)  # [T, E] fp32
        gates, ids = probs.topk(k, dim=-1)
        return mlp(x, (gates / gates.sum(-1, keepdim=True)).to(x.dtype), ids)

    def step():
        forward().backward(gy)

    with torch.no_grad():  # the same function as the layer, or the row means nothing
        probs = F.linear(x.float(), rw).softmax(-1)
        gates, ids = probs.topk(k, dim=-1)
        ours = layer(x).float()
        diff = mlp(x, (gates / gates.sum(-1, keepdim=True)).to(x.dtype), ids).float() - ours
        rel = float(diff.norm() / ours.norm())
    ms, peak, fresh = measure(step, device, [x, rw, *mlp.parameters()])
    saved = saved_gib(mlp, forward, [x, rw])
    return row("ScatterMoE (same router)", ms, peak, fresh, rel_err_vs_layer=rel, saved_gib=saved)


def saved_gib(module, forward, exclude) -> float:
    """Activation memory one ``forward()`` leaves for backward (module docstring)."""
    from benchmarks.calc_memory_check import saved_bytes

    return saved_bytes(module, forward, exclude) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="mixtral,olmoe,fine256")
    parser.add_argument("--ffn", default="gelu,swiglu", help="gelu (plain FFN), swiglu")
    parser.add_argument("--routing", default="balanced", help="balanced, skew")
    parser.add_argument("--kernels", default="default,scatter,grouped_mm,bmm",
                        help="kernels to force; 'default' runs with no strategy")  # fmt: skip
    parser.add_argument("--router", default="float32", help="router_matmul_dtype values")
    parser.add_argument("--naive", action="store_true", help="also the per-expert loop")
    parser.add_argument(
        "--peers",
        default="",
        help="peer layers to run too: scattermoe, grouped_mm, grouped_mm_compiled",
    )
    parser.add_argument(
        "--master",
        default="bf16",
        choices=("bf16", "fp32"),
        help="fp32: fp32 weights and inputs under torch.autocast(bf16)",
    )
    parser.add_argument(
        "--compile-experts",
        action="store_true",
        help="also the default and grouped_mm variants of a layer built with "
        "compile_experts='inductor'",
    )
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    device = torch.device("cuda")
    dense = dense_tflops(device)
    print(f"dense 8192^3 bf16 matmul: {dense:.0f} TFLOP/s", flush=True)
    rows = []
    for name in args.shapes.split(","):
        for ffn in args.ffn.split(","):
            glu, activation = FFNS[ffn]
            ceiling = balanced_bmm_ms(SHAPES[name], glu, activation, device)
            t, d, h, _, k = SHAPES[name]
            flops = (18 if glu else 12) * t * k * d * h
            rows.append({"shape": name, "ffn": ffn, "routing": "-", "variant": "balanced bmm",
                         "ms": ceiling, "tflops": flops / ceiling / 1e9, "peak_gib": 0.0,
                         "peak_fresh_gib": 0.0, "x_bmm": 1.0})  # fmt: skip
            for routing in args.routing.split(","):
                for router in args.router.split(","):
                    new = run_shape(name, ffn, routing, args.kernels.split(","),
                                    args.naive and name != "fine256", device, ceiling,
                                    router, [p for p in args.peers.split(",") if p],
                                    args.master, args.compile_experts)  # fmt: skip
                    rows += new
                    for r in new:
                        if "ms" in r:
                            print(f"  {name} {ffn} {routing} {r['variant']}: {r['ms']:.2f} ms,"
                                  f" {r['peak_gib']:.2f} GiB"
                                  + "".join(f" {k}={r[k]:.2e}" for k in r if k.startswith("rel")),
                                  flush=True)  # fmt: skip
                    torch.cuda.empty_cache()
    date = datetime.date.today().isoformat()
    print(f"\n{date}, {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
          f"bf16, fwd+bwd; dense 8192^3 matmul {dense:.0f} TFLOP/s")  # fmt: skip
    print("| shape | FFN | routing | variant | ms | TFLOP/s | peak GiB | (fresh grads) "
          "| saved GiB | x bmm |")  # fmt: skip
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        head = f"| {r['shape']} | {r['ffn']} | {r['routing']} | {r['variant']} "
        if "skipped" in r:
            print(head + f"| skipped ({r['skipped']}) | | | | | |")
        else:
            saved = f"{r['saved_gib']:.2f}" if "saved_gib" in r else ""
            print(head + f"| {r['ms']:.2f} | {r['tflops']:.0f} | {r['peak_gib']:.2f} "
                  f"| {r['peak_fresh_gib']:.2f} | {saved} | {r['x_bmm']:.2f} |")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": date, "device": torch.cuda.get_device_name(device),
                       "dense_tflops": dense, "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()

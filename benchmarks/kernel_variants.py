"""Issue 26's kernel variants on one GPU: correctness against float64, then time against
the cuBLAS ceiling, in one run (bf16, balanced routing).

    python -m benchmarks.kernel_variants [--shapes mixtral,olmoe,fine256]
        [--variants default,tma,persistent,tma_persistent,tma_persistent_ws] [--skip-timing]

(a) Correctness on a small shape: every GEMM variant (``default`` = the autotuned
    launcher, the rest ``scatter_gemm.GEMM_VARIANTS``) on the four scatter GEMMs of the
    MLP (fwd1, fwd2, dx2, dx1; see benchmarks/gemm_sweep.py) and the act_grad epilogue
    (GELU, SwiGLU) against float64 twins, outputs NaN-poisoned; the MLP with and without
    the fused activation backward (``fuse_act_grad``) against the float64 loop, output and
    gradients; the new variants' four GEMMs again on an odd shape; the router's
    tensor-core GEMMs against float64. PASS needs a relative error below 2e-2 (bf16).
(b) Timing per shape: each variant's four scatter GEMMs (ms, TFLOP/s) next to the
    balanced cuBLAS bmm of the same FLOPs, plus the two weight gradients (autotuned,
    shared by every variant): "6 GEMMs" / (6 x bmm) is the GEMMs' distance to the ceiling.
    Then dx2 with the act_grad epilogue against dx2 + the activation backward kernel;
    the whole Triton MLP forward + backward with and without ``fuse_act_grad`` (ms, peak
    MiB); the router GEMM forward + backward per ``matmul_dtype``, and the whole router
    with and without ``fused_select``; host microseconds per launcher call.
(c) Tables printed as it goes; a variant that fails to compile or run is reported and
    skipped. About 3-4 minutes on an H100 (compilation and autotuning are most of it).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
import triton
from triton.testing import do_bench

from adaptive_moe.core.config import RouterConfig
from adaptive_moe.runtime.experts import kernels
from adaptive_moe.runtime.experts.expert_variants import _scatter_mlp
from adaptive_moe.runtime.routing.router import Router
from adaptive_moe.runtime.routing.router_matmul import tensor_core_linear
from benchmarks.gemm_sweep import bmm_twin_ms, problems
from benchmarks.layer import SHAPES
from csrc_triton import elementwise as ew
from csrc_triton import scatter_gemm as sg

GEMMS = ("fwd1", "fwd2", "dx2", "dx1")
CHECK_SHAPES = {"small": (256, 512, 256, 8, 2), "odd": (333, 200, 104, 16, 3)}
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def variant_config(name: str) -> triton.Config | None:
    return None if name == "default" else sg.GEMM_VARIANTS[name]


def guarded(what: str, fn: Callable[[], object]) -> object | None:
    """fn(), or None after reporting why it failed (compile errors included)."""
    try:
        return fn()
    except Exception as err:  # a variant that does not compile is a result, not a crash
        first = (str(err).splitlines() or [""])[0][:200]
        log(f"FAILED {what}: {type(err).__name__}: {first}")
        return None


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error (norm); inf where ``got`` holds a NaN (poisoned rows never written)."""
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-300)).item()


def ms(fn: Callable[[], object]) -> float:
    fn()  # compiles / autotunes outside the timing
    torch.cuda.synchronize()
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


# ---------------------------------------------------------------- (a) correctness


def check_gemms(shape, variants, device, act_grad: bool = True) -> dict[str, str]:
    """{variant: 'ok max_err' | 'FAILED ...'} over the four GEMMs (and act_grad)."""
    _, probs, _ = problems(shape, False, device)
    status = {}
    for name in variants:
        worst, failed = 0.0, None
        for gemm in GEMMS:
            _, pos, kw = probs[gemm]
            x, w, _, slots, offsets = pos
            ref = kernels.scatter_gemm_torch(x.double(), w.double(), None, slots, offsets, **kw)
            out = torch.full(ref.shape, float("nan"), device=device, dtype=x.dtype)
            got = guarded(f"{name} {gemm}", functools.partial(
                sg.scatter_gemm, *pos, **kw, out=out, config=variant_config(name)))  # fmt: skip
            if got is None:
                failed = gemm
                break
            worst = max(worst, rel_err(got, ref))
        for glu, act in ((False, "gelu"), (True, "silu")) if act_grad else ():
            if failed:
                break
            err = guarded(f"{name} act_grad {act}",
                          functools.partial(act_grad_err, probs, glu, act, name))  # fmt: skip
            failed = None if err is not None else f"act_grad {act}"
            worst = max(worst, err or 0.0)
        status[name] = f"FAILED at {failed}" if failed else f"ok {worst:.1e}"
        ok = failed is None and worst < 2e-2
        log(f"check {shape} {name}: {'PASS' if ok else 'FAIL'} ({status[name]})")
    return status


def act_grad_err(probs, glu: bool, activation: str, variant: str) -> float:
    _, (dy, w2, _, slots, offsets), kw = probs["dx2"]
    m, h = slots.numel(), w2.shape[2]
    g = torch.Generator(device=dy.device).manual_seed(9)
    hcat = torch.randn(m, 2 * h if glu else h, device=dy.device, generator=g).bfloat16()
    d_a = kernels.scatter_gemm_torch(dy.double(), w2.double(), None, slots, offsets, **kw)
    h64 = hcat.double().requires_grad_()
    (ref,) = torch.autograd.grad(kernels.activation_torch(h64, glu=glu, activation=activation),
                                 h64, d_a)  # fmt: skip
    out = torch.full_like(hcat, float("nan"))
    got = sg.scatter_gemm(dy, w2, None, slots, offsets, **kw, out=out,
                          config=variant_config(variant),
                          act_grad=sg.ActGrad(hcat, glu, activation))  # fmt: skip
    return rel_err(got, ref)


def check_fused_mlp(shape, device) -> None:
    t, d, h, e, k = shape
    rows, _, _ = problems(shape, False, device)
    g = torch.Generator(device=device).manual_seed(4)
    for glu, act in ((False, "gelu"), (True, "silu")):
        params = [torch.randn(*s, device=device, generator=g, dtype=torch.float64) * sc
                  for s, sc in (((t, d), 1.0), ((e, 2 * h if glu else h, d), d**-0.5),
                                ((e, d, h), h**-0.5))]  # fmt: skip
        dy = torch.randn(t * k, d, device=device, generator=g, dtype=torch.float64)
        p64 = [p.requires_grad_() for p in params]
        ref = kernels.expert_mlp(p64[0], rows, p64[1], None, p64[2], glu=glu, activation=act,
                                 kernel="loop")  # fmt: skip
        ref_grads = torch.autograd.grad(ref, p64, dy)
        for fused in (False, True):
            pb = [p.detach().bfloat16().requires_grad_() for p in params]
            run = functools.partial(_mlp_outputs, pb, rows, dy.bfloat16(), glu, act, fused)
            outs = guarded(f"MLP glu={glu} fuse_act_grad={fused}", run)
            if outs is None:
                continue
            errs = [rel_err(a, b) for a, b in zip(outs, [ref, *ref_grads])]
            ok = max(errs) < 3e-2
            log(f"check {shape} MLP glu={glu} fuse_act_grad={fused}: "
                f"{'PASS' if ok else 'FAIL'} (y, dx, dw1, dw2 rel err "
                f"{', '.join(f'{x:.1e}' for x in errs)})")  # fmt: skip


def _mlp_outputs(pb, rows, dy, glu: bool, act: str, fused: bool) -> list[torch.Tensor]:
    """[y, dx, dw1, dw2] of the Triton MLP on bf16 parameters ``pb`` = (x, w1, w2)."""
    y = _scatter_mlp(pb[0], rows, pb[1], None, pb[2], glu, act, small=False,
                     fuse_act_grad=fused)  # fmt: skip
    return [y, *torch.autograd.grad(y, pb, dy)]


def check_router(device) -> None:
    g = torch.Generator(device=device).manual_seed(5)
    x = torch.randn(1000, 2048, device=device, generator=g).bfloat16()
    w = torch.randn(256, 2048, device=device, generator=g) * 0.02
    ref = x.double() @ w.double().T
    scale = (x.double().abs() @ w.double().abs().T).max().item()
    for parts in (1, 2):
        out = guarded(f"router parts={parts}", functools.partial(tensor_core_linear, x, w, parts))
        if out is None:
            continue
        err = (out.double() - ref).abs().max().item() / scale
        bound = 2.0**-9 if parts == 1 else 2.0**-17
        log(f"check router parts={parts}: {'PASS' if err <= bound else 'FAIL'} "
            f"(max err / max sum|x w| = {err:.2e}, bound {bound:.1e})")  # fmt: skip


# ---------------------------------------------------------------- (b) timing


def time_gemms(name: str, shape, variants, device) -> None:
    _, probs, flops = problems(shape, False, device)
    twin = bmm_twin_ms(shape, device)
    wgrad = sum(ms(lambda n=n: sg.group_weight_grad(*probs[n][1], **probs[n][2]))
                for n in ("dw1", "dw2"))  # fmt: skip
    log(f"{name}: bmm ceiling {twin:.3f} ms per GEMM ({flops / twin / 1e9:.0f} TFLOP/s); "
        f"weight gradients (autotuned) {wgrad:.3f} ms for 2")  # fmt: skip
    print(f"| {name} variant | " + " | ".join(GEMMS) + " | 6 GEMMs / 6 x bmm |")
    print("|---|" + "---:|" * (len(GEMMS) + 1))
    for variant in variants:
        cells, total = [], wgrad
        for gemm in GEMMS:
            _, pos, kw = probs[gemm]
            run = functools.partial(sg.scatter_gemm, *pos, **kw, config=variant_config(variant))
            got = guarded(f"{name} {variant} {gemm}", functools.partial(ms, run))
            if got is None:
                cells.append("failed")
                total = None
                continue
            cells.append(f"{got:.3f} ms {flops / got / 1e9:.0f} TF")
            total = None if total is None else total + got
        ratio = "n/a" if total is None else f"{total:.3f} ms, {total / (6 * twin):.2f}x"
        print(f"| {variant} | " + " | ".join(cells) + f" | {ratio} |", flush=True)


def time_act_grad(name: str, shape, device) -> None:
    rows, probs, _ = problems(shape, False, device)
    _, pos, kw = probs["dx2"]
    m, h = rows.num_rows, shape[2]
    for glu, act in ((False, "gelu"), (True, "silu")):
        hcat = torch.randn(m, 2 * h if glu else h, device=device).bfloat16()
        fused_run = functools.partial(sg.scatter_gemm, *pos, **kw,
                                      act_grad=sg.ActGrad(hcat, glu, act))  # fmt: skip
        fused = guarded(f"{name} act_grad {act}", functools.partial(ms, fused_run))
        base = ms(functools.partial(_separate_act_grad, pos, kw, hcat, glu, act))
        log(f"{name} dx2 + activation backward ({act}, glu={glu}): separate {base:.3f} ms, "
            f"act_grad epilogue {'failed' if fused is None else f'{fused:.3f} ms'}")  # fmt: skip


def _separate_act_grad(pos, kw, hcat, glu: bool, act: str) -> torch.Tensor:
    d_a = sg.scatter_gemm(*pos, **kw)
    return ew.activation_bwd(hcat, d_a, glu=glu, activation=act)


def _mlp_step(x, rows, w1, w2, dy, glu: bool, act: str, fused: bool) -> None:
    y = _scatter_mlp(x, rows, w1, None, w2, glu, act, small=False, fuse_act_grad=fused)
    torch.autograd.grad(y, [x, w1, w2], dy)


def _router_step(router: Router, x: torch.Tensor, g: torch.Tensor) -> None:
    torch.autograd.grad(router.logits(x), [x, router.weight], g)


def _router_forward_step(router: Router, x: torch.Tensor) -> None:
    r = router(x)
    torch.autograd.grad(r.gates.sum() + r.scores.square().sum(), [x, router.weight])


def time_mlp(name: str, shape, device) -> None:
    t, d, h, e, k = shape
    rows, _, _ = problems(shape, False, device)
    for glu, act in ((False, "gelu"), (True, "silu")):
        x = torch.randn(t, d, device=device).bfloat16().requires_grad_()
        w1 = (torch.randn(e, 2 * h if glu else h, d, device=device) * d**-0.5).bfloat16()
        w2 = (torch.randn(e, d, h, device=device) * h**-0.5).bfloat16()
        w1.requires_grad_(), w2.requires_grad_()
        dy = torch.randn(t * k, d, device=device).bfloat16()
        for fused in (False, True):
            step = functools.partial(_mlp_step, x, rows, w1, w2, dy, glu, act, fused)
            got = guarded(f"{name} MLP fused={fused}", functools.partial(ms, step))
            if got is None:
                continue
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            log(f"{name} Triton MLP fwd+bwd glu={glu} fuse_act_grad={fused}: "
                f"{got:.3f} ms, peak {peak:.0f} MiB")  # fmt: skip


def time_router(name: str, shape, device) -> None:
    t, d, _, e, k = shape
    x = torch.randn(t, d, device=device).bfloat16().requires_grad_()
    g = torch.randn(t, e, device=device)
    for mode in ("float32", "bfloat16", "bfloat16x2", "auto"):
        router = Router(d, RouterConfig(e, top_k=k, matmul_dtype=mode), device=device)
        got = guarded(f"router {mode}", functools.partial(ms, functools.partial(
            _router_step, router, x, g)))  # fmt: skip
        log(f"{name} router logits fwd+bwd matmul_dtype={mode}: "
            f"{'failed' if got is None else f'{got:.3f} ms'}")  # fmt: skip
    for fused in (False, True):  # the whole router: GEMM, softmax, top-k, gates, counts
        router = Router(d, RouterConfig(e, top_k=k, matmul_dtype="auto"), device=device)
        router.fused_select = fused
        got = guarded(f"router fused_select={fused}", functools.partial(ms, functools.partial(
            _router_forward_step, router, x)))  # fmt: skip
        log(f"{name} Router forward+backward (auto GEMM) fused_select={fused}: "
            f"{'failed' if got is None else f'{got:.3f} ms'}")  # fmt: skip


def host_us(device) -> None:
    """Host microseconds per launcher call on a tiny problem (the GPU idles between)."""
    shape = (64, 128, 128, 8, 2)
    rows, probs, _ = problems(shape, False, device)
    _, pos, kw = probs["fwd1"]
    fixed = sg.GEMM_CONFIGS[-1]
    hcat = torch.randn(rows.num_rows, 128, device=device).bfloat16()
    calls = {
        "scatter_gemm (autotuned)": lambda: sg.scatter_gemm(*pos, **kw),
        "scatter_gemm (fixed config)": lambda: sg.scatter_gemm(*pos, **kw, config=fixed),
        "prepare_gemm (its validation and output allocation)": lambda: sg.prepare_gemm(
            *pos, kw["fan_out"], kw["num_slots"], kw["x_grouped"], kw["y_grouped"], False, None
        ),
        "activation_fwd": lambda: ew.activation_fwd(hcat, glu=False, activation="gelu"),
        "torch.empty (reference)": lambda: torch.empty(64, 128, device=device),
    }
    for what, fn in calls.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(500):
            fn()
        host = (time.perf_counter() - t0) / 500 * 1e6
        torch.cuda.synchronize()
        log(f"host {what}: {host:.1f} us per call")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="fine256,olmoe,mixtral")
    p.add_argument("--variants", default=",".join(["default", *sg.GEMM_VARIANTS]))
    p.add_argument("--skip-timing", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda")
    variants = args.variants.split(",")
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    check_gemms(CHECK_SHAPES["small"], variants, device)
    check_fused_mlp(CHECK_SHAPES["small"], device)
    # The odd shape (ragged K steps, 8-element-aligned rows) compiles every kernel anew:
    # only the new variants' four GEMMs (the default's are in the GPU test suite).
    odd = [v for v in variants if v != "default"]
    check_gemms(CHECK_SHAPES["odd"], odd, device, act_grad=False)
    check_router(device)
    if args.skip_timing:
        return
    host_us(device)
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        time_gemms(name, shape, variants, device)
        time_act_grad(name, shape, device)
        time_mlp(name, shape, device)
        time_router(name, shape, device)
        torch.cuda.empty_cache()
    log("done")


if __name__ == "__main__":
    main()

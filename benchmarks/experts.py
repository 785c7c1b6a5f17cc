"""Expert SwiGLU MLP benchmark: every expert-compute variant, forward + backward, bf16.

Routing is given (not timed): random, softmax of Gaussian logits, top-k. Each variant runs
``kernels.expert_mlp`` (SwiGLU, no bias) forward and backward on the same problem.

    FLOPs per forward + backward = 18 * T * k * d * h
    (forward 2 * T*k * d * 3h: the gate/up GEMM 2*T*k*d*2h plus the down GEMM 2*T*k*h*d;
     backward twice the forward: input and weight gradients of both GEMMs)

The dense GEMM ceiling runs the same six GEMMs as one dense problem of T*k rows (the same
FLOPs with no routing). Peak = extra memory allocated during one forward + backward
(activations, weight and input gradients). Time = median of ``triton.testing.do_bench``.

Usage from the repository root (one H100, a few minutes including Triton autotuning):
    PYTHONPATH=. python benchmarks/experts.py --out benchmarks/experts.json
    PYTHONPATH=. python benchmarks/experts.py --quick --out /tmp/experts_quick.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from adaptive_moe.runtime.experts import kernels
from adaptive_moe.runtime.experts.grouping import ExpertRows, group_by_expert

VARIANTS = ("loop", "bmm", "grouped_mm", "scatter")
GIB = float(1 << 30)


@dataclasses.dataclass(frozen=True)
class Shape:
    tokens: int  # T
    d_model: int  # d
    d_ff: int  # h per expert
    experts: int  # E
    top_k: int  # k

    @property
    def flops(self) -> float:
        return 18.0 * self.tokens * self.top_k * self.d_model * self.d_ff


SHAPES = {
    "mixtral": Shape(8192, 4096, 14336, 8, 2),
    "olmoe": Shape(16384, 2048, 1024, 64, 8),
    "fine256": Shape(8192, 2048, 512, 256, 8),
}
QUICK = {"quick": Shape(4096, 1024, 512, 32, 4)}


@dataclasses.dataclass
class Result:
    config: str
    variant: str
    ms: float | None = None
    tflops: float | None = None
    peak_extra_gib: float | None = None
    rel_err_vs_bmm: float | None = None
    note: str = ""


def make_problem(shape: Shape, seed: int = 0):
    """x [T, d], routing, w1 [E, 2h, d], w2 [E, d, h] (bf16, weights scaled to unit gain)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, bf16 = "cuda", torch.bfloat16
    logits = torch.randn(shape.tokens, shape.experts, device=dev, generator=g)
    top = torch.softmax(logits, dim=-1).topk(shape.top_k, dim=-1).indices  # [T, k]
    rows = group_by_expert(top.flatten(), shape.experts, shape.top_k)
    x = torch.randn(shape.tokens, shape.d_model, device=dev, generator=g).to(bf16)
    w1 = torch.randn(shape.experts, 2 * shape.d_ff, shape.d_model, device=dev, generator=g)
    w2 = torch.randn(shape.experts, shape.d_model, shape.d_ff, device=dev, generator=g)
    w1 = (w1 * shape.d_model**-0.5).to(bf16)
    w2 = (w2 * shape.d_ff**-0.5).to(bf16)
    return x.requires_grad_(), rows, w1.requires_grad_(), w2.requires_grad_()


def step_fn(x, rows: ExpertRows, w1, w2, variant: str) -> Callable[[], torch.Tensor]:
    grad = torch.randn(rows.num_slots, x.shape[1], device=x.device, dtype=x.dtype)

    def step() -> torch.Tensor:
        y = kernels.expert_mlp(x, rows, w1, None, w2, glu=True, activation="silu", kernel=variant)
        y.backward(grad)
        return y

    return step


def dense_step_fn(shape: Shape) -> Callable[[], None]:
    """The six GEMMs of the MLP's forward + backward on T*k dense rows."""
    m, d, h = shape.tokens * shape.top_k, shape.d_model, shape.d_ff
    g = torch.Generator(device="cuda").manual_seed(1)

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(*s, device="cuda", generator=g).to(torch.bfloat16)

    x, w1, w2, a, dy, dh = rnd(m, d), rnd(2 * h, d), rnd(d, h), rnd(m, h), rnd(m, d), rnd(m, 2 * h)

    def step() -> None:
        x @ w1.T  # hcat [M, 2h]
        a @ w2.T  # y [M, d]
        dy @ w2  # da [M, h]
        dy.T @ a  # dw2 [d, h]
        dh @ w1  # dx [M, d]
        dh.T @ x  # dw1 [2h, d]

    return step


def measure(step: Callable, grads: list[torch.Tensor]) -> tuple[float, float]:
    """(median ms, peak extra GiB) of one step; the caller has warmed it up."""
    for t in grads:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / GIB
    ms = do_bench(step, grad_to_none=grads, return_mode="median")
    return ms, peak


def run_variant(name: str, shape: Shape, variant: str, ref: torch.Tensor | None,
                loop_limit_s: float) -> tuple[Result, torch.Tensor | None]:  # fmt: skip
    res = Result(name, variant)
    x, rows, w1, w2 = make_problem(shape)
    usable = kernels.available_kernels(x.device, x.dtype, d_model=shape.d_model, hidden=shape.d_ff)
    if variant not in usable:
        res.note = f"not available here ({usable})"
        return res, None
    step = step_fn(x, rows, w1, w2, variant)
    start = time.perf_counter()
    y = step().detach()  # compiles and autotunes the Triton kernels
    torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    # do_bench needs a warmup and at least one timed repeat beyond this first call.
    if variant == "loop" and 3 * first_s > loop_limit_s:
        res.note = f"skipped: one step took {first_s:.1f} s (limit {loop_limit_s:.0f} s for 3)"
        return res, None
    res.ms, res.peak_extra_gib = measure(step, [x, w1, w2])
    res.tflops = shape.flops / (res.ms * 1e-3) / 1e12
    if ref is not None:
        res.rel_err_vs_bmm = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    return res, y


def run_config(name: str, shape: Shape, loop_limit_s: float) -> list[Result]:
    results, ref = [], None
    for variant in ("bmm", "loop", "grouped_mm", "scatter"):  # bmm first: the reference
        res, y = run_variant(name, shape, variant, ref, loop_limit_s)
        if variant == "bmm":
            ref = y
        results.append(res)
        print(f"  {name:8s} {variant:10s} {_cell(res)}", flush=True)
        torch.cuda.empty_cache()
    dense = Result(name, "dense_ceiling")
    step = dense_step_fn(shape)
    step()
    dense.ms, dense.peak_extra_gib = measure(step, [])
    dense.tflops = shape.flops / (dense.ms * 1e-3) / 1e12
    print(f"  {name:8s} {'dense':10s} {_cell(dense)}", flush=True)
    torch.cuda.empty_cache()
    return [*sorted(results, key=lambda r: VARIANTS.index(r.variant)), dense]


def _cell(r: Result) -> str:
    if r.ms is None:
        return r.note
    return f"{r.ms:.2f} ms ({r.tflops:.0f} TFLOP/s, {r.peak_extra_gib:.2f} GiB)"


def markdown(results: list[Result], shapes: dict[str, Shape]) -> str:
    cols = [*VARIANTS, "dense_ceiling"]
    lines = [
        "| config | T | d | h | E | k | " + " | ".join(cols) + " |",
        "|---" * (6 + len(cols)) + "|",
    ]
    for name, s in shapes.items():
        cells = {r.variant: _cell(r) for r in results if r.config == name}
        dims = f"{s.tokens} | {s.d_model} | {s.d_ff} | {s.experts} | {s.top_k}"
        lines.append(f"| {name} | {dims} | " + " | ".join(cells[c] for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results path")
    parser.add_argument("--quick", action="store_true", help="one small shape only")
    parser.add_argument("--only", choices=sorted(SHAPES), action="append",
                        help="run only these configs (repeatable)")  # fmt: skip
    parser.add_argument("--loop-limit-s", type=float, default=60.0,
                        help="skip the loop variant when 3 steps would exceed this")  # fmt: skip
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/experts.py needs a CUDA device", file=sys.stderr)
        return 2
    shapes = QUICK if args.quick else {n: SHAPES[n] for n in (args.only or SHAPES)}
    results: list[Result] = []
    for name, shape in shapes.items():
        results += run_config(name, shape, args.loop_limit_s)
    table = markdown(results, shapes)
    print(f"\n{torch.cuda.get_device_name()} · torch {torch.__version__} · triton "
          f"{triton.__version__} · bf16 SwiGLU experts, fwd+bwd, median of do_bench\n")  # fmt: skip
    print(table)
    payload = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "flops_formula": "18 * T * k * d * h (fwd 2*T*k*d*3h, bwd 2x fwd)",
        "shapes": {n: dataclasses.asdict(s) for n, s in shapes.items()},
        "results": [dataclasses.asdict(r) for r in results],
        "markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

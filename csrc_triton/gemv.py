"""Small-batch grouped GEMM (decode): a GEMV-style variant of ``scatter_gemm`` for few rows.

Same contract as :func:`csrc_triton.scatter_gemm.scatter_gemm` (notation there): for every
grouped position i of expert e, ``y[row_i] = x[row_i] @ w[e].T (+ bias[e])``, rows
gathered from token space / scattered to slot space by index inside the kernel.

At decode sizes (T = 1..128 tokens) each expert owns a handful of rows and the work is a
read of the touched experts' weights. What changes against the training kernel:

    BLOCK_M    16 (the smallest ``tl.dot`` tile) up to 64, chosen from the average rows
               per expert, so a tile of one or two real rows wastes little compute;
    order      programs walk row tiles fastest: the row tiles of one expert sit next to
               each other and share each weight tile while it is in L2, so the weights of
               a touched expert are read from memory about once;
    split-K    when too few (expert tile, column tile) programs exist to keep every SM
               streaming (one token on a few experts), the BLOCK_K steps of K are dealt
               round-robin to SPLIT_K programs; each
               program writes an fp32 partial [SPLIT_K, M, N] (grouped rows) and a second
               kernel sums the partials, rounds once and stores the routed rows. The sum is
               a fixed order, so results are deterministic (no atomics).

Experts without rows cost one early-exiting program per tile slot: the grid is sized by
the upper bound ``M // BLOCK_M + E`` row tiles, and every program reads its expert from
``offsets`` on the device. Nothing depends on host copies of the counts, so the launch
can be captured in a CUDA graph and replayed with new routing.

Forward only: the backward of this variant is the training kernel's (``runtime.experts.kernels``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from csrc_triton._common import (
    check_positive_int,
    dot_precision,
    fix_interpreter_scalars,
    interpreting,
    next_pow2,
)
from csrc_triton.scatter_gemm import _expert_tile, prepare_gemm

if interpreting():
    fix_interpreter_scalars()


@triton.heuristics({"EVEN_K": lambda args: args["K"] % (args["BLOCK_K"] * args["SPLIT_K"]) == 0})
@triton.jit
def _gemv_kernel(
    X, stride_xm, stride_xk,
    W, stride_we, stride_wk, stride_wn,
    Bias, stride_be, stride_bn,
    Y, stride_ym, stride_yn,
    P, stride_ps, stride_pm, stride_pn,
    slots, offsets,
    M, N, K, E, fan_out,
    E_POW2: tl.constexpr, SPLIT_K: tl.constexpr,
    X_GROUPED: tl.constexpr, Y_GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    row_tiles = M // BLOCK_M + E  # bounds sum_e ceil(count_e / BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % row_tiles
    pid_n = pid // row_tiles
    split = tl.program_id(1)
    expert, row_start, row_end = _expert_tile(offsets, pid_m, E, E_POW2, BLOCK_M)
    if expert < E:
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows = tl.where(row_ok, rows, row_start).to(tl.int64)  # never stored past the expert
        slot = tl.load(slots + rows)
        if X_GROUPED:
            x_rows = rows
        else:
            x_rows = slot // fan_out
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_cols = cols % N
        # Split-K interleaves BLOCK_K steps: split s reads steps s, s + SPLIT_K, ...
        k_first = split * BLOCK_K
        offs_k = k_first + tl.arange(0, BLOCK_K)
        x_ptrs = X + x_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = (
            W + expert.to(tl.int64) * stride_we
            + offs_k[:, None] * stride_wk + w_cols[None, :] * stride_wn
        )  # fmt: skip
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K * SPLIT_K):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_ok = offs_k < K - k0
                a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K * SPLIT_K * stride_xk
            w_ptrs += BLOCK_K * SPLIT_K * stride_wk
        if HAS_BIAS:  # added once, by the first K range
            bias = tl.load(Bias + expert.to(tl.int64) * stride_be + w_cols * stride_bn)
            acc += tl.where(split == 0, bias.to(tl.float32), 0.0)[None, :]
        ok = row_ok[:, None] & (cols < N)[None, :]
        if SPLIT_K > 1:
            p_ptrs = P + split * stride_ps + rows[:, None] * stride_pm + cols[None, :] * stride_pn
            tl.store(p_ptrs, acc, mask=ok)
        else:
            if Y_GROUPED:
                y_rows = rows
            else:
                y_rows = slot
            y_ptrs = Y + y_rows[:, None] * stride_ym + cols[None, :] * stride_yn
            tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _split_sum_kernel(
    P, stride_ps, stride_pm, stride_pn,
    Y, stride_ym, stride_yn,
    slots, offsets,
    M, N, E,
    SPLIT_K: tl.constexpr, Y_GROUPED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """y[row] = sum_s P[s, row] for the routed grouped rows (< offsets[E]); others untouched."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    routed = tl.load(offsets + E)
    row_ok = rows < tl.minimum(routed, M)
    ok = row_ok[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        p = P + s * stride_ps + rows64[:, None] * stride_pm + cols[None, :] * stride_pn
        acc += tl.load(p, mask=ok, other=0.0)
    if Y_GROUPED:
        y_rows = rows64
    else:
        y_rows = tl.load(slots + rows64, mask=row_ok, other=0)
    tl.store(Y + y_rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(Y.dtype.element_ty), mask=ok)  # fmt: skip


# Narrow column tiles and deep K pipelines: each program streams a [BLOCK_K, BLOCK_N]
# weight slab per step, and enough programs are in flight per SM to cover memory latency.
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (32, 256, 4, 4),
        (64, 128, 4, 4),
        (128, 128, 8, 3),
    ]
]
_gemv_tuned = triton.autotune(
    configs=_GEMV_CONFIGS,
    key=["N", "K", "E", "BLOCK_M", "SPLIT_K", "X_GROUPED", "Y_GROUPED"],
)(_gemv_kernel)
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
# Column tile used to count programs when choosing SPLIT_K (the tuned tiles are 32-128).
_PLAN_BLOCK_N = 64
_MAX_SPLIT = 8
_MIN_SPLIT_K_LEN = 512


def block_rows(num_rows: int, num_experts: int) -> int:
    """BLOCK_M for ``num_rows`` grouped rows over ``num_experts``: the average rows per
    touched expert (at most min(E, M) experts are touched), rounded up to 16, 32 or 64."""
    touched = max(1, min(num_experts, num_rows))
    per_expert = -(-num_rows // touched)
    return min(64, max(16, next_pow2(per_expert)))


def split_count(num_rows: int, num_experts: int, n: int, k: int, sms: int) -> int:
    """SPLIT_K so that about two programs per SM stream weights: programs without a split
    are (touched expert tiles) x (column tiles), with min(E, M) touched experts at most."""
    bm = block_rows(num_rows, num_experts)
    touched = max(1, min(num_experts, num_rows))
    tiles = max(touched, -(-num_rows // bm)) * triton.cdiv(n, _PLAN_BLOCK_N)
    want = next_pow2(max(1, -(-2 * sms // tiles)))
    return max(1, min(want, _MAX_SPLIT, k // _MIN_SPLIT_K_LEN))


def _sm_count(index: int) -> int:
    # torch caches the device properties: no driver call per launch.
    return torch.cuda.get_device_properties(index).multi_processor_count


def grouped_gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    slots: torch.Tensor,
    offsets: torch.Tensor,
    *,
    fan_out: int,
    num_slots: int,
    x_grouped: bool,
    y_grouped: bool,
    trans_w: bool = False,
    allow_tf32: bool = False,
    out: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """``y[row] = x[row] @ w[e].T (+ bias[e])``, tuned for few rows per expert.

    Arguments and result as :func:`csrc_triton.scatter_gemm.scatter_gemm`; ``split_k``
    forces the number of programs sharing one K loop (default: ``split_count``).
    Only rows below ``offsets[E]`` are written (rows of ``slots`` past it are ignored), so
    ``slots`` may list every slot with the unrouted ones last.
    """
    e, m, n, k, out = prepare_gemm(
        x, w, bias, slots, offsets, fan_out, num_slots, x_grouped, y_grouped, trans_w, out
    )
    if split_k is not None:
        check_positive_int("split_k", split_k)
    return _launch(
        x, w, bias, slots, offsets, out, e, m, n, k, fan_out, x_grouped, y_grouped, trans_w,
        dot_precision(x.dtype, allow_tf32), split_k,
    )  # fmt: skip


def launch_gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    slots: torch.Tensor,
    offsets: torch.Tensor,
    *,
    out: torch.Tensor | None,
    fan_out: int,
    num_slots: int,
    x_grouped: bool,
    y_grouped: bool,
    precision: str,
    configs: dict[tuple[object, ...], triton.Config] | None = None,
) -> torch.Tensor:
    """:func:`grouped_gemv` (``trans_w=False``, default split) without the argument
    checks, for callers whose tensors are consistent by construction (the layer's
    inference path, where the checks were a large part of the host time per call).
    ``out`` None: allocated uninitialised (only the routed rows are written);
    ``precision``: ``_common.dot_precision`` of the operands.

    ``configs``: a dict the caller keeps. The first launch of a problem goes through
    the autotuner and stores the config it chose here; later launches of the same
    problem run that config directly, without the autotuner's and heuristics' wrappers
    (their per-launch argument dictionaries and key building)."""
    e, n, k = w.shape
    m = slots.shape[0]
    if out is None:
        out = torch.empty((m if y_grouped else num_slots, n), dtype=x.dtype, device=x.device)
    return _launch(
        x, w, bias, slots, offsets, out, e, m, n, k, fan_out, x_grouped, y_grouped, False,
        precision, None, configs,
    )  # fmt: skip


def _launch(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    slots: torch.Tensor,
    offsets: torch.Tensor,
    out: torch.Tensor,
    e: int, m: int, n: int, k: int,
    fan_out: int,
    x_grouped: bool,
    y_grouped: bool,
    trans_w: bool,
    precision: str,
    split_k: int | None,
    configs: dict[tuple[object, ...], triton.Config] | None = None,
) -> torch.Tensor:  # fmt: skip
    if m == 0 or n == 0:
        return out
    sms = 4 if interpreting() else _sm_count(x.device.index or 0)
    splits = split_k if split_k is not None else split_count(m, e, n, k, sms)
    block_m = block_rows(m, e)
    stride_wk, stride_wn = (w.stride(1), w.stride(2)) if trans_w else (w.stride(2), w.stride(1))
    b = w if bias is None else bias  # placeholder pointer when HAS_BIAS is off
    # fp32 partials of the K splits, grouped rows; a placeholder when there is one split.
    partial = (
        torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else out
    )
    p_strides = partial.stride() if splits > 1 else (0, 0, 0)
    key = (n, k, e, block_m, splits, x_grouped, y_grouped, bias is not None, precision,
           x.dtype, w.dtype, out.dtype)  # fmt: skip
    config = _INTERPRETER_CONFIG if interpreting() else None
    if config is None and configs is not None:
        config = configs.get(key)
    args = (
        x, x.stride(0), x.stride(1),                # X, stride_xm, stride_xk
        w, w.stride(0), stride_wk, stride_wn,       # W, stride_we, stride_wk, stride_wn
        b, b.stride(0), b.stride(1),                # Bias, stride_be, stride_bn
        out, out.stride(0), out.stride(1),          # Y, stride_ym, stride_yn
        partial, *p_strides,                        # P, stride_ps, stride_pm, stride_pn
        slots, offsets,                             # slots, offsets
        m, n, k, e, fan_out,                        # M, N, K, E, fan_out
    )  # fmt: skip
    meta = dict(
        E_POW2=max(2, next_pow2(e)), SPLIT_K=splits,
        X_GROUPED=x_grouped, Y_GROUPED=y_grouped, HAS_BIAS=bias is not None,
        PRECISION=precision, BLOCK_M=block_m,
    )  # fmt: skip
    if config is None:

        def grid(meta: dict) -> tuple[int, int]:
            return ((m // block_m + e) * triton.cdiv(n, meta["BLOCK_N"]), splits)

        _gemv_tuned[grid](*args, **meta)
        if configs is not None:
            configs[key] = _gemv_tuned.best_config  # what the autotuner just launched
    else:  # the JIT function itself: EVEN_K as the heuristic computes it
        block_n, block_k = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
        grid = ((m // block_m + e) * triton.cdiv(n, block_n), splits)
        even_k = k % (block_k * splits) == 0
        _gemv_kernel.fn[grid](*args, **meta, EVEN_K=even_k, **config.all_kwargs())
    if splits > 1:
        bm, bn = (16, 32) if interpreting() else (32, 128)
        _split_sum_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            partial, *p_strides,                    # P, stride_ps, stride_pm, stride_pn
            out, out.stride(0), out.stride(1),      # Y, stride_ym, stride_yn
            slots, offsets,                         # slots, offsets
            m, n, e,                                # M, N, E
            SPLIT_K=splits, Y_GROUPED=y_grouped, BLOCK_M=bm, BLOCK_N=bn,
        )  # fmt: skip
    return out

"""Weight and bias gradients of the grouped expert GEMMs (``scatter_gemm``'s notation):

    dw[e] = sum_i dy[row_i]^T x[row_i]    [E, N, K]
    db[e] = sum_i dy[row_i]               [E, N]

over expert e's grouped positions i, with dy / x grouped or gathered by slot in the loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from csrc_triton._common import (
    check_float,
    check_positive_int,
    check_runnable,
    check_tensor,
    dot_precision,
    fix_interpreter_scalars,
    interpreting,
)
from csrc_triton._gemm_common import (
    _check_out,
    _check_routing,
    _fits_smem,
    _launchable,
    _swizzle,
)

if interpreting():
    fix_interpreter_scalars()


@triton.jit
def _wgrad_rows(slots, start, row_end, fan_out, DY_GROUPED: tl.constexpr,
                X_GROUPED: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """(row mask, dy rows, x rows) of the BLOCK_M grouped positions from ``start``."""
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    # Masked rows re-read a row in bounds (never the end of an empty last expert).
    safe = tl.maximum(tl.minimum(start, row_end - 1), 0)
    rows = tl.where(row_ok, rows, safe).to(tl.int64)
    if DY_GROUPED and X_GROUPED:
        return row_ok, rows, rows
    slot = tl.load(slots + rows)
    dy_rows = rows if DY_GROUPED else slot
    x_rows = rows if X_GROUPED else slot // fan_out
    return row_ok, dy_rows, x_rows


@triton.jit
def _group_weight_grad_kernel(
    DY, stride_dym, stride_dyn,
    X, stride_xm, stride_xk,
    DW, stride_dwe, stride_dwn, stride_dwk,
    slots, offsets,
    N, K, fan_out,
    DY_GROUPED: tl.constexpr, X_GROUPED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    PREFETCH: tl.constexpr = False, TRANS_DY: tl.constexpr = False,
):  # fmt: skip
    # PREFETCH: the next row block's slot ids are loaded one iteration ahead, so the
    # gathered loads do not wait on the index load. TRANS_DY: dy is loaded in its own
    # [BLOCK_M, BLOCK_N] layout and transposed for the dot.
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_k = tl.cdiv(K, BLOCK_K)
    pid = tl.program_id(0)
    expert = pid // (tiles_n * tiles_k)
    pid_n, pid_k = _swizzle(pid % (tiles_n * tiles_k), tiles_n, tiles_k, GROUP_N)
    row_start = tl.load(offsets + expert)
    row_end = tl.load(offsets + expert + 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_cols = offs_n % N  # in bounds; never stored past N / K
    k_cols = offs_k % K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    row_ok, dy_rows, x_rows = _wgrad_rows(
        slots, row_start, row_end, fan_out, DY_GROUPED, X_GROUPED, BLOCK_M
    )
    for start in range(row_start, row_end, BLOCK_M):
        if not PREFETCH:
            row_ok, dy_rows, x_rows = _wgrad_rows(
                slots, start, row_end, fan_out, DY_GROUPED, X_GROUPED, BLOCK_M
            )
        # dw tile = dy^T x: [BLOCK_N, BLOCK_M] @ [BLOCK_M, BLOCK_K].
        if TRANS_DY:
            dy = tl.trans(tl.load(
                DY + dy_rows[:, None] * stride_dym + n_cols[None, :] * stride_dyn,
                mask=row_ok[:, None], other=0.0,
            ))  # fmt: skip
        else:
            dy = tl.load(
                DY + dy_rows[None, :] * stride_dym + n_cols[:, None] * stride_dyn,
                mask=row_ok[None, :], other=0.0,
            )  # fmt: skip
        x = tl.load(
            X + x_rows[:, None] * stride_xm + k_cols[None, :] * stride_xk,
            mask=row_ok[:, None], other=0.0,
        )  # fmt: skip
        if PREFETCH:
            row_ok, dy_rows, x_rows = _wgrad_rows(
                slots, start + BLOCK_M, row_end, fan_out, DY_GROUPED, X_GROUPED, BLOCK_M
            )
        acc = tl.dot(dy, x, acc, input_precision=PRECISION)
    dw_ptrs = (
        DW + expert.to(tl.int64) * stride_dwe
        + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk
    )  # fmt: skip
    dw_ok = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=dw_ok)


@triton.jit
def _group_bias_grad_kernel(
    DY, stride_dym, stride_dyn,
    DB, stride_dbe, stride_dbn,
    slots, offsets,
    N,
    DY_GROUPED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    expert = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    row_start = tl.load(offsets + expert)
    row_end = tl.load(offsets + expert + 1)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows = tl.where(row_ok, rows, start).to(tl.int64)
        if DY_GROUPED:
            dy_rows = rows
        else:
            dy_rows = tl.load(slots + rows)
        dy = tl.load(
            DY + dy_rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
            mask=row_ok[:, None] & col_ok[None, :], other=0.0,
        )  # fmt: skip
        acc += tl.sum(dy.to(tl.float32), axis=0)
    db_ptrs = DB + expert.to(tl.int64) * stride_dbe + cols * stride_dbn
    tl.store(db_ptrs, acc.to(DB.dtype.element_ty), mask=col_ok)


# Hopper candidates (benchmarks/gemm_sweep.py on an H200, 2026-12-01): with one operand
# gathered by slot, prefetching the next row block's slot ids (PREFETCH) took olmoe's
# weight gradients from 1.87 / 1.38 ms to 1.53 / 1.22 ms and fine256's from 0.71 / 0.53 to
# 0.66 / 0.50 ms; with 4 pipeline stages it was slower (1.9-2.5 ms), so 3 stages at 8 warps.
# The plain configs stay for the all-grouped layouts, where they were best.
WGRAD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_N": 8,
                   "PREFETCH": pre, "TRANS_DY": tr}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s, pre, tr in [
        (64, 128, 128, 8, 3, True, True),
        (64, 128, 128, 8, 3, True, False),
        (32, 128, 128, 4, 4, True, False),
        (64, 128, 128, 8, 3, False, False),
        (32, 128, 128, 4, 4, False, False),
    ]
]  # fmt: skip
_group_weight_grad_tuned = triton.autotune(
    configs=WGRAD_CONFIGS,
    key=["N", "K", "DY_GROUPED", "X_GROUPED"],
    prune_configs_by={"early_config_prune": _fits_smem("BLOCK_N", "BLOCK_M", "BLOCK_K", "X")},
)(_group_weight_grad_kernel)

_INTERPRETER_WGRAD = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_N": 2}
_IEEE_WGRAD = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_N": 8, "num_warps": 4,
               "num_stages": 2}  # fmt: skip


def group_weight_grad(
    dy: torch.Tensor,
    x: torch.Tensor,
    slots: torch.Tensor,
    offsets: torch.Tensor,
    *,
    fan_out: int,
    dy_grouped: bool,
    x_grouped: bool,
    allow_tf32: bool = False,
    out: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``dw[e] = sum_i dy[row_i]^T x[row_i]`` over expert e's grouped positions i.

    Args:
        dy: [M, N] if ``dy_grouped`` else slot space [num_slots, N].
        x: [M, K] if ``x_grouped`` else token space (row ``slot // fan_out``).
        slots, offsets: as in :func:`scatter_gemm`.
        out: optional [E, N, K] buffer; every element is written.
        config: a fixed tile config (one of ``WGRAD_CONFIGS``) instead of autotuning.

    Returns:
        dw: [E, N, K] in x's dtype; experts without rows get zeros.
    """
    check_tensor("dy", dy, ndim=2)
    check_float("dy", dy)
    check_runnable("dy", dy)
    e, m = _check_routing(slots, offsets, dy.device)
    check_positive_int("fan_out", fan_out)
    check_tensor("x", x, ndim=2, dtype=dy.dtype, device=dy.device)
    if dy_grouped and dy.shape[0] != m:
        raise ValueError(f"dy has {dy.shape[0]} rows, expected {m} (M grouped rows)")
    if x_grouped and x.shape[0] != m:
        raise ValueError(f"x has {x.shape[0]} rows, expected {m} (M grouped rows)")
    n, k = dy.shape[1], x.shape[1]
    _check_out(out, (e, n, k), dy)
    if out is None:
        out = torch.empty((e, n, k), dtype=dy.dtype, device=dy.device)
    if m == 0:
        return out.zero_()
    precision = dot_precision(dy.dtype, allow_tf32)
    kernel, meta = _launchable(
        _group_weight_grad_kernel,
        _group_weight_grad_tuned,
        _INTERPRETER_WGRAD,
        _IEEE_WGRAD,
        precision,
        config,
    )

    def grid(meta: dict) -> tuple[int]:
        return (e * triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]),)

    kernel[grid](
        dy, dy.stride(0), dy.stride(1),                     # DY, stride_dym, stride_dyn
        x, x.stride(0), x.stride(1),                        # X, stride_xm, stride_xk
        out, out.stride(0), out.stride(1), out.stride(2),   # DW, stride_dwe, _dwn, _dwk
        slots, offsets,                                     # slots, offsets
        n, k, fan_out,                                      # N, K, fan_out
        DY_GROUPED=dy_grouped, X_GROUPED=x_grouped, PRECISION=precision,
        **meta,
    )  # fmt: skip
    return out


def group_bias_grad(
    dy: torch.Tensor,
    slots: torch.Tensor,
    offsets: torch.Tensor,
    *,
    dy_grouped: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``db[e] = sum_i dy[row_i]`` over expert e's grouped positions (fp32 accumulation).

    Args:
        dy: [M, N] if ``dy_grouped`` else slot space [num_slots, N].
        out: optional [E, N] buffer; every element is written.

    Returns:
        db: [E, N] in dy's dtype.
    """
    check_tensor("dy", dy, ndim=2)
    check_float("dy", dy)
    check_runnable("dy", dy)
    e, m = _check_routing(slots, offsets, dy.device)
    if dy_grouped and dy.shape[0] != m:
        raise ValueError(f"dy has {dy.shape[0]} rows, expected {m} (M grouped rows)")
    n = dy.shape[1]
    _check_out(out, (e, n), dy)
    if out is None:
        out = torch.empty((e, n), dtype=dy.dtype, device=dy.device)
    if m == 0:
        return out.zero_()
    block_m, block_n = (32, 32) if interpreting() else (64, 128)
    _group_bias_grad_kernel[(e, triton.cdiv(n, block_n))](
        dy, dy.stride(0), dy.stride(1),     # DY, stride_dym, stride_dyn
        out, out.stride(0), out.stride(1),  # DB, stride_dbe, stride_dbn
        slots, offsets,                     # slots, offsets
        n,                                  # N
        DY_GROUPED=dy_grouped, BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip
    return out

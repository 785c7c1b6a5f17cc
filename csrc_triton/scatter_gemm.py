"""Grouped GEMMs over expert-grouped rows that read and write scattered order in place.

Notation (one launch):
    E        experts in the weight stack; expert e owns grouped positions
             [offsets[e], offsets[e+1])
    M        routed rows (grouped positions)
    slots    [M] int64, the slot of each grouped position. A *slot-space* tensor stores
             slot s in row s; a *token-space* tensor stores it in row s // fan_out.
    x        [M, K] grouped, or [R, K] token space (scattered, R * fan_out slots)
    w        [E, N, K]: y = x @ w[e].T; with ``trans_w`` the same stack is read as
             [E, K, N]: y = x @ w[e] (the input gradient of the first form)
    y        [M, N] grouped, or [num_slots, N] slot space (scattered)
    dw       [E, N, K] weight gradient, db [E, N] bias gradient

A tile of BLOCK_M grouped rows never straddles two experts: expert e's rows are cut into
ceil(count_e / BLOCK_M) tiles, and every program finds its expert from ``offsets`` inside
the kernel, so neither a padded copy of the rows nor a host-side tile table is built.
Rows are gathered by index in the loads and scattered by index in the stores.
"""

from __future__ import annotations

from collections.abc import Callable

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
    next_pow2,
)

if interpreting():
    fix_interpreter_scalars()


@triton.jit
def _swizzle(pid, num_rows, num_cols, GROUP: tl.constexpr):
    """Grouped tile order: GROUP row tiles share each column tile while it is in L2."""
    width = GROUP * num_cols
    first = (pid // width) * GROUP
    size = tl.minimum(num_rows - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size


@triton.jit
def _expert_tile(offsets, pid_m, E, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first grouped row, end of the expert's rows) of row tile ``pid_m``.

    The expert comes back as >= E for the spare tiles past the last expert's rows."""
    idx = tl.arange(0, E_POW2)
    lo = tl.load(offsets + idx, mask=idx < E, other=0)
    hi = tl.load(offsets + idx + 1, mask=idx < E, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    expert = tl.sum((tl.cumsum(tiles, 0) <= pid_m).to(tl.int32), 0)
    first_tile = tl.sum(tl.where(idx < expert, tiles, 0), 0)
    mine = tl.minimum(expert, E - 1)
    row_start = tl.load(offsets + mine) + (pid_m - first_tile) * BLOCK_M
    return expert, row_start, tl.load(offsets + mine + 1)


@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _scatter_gemm_kernel(
    X, stride_xm, stride_xk,
    W, stride_we, stride_wk, stride_wn,
    Bias, stride_be, stride_bn,
    Y, stride_ym, stride_yn,
    slots, offsets,
    M, N, K, E, fan_out,
    E_POW2: tl.constexpr,
    X_GROUPED: tl.constexpr, Y_GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # M // BLOCK_M + E bounds the number of row tiles sum_e ceil(count_e / BLOCK_M).
    pid_m, pid_n = _swizzle(tl.program_id(0), M // BLOCK_M + E, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert, row_start, row_end = _expert_tile(offsets, pid_m, E, E_POW2, BLOCK_M)
    if expert < E:
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        # Rows past the expert re-read its first row; they are never stored.
        rows = tl.where(row_ok, rows, row_start).to(tl.int64)
        slot = tl.load(slots + rows)
        if X_GROUPED:
            x_rows = rows
        else:
            x_rows = slot // fan_out
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_cols = cols % N  # in bounds; columns >= N are never stored
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = X + x_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = (
            W + expert.to(tl.int64) * stride_we
            + offs_k[:, None] * stride_wk + w_cols[None, :] * stride_wn
        )  # fmt: skip
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_ok = offs_k < K - k0
                a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        if HAS_BIAS:
            bias = tl.load(Bias + expert.to(tl.int64) * stride_be + w_cols * stride_bn)
            acc += bias.to(tl.float32)[None, :]
        if Y_GROUPED:
            y_rows = rows
        else:
            y_rows = slot
        y_ptrs = Y + y_rows[:, None] * stride_ym + cols[None, :] * stride_yn
        y_ok = row_ok[:, None] & (cols < N)[None, :]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=y_ok)


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


def _config(bm: int, bn: int, bk: int, group: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
        num_warps=warps,
        num_stages=stages,
    )


# A block may use 227 KB of shared memory on H100; each pipeline stage holds one tile of
# each operand.
_SMEM_BYTES = 227 * 1024


def _fits_smem(rows: str, inner: str, cols: str, operand: str) -> Callable[..., list]:
    """Autotune pruner: drop configs whose pipelined operand tiles exceed shared memory
    (fp32 operands take twice the bytes of bf16), sparing their compilation."""

    def prune(configs: list, named_args: dict, **kwargs: object) -> list:
        size = named_args[operand].element_size()
        return [
            c
            for c in configs
            if c.num_stages * size * c.kwargs[inner] * (c.kwargs[rows] + c.kwargs[cols])
            <= _SMEM_BYTES
        ]

    return prune


# Hopper candidates (benchmarks/gemm_sweep.py on an H200, 2026-12-01): 128x256x64 tiles
# with 8 warps and 4 stages won every forward and input-gradient GEMM of olmoe and
# fine256 (3 stages within 1-4%); the smaller tiles stay for fp32 (TF32) operands, whose
# pipelined tiles take twice the shared memory, and for small problems.
GEMM_CONFIGS = [
    _config(128, 256, 64, 8, 8, 4),
    _config(128, 256, 64, 8, 8, 3),
    _config(128, 128, 64, 8, 8, 3),
    _config(64, 128, 64, 8, 4, 4),
]
_scatter_gemm_tuned = triton.autotune(
    configs=GEMM_CONFIGS,
    key=["N", "K", "E", "X_GROUPED", "Y_GROUPED"],
    prune_configs_by={"early_config_prune": _fits_smem("BLOCK_M", "BLOCK_K", "BLOCK_N", "X")},
)(_scatter_gemm_kernel)

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

# The interpreter runs one program at a time in numpy: one small config, no autotuning.
_INTERPRETER_GEMM = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
_INTERPRETER_WGRAD = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_N": 2}
# Full-precision fp32 runs on FMA units, not tensor cores: a reference-speed path, so one
# small config that compiles fast instead of autotuning large unrolled FMA tiles.
_IEEE_GEMM = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4,
              "num_stages": 2}  # fmt: skip
_IEEE_WGRAD = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_N": 8, "num_warps": 4,
               "num_stages": 2}  # fmt: skip


def _launchable(
    raw: object,
    tuned: object,
    interpreter_meta: dict,
    ieee_meta: dict,
    precision: str,
    config: triton.Config | None = None,
) -> tuple[object, dict]:
    """(kernel, fixed launch meta): autotuned on GPU, one fixed config otherwise; a given
    ``config`` (tests, tile sweeps) is launched as it is."""
    if config is not None:
        if not isinstance(config, triton.Config):
            raise ValueError(f"config must be a triton.Config or None, got {config!r}")
        meta = dict(config.kwargs)
        meta.update(num_warps=config.num_warps, num_stages=config.num_stages)
        return raw, meta
    if interpreting():
        return raw, interpreter_meta
    if precision == "ieee":
        return raw, ieee_meta
    return tuned, {}


def _check_routing(slots: object, offsets: object, device: torch.device) -> tuple[int, int]:
    """(E, M) of validated routing tensors."""
    check_tensor("slots", slots, ndim=1, dtype=torch.int64, device=device)
    check_tensor("offsets", offsets, ndim=1, dtype=torch.int64, device=device)
    if offsets.numel() < 2:
        raise ValueError(f"offsets must hold E + 1 >= 2 entries, got {offsets.numel()}")
    return offsets.numel() - 1, slots.numel()


def _check_rows(name: str, t: torch.Tensor, grouped: bool, m: int, slot_rows: int) -> None:
    rows = m if grouped else slot_rows
    if t.shape[0] != rows:
        where = "M grouped rows" if grouped else "rows for its slots"
        raise ValueError(f"{name} has {t.shape[0]} rows, expected {rows} ({where})")


def _check_out(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> None:
    if out is not None:
        check_tensor("out", out, ndim=len(shape), shape=shape, dtype=like.dtype, device=like.device)


def prepare_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    slots: torch.Tensor,
    offsets: torch.Tensor,
    fan_out: int,
    num_slots: int,
    x_grouped: bool,
    y_grouped: bool,
    trans_w: bool,
    out: torch.Tensor | None,
) -> tuple[int, int, int, int, torch.Tensor]:
    """Validate a grouped GEMM's arguments (ValueError naming the argument) and allocate
    its output: ``(E, M, N, K, out)``. Shared by ``scatter_gemm`` and ``grouped_gemv``;
    a slot-space output the routed rows do not cover is zero-filled."""
    check_tensor("x", x, ndim=2)
    check_float("x", x)
    check_runnable("x", x)
    e, m = _check_routing(slots, offsets, x.device)
    check_positive_int("fan_out", fan_out)
    if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 0:
        raise ValueError(f"num_slots must be a non-negative integer, got {num_slots!r}")
    if num_slots % fan_out:
        raise ValueError(f"num_slots={num_slots} must be a multiple of fan_out={fan_out}")
    check_tensor("w", w, ndim=3, dtype=x.dtype, device=x.device)
    if w.shape[0] != e:
        raise ValueError(f"w has {w.shape[0]} experts but offsets describes {e}")
    n, k = (w.shape[2], w.shape[1]) if trans_w else (w.shape[1], w.shape[2])
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns but w contracts over {k}")
    _check_rows("x", x, x_grouped, m, num_slots // fan_out)
    if bias is not None:
        check_tensor("bias", bias, ndim=2, shape=(e, n), dtype=x.dtype, device=x.device)
    y_shape = (m, n) if y_grouped else (num_slots, n)
    _check_out(out, y_shape, x)
    if out is None:
        fill = torch.empty if y_grouped or m == num_slots else torch.zeros
        out = fill(y_shape, dtype=x.dtype, device=x.device)
    return e, m, n, k, out


def scatter_gemm(
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
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``y[row] = x[row] @ w[e].T (+ bias[e])`` for every grouped position of expert e.

    Args:
        x: [M, K] if ``x_grouped`` else token space [num_slots // fan_out, K].
        w: [E, N, K]; with ``trans_w`` read as [E, K, N] (``y = x @ w[e]``).
        bias: [E, N] or None.
        slots: [M] int64 slot of each grouped position; offsets: [E + 1] int64.
        fan_out: slots per token-space row of ``x``.
        num_slots: rows of a slot-space ``y``.
        x_grouped / y_grouped: whether x / y are in grouped order (else scattered).
        allow_tf32: let fp32 operands use TF32 tensor cores.
        out: optional output buffer; only the routed rows are written.
        config: a fixed tile config (one of ``GEMM_CONFIGS``) instead of autotuning.

    Returns:
        y: [M, N] if ``y_grouped`` else slot space [num_slots, N], unrouted slots 0 when
        allocated here.
    """
    e, m, n, k, out = prepare_gemm(
        x, w, bias, slots, offsets, fan_out, num_slots, x_grouped, y_grouped, trans_w, out
    )
    if m == 0:
        return out
    stride_wk, stride_wn = (w.stride(1), w.stride(2)) if trans_w else (w.stride(2), w.stride(1))
    b = w if bias is None else bias  # placeholder pointer when HAS_BIAS is off
    precision = dot_precision(x.dtype, allow_tf32)
    kernel, meta = _launchable(
        _scatter_gemm_kernel, _scatter_gemm_tuned, _INTERPRETER_GEMM, _IEEE_GEMM, precision,
        config,
    )  # fmt: skip

    def grid(meta: dict) -> tuple[int]:
        return ((m // meta["BLOCK_M"] + e) * triton.cdiv(n, meta["BLOCK_N"]),)

    kernel[grid](
        x, x.stride(0), x.stride(1),                # X, stride_xm, stride_xk
        w, w.stride(0), stride_wk, stride_wn,       # W, stride_we, stride_wk, stride_wn
        b, b.stride(0), b.stride(1),                # Bias, stride_be, stride_bn
        out, out.stride(0), out.stride(1),          # Y, stride_ym, stride_yn
        slots, offsets,                             # slots, offsets
        m, n, k, e, fan_out,                        # M, N, K, E, fan_out
        E_POW2=max(2, next_pow2(e)),
        X_GROUPED=x_grouped, Y_GROUPED=y_grouped, HAS_BIAS=bias is not None,
        PRECISION=precision,
        **meta,
    )  # fmt: skip
    return out


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

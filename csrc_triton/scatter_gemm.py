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

import dataclasses

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

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
from csrc_triton._gemm_common import (
    _SMEM_BYTES,  # noqa: F401 (re-exported for the tile tests)
    _check_out,
    _check_routing,
    _expert_tile,
    _fits_smem,
    _launchable,
    _swizzle,
)
from csrc_triton.elementwise import ACTIVATIONS, store_act_grad
from csrc_triton.weight_grad import (  # noqa: F401 (re-exported: one module of GEMM launchers)
    WGRAD_CONFIGS,
    group_bias_grad,
    group_weight_grad,
)

if interpreting():
    fix_interpreter_scalars()


@triton.jit
def _gemm_tile(
    tile,
    X, stride_xm, stride_xk, X_desc,
    W, stride_we, stride_wk, stride_wn, W_desc,
    Bias, stride_be, stride_bn,
    Y, stride_ym, stride_yn,
    H, stride_hm, stride_hn,
    slots, offsets,
    M, N, K, E, fan_out,
    E_POW2: tl.constexpr,
    X_GROUPED: tl.constexpr, Y_GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr, W_KN: tl.constexpr,
    ACT_GRAD: tl.constexpr, ACTIVATION: tl.constexpr, GLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] output tile: grouped rows of one expert times its weight."""
    # M // BLOCK_M + E bounds the number of row tiles sum_e ceil(count_e / BLOCK_M).
    pid_m, pid_n = _swizzle(tile, M // BLOCK_M + E, tl.cdiv(N, BLOCK_N), GROUP_M)
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
            k_ok = offs_k < K - k0
            # TMA: the descriptors zero-fill past the expert's [N, K] matrix and past M;
            # a grouped tile's rows past the expert's end are read but never stored.
            if TMA and X_GROUPED:
                a = X_desc.load([row_start.to(tl.int32), k0])
            elif EVEN_K:
                a = tl.load(x_ptrs)
            else:
                a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            if TMA and W_KN:
                b = W_desc.load([expert, k0, pid_n * BLOCK_N]).reshape(BLOCK_K, BLOCK_N)
            elif TMA:
                b = W_desc.load([expert, pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K).T
            elif EVEN_K:
                b = tl.load(w_ptrs)
            else:
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
        if ACT_GRAD:
            # acc is d_a of the grouped rows: store d_hcat = d_a * act'(hcat) (GLU: the
            # gate and up halves) instead, so d_a never reaches memory.
            h_ptrs = H + rows[:, None] * stride_hm + cols[None, :] * stride_hn
            store_act_grad(acc, h_ptrs, y_ptrs, stride_hn, stride_yn, N, y_ok, ACTIVATION, GLU)
        else:
            tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=y_ok)


@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _scatter_gemm_kernel(
    X, stride_xm, stride_xk, X_desc,
    W, stride_we, stride_wk, stride_wn, W_desc,
    Bias, stride_be, stride_bn,
    Y, stride_ym, stride_yn,
    H, stride_hm, stride_hn,
    slots, offsets,
    M, N, K, E, fan_out,
    E_POW2: tl.constexpr,
    X_GROUPED: tl.constexpr, Y_GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_K: tl.constexpr, W_KN: tl.constexpr,
    ACT_GRAD: tl.constexpr, ACTIVATION: tl.constexpr, GLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA: tl.constexpr = False, PERSISTENT: tl.constexpr = False,
    WARP_SPEC: tl.constexpr = False,
):  # fmt: skip
    # Variants (config kwargs, see GEMM_VARIANTS): TMA loads the weight (and a grouped x)
    # through tensor descriptors; PERSISTENT launches one program per SM that walks the
    # tiles, WARP_SPEC lets the compiler specialise warps over that loop.
    if PERSISTENT:
        num_tiles = (M // BLOCK_M + E) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(
            tl.program_id(0), num_tiles, tl.num_programs(0), warp_specialize=WARP_SPEC
        ):
            _gemm_tile(
                tile, X, stride_xm, stride_xk, X_desc, W, stride_we, stride_wk, stride_wn,
                W_desc, Bias, stride_be, stride_bn, Y, stride_ym, stride_yn,
                H, stride_hm, stride_hn, slots, offsets, M, N, K, E, fan_out,
                E_POW2, X_GROUPED, Y_GROUPED, HAS_BIAS, PRECISION, EVEN_K, TMA, W_KN,
                ACT_GRAD, ACTIVATION, GLU, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
            )  # fmt: skip
    else:
        _gemm_tile(
            tl.program_id(0), X, stride_xm, stride_xk, X_desc, W, stride_we, stride_wk,
            stride_wn, W_desc, Bias, stride_be, stride_bn, Y, stride_ym, stride_yn,
            H, stride_hm, stride_hn, slots, offsets, M, N, K, E, fan_out,
            E_POW2, X_GROUPED, Y_GROUPED, HAS_BIAS, PRECISION, EVEN_K, TMA, W_KN,
            ACT_GRAD, ACTIVATION, GLU, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        )  # fmt: skip


def _config(bm: int, bn: int, bk: int, group: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
        num_warps=warps,
        num_stages=stages,
    )


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
_TUNING_KEY = ["N", "K", "E", "X_GROUPED", "Y_GROUPED", "ACT_GRAD"]
_PRUNE = {"early_config_prune": _fits_smem("BLOCK_M", "BLOCK_K", "BLOCK_N", "X")}
_scatter_gemm_tuned = triton.autotune(configs=GEMM_CONFIGS, key=_TUNING_KEY,
                                      prune_configs_by=_PRUNE)(_scatter_gemm_kernel)  # fmt: skip


def _fit_boxes(nargs: dict) -> None:
    """Autotune pre-hook of a TMA config: the host descriptors' boxes follow its tiles
    (the launcher builds them before the autotuner has chosen one)."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["W_desc"].block_shape = [1, bk, bn] if nargs["W_KN"] else [1, bn, bk]
    if nargs["X_desc"] is not None:
        nargs["X_desc"].block_shape = [bm, bk]


def _with_tma(c: triton.Config) -> triton.Config:
    return triton.Config({**c.kwargs, "TMA": True}, num_warps=c.num_warps,
                         num_stages=c.num_stages, pre_hook=_fit_boxes)  # fmt: skip


# Hopper, 16-bit operands with TMA-aligned strides: every tile also with its TMA loads
# (benchmarks/kernel_variants.py on an H100, 2026-12-07: the 128x256x64 TMA tile beat the
# autotuned pointer loads on all four GEMMs of olmoe, by up to 19% on fwd2, and on three
# of fine256's, the fourth equal), the autotuner keeping whichever is faster per problem.
_scatter_gemm_tuned_tma = triton.autotune(
    configs=GEMM_CONFIGS + [_with_tma(c) for c in GEMM_CONFIGS],
    key=_TUNING_KEY,
    prune_configs_by=_PRUNE,
)(_scatter_gemm_kernel)

# Variants for Hopper, not yet measured, so not autotuned: selected by passing one as
# ``config`` (benchmarks/kernel_variants.py times them against cuBLAS). TMA: the weight
# (and a grouped x) through tensor descriptors; PERSISTENT: one program per SM walking the
# tiles; WARP_SPEC: warp specialisation of that walk.
GEMM_VARIANTS = {
    name: triton.Config(
        {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, **flags},
        num_warps=8, num_stages=stages,
    )
    for name, flags, stages in [
        ("tma", {"TMA": True}, 4),
        ("persistent", {"PERSISTENT": True}, 3),
        ("tma_persistent", {"TMA": True, "PERSISTENT": True}, 3),
        ("tma_persistent_ws", {"TMA": True, "PERSISTENT": True, "WARP_SPEC": True}, 3),
    ]
}  # fmt: skip

# The interpreter runs one program at a time in numpy: one small config, no autotuning.
_INTERPRETER_GEMM = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
# Full-precision fp32 runs on FMA units, not tensor cores: a reference-speed path, so one
# small config that compiles fast instead of autotuning large unrolled FMA tiles.
_IEEE_GEMM = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4,
              "num_stages": 2}  # fmt: skip


def _check_rows(name: str, t: torch.Tensor, grouped: bool, m: int, slot_rows: int) -> None:
    rows = m if grouped else slot_rows
    if t.shape[0] != rows:
        where = "M grouped rows" if grouped else "rows for its slots"
        raise ValueError(f"{name} has {t.shape[0]} rows, expected {rows} ({where})")


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
    act_grad: ActGrad | None = None,
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
        config: a fixed tile config (one of ``GEMM_CONFIGS`` or ``GEMM_VARIANTS``)
            instead of autotuning.
        act_grad: the product is the gradient d_a of ``a = activation(hcat)`` (grouped
            y only): the epilogue returns d_hcat [M, 2N or N] instead (``ActGrad``).

    Returns:
        y: [M, N] if ``y_grouped`` else slot space [num_slots, N], unrouted slots 0 when
        allocated here; d_hcat [M, 2N | N] with ``act_grad``.
    """
    result = None
    if act_grad is not None:
        result = _act_grad_out(act_grad, x, w, slots, y_grouped, trans_w, out)
        out = result[:, : w.shape[2] if trans_w else w.shape[1]]  # the d_a (gate) columns
    e, m, n, k, out = prepare_gemm(
        x, w, bias, slots, offsets, fan_out, num_slots, x_grouped, y_grouped, trans_w, out
    )
    result = out if result is None else result
    if m == 0:
        return result
    stride_wk, stride_wn = (w.stride(1), w.stride(2)) if trans_w else (w.stride(2), w.stride(1))
    b = w if bias is None else bias  # placeholder pointer when HAS_BIAS is off
    h = out if act_grad is None else act_grad.hcat  # placeholder pointer without act_grad
    precision = dot_precision(x.dtype, allow_tf32)
    tuned = _scatter_gemm_tuned_tma if _tma_tunable(x, w) else _scatter_gemm_tuned
    kernel, meta = _launchable(
        _scatter_gemm_kernel, tuned, _INTERPRETER_GEMM, _IEEE_GEMM, precision, config
    )
    x_desc, w_desc = _descriptors(
        meta, x, w, x_grouped, trans_w, tuned=kernel is _scatter_gemm_tuned_tma
    )
    programs = _programs(meta, x.device)

    def grid(meta: dict) -> tuple[int]:
        return (min(programs, (m // meta["BLOCK_M"] + e) * triton.cdiv(n, meta["BLOCK_N"])),)

    kernel[grid](
        x, x.stride(0), x.stride(1), x_desc,            # X, stride_xm, stride_xk, X_desc
        w, w.stride(0), stride_wk, stride_wn, w_desc,   # W, stride_we, _wk, _wn, W_desc
        b, b.stride(0), b.stride(1),                    # Bias, stride_be, stride_bn
        out, out.stride(0), out.stride(1),              # Y, stride_ym, stride_yn
        h, h.stride(0), h.stride(1),                    # H, stride_hm, stride_hn
        slots, offsets,                                 # slots, offsets
        m, n, k, e, fan_out,                            # M, N, K, E, fan_out
        E_POW2=max(2, next_pow2(e)),
        X_GROUPED=x_grouped, Y_GROUPED=y_grouped, HAS_BIAS=bias is not None,
        PRECISION=precision, W_KN=trans_w,
        ACT_GRAD=act_grad is not None,
        ACTIVATION="relu" if act_grad is None else act_grad.activation,
        GLU=act_grad is not None and act_grad.glu,
        **meta,
    )  # fmt: skip
    return result


@dataclasses.dataclass(frozen=True)
class ActGrad:
    """The activation whose backward ``scatter_gemm``'s epilogue applies: ``hcat``
    [M, 2N | N] grouped pre-activation (GLU: gate columns first), ``glu``, ``activation``
    (one of ``elementwise.ACTIVATIONS``)."""

    hcat: torch.Tensor
    glu: bool
    activation: str


def _act_grad_out(
    act_grad: object,
    x: torch.Tensor,
    w: torch.Tensor,
    slots: torch.Tensor,
    y_grouped: bool,
    trans_w: bool,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Validate ``act_grad`` and return the d_hcat buffer [M, 2N | N] (``out`` or new)."""
    if not isinstance(act_grad, ActGrad):
        raise ValueError(f"act_grad must be an ActGrad or None, got {type(act_grad).__name__}")
    if not y_grouped:
        raise ValueError("act_grad needs y_grouped=True (hcat rows are grouped positions)")
    if act_grad.activation not in ACTIVATIONS or not isinstance(act_grad.glu, bool):
        raise ValueError(
            f"act_grad.activation must be one of {ACTIVATIONS} and glu a bool, got "
            f"{act_grad.activation!r}, {act_grad.glu!r}"
        )
    n = w.shape[2] if trans_w else w.shape[1]
    shape = (slots.numel(), 2 * n if act_grad.glu else n)
    check_tensor("act_grad.hcat", act_grad.hcat, ndim=2, shape=shape, dtype=x.dtype,
                 device=x.device)  # fmt: skip
    _check_out(out, shape, x)
    return torch.empty(shape, dtype=x.dtype, device=x.device) if out is None else out


def _tma_aligned(t: torch.Tensor) -> bool:
    """A tensor descriptor's needs: unit last stride, 16-byte base and outer strides."""
    return (
        t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
    )


def _tma_tunable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the autotuner may also try TMA configs: a Hopper (or later) GPU, 16-bit
    operands, both TMA-aligned."""
    if x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    return _tma_aligned(x) and _tma_aligned(w)


def _descriptors(
    meta: dict, x: torch.Tensor, w: torch.Tensor, x_grouped: bool, trans_w: bool,
    tuned: bool = False,
) -> tuple[TensorDescriptor | None, TensorDescriptor | None]:  # fmt: skip
    """Host tensor descriptors of a ``TMA`` config: w as [E, K, N] (``trans_w``) or
    [E, N, K] in [1, rows, cols] boxes, a grouped x as [M, K]; (None, None) otherwise.
    ``tuned``: for ``_scatter_gemm_tuned_tma``, whose chosen config's pre-hook sets the
    boxes (placeholders here)."""
    if tuned:
        bm, bn, bk = 16, 16, 16
    elif meta.get("TMA", False):
        bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
        for name, t in (("w", w), ("x", x)):
            if not _tma_aligned(t):
                raise ValueError(
                    f"config TMA=True needs {name} with unit last stride, 16-byte aligned "
                    f"base and 16-byte multiple strides, got strides {t.stride()}"
                )
    else:
        return None, None
    box = [1, bk, bn] if trans_w else [1, bn, bk]
    w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), box)
    x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [bm, bk]) if x_grouped else None
    return x_desc, w_desc


def _programs(meta: dict, device: torch.device) -> int:
    """Programs of a ``PERSISTENT`` launch (one per SM; 3 in the interpreter, so the
    tile loop runs several rounds), else no bound."""
    if not meta.get("PERSISTENT", False):
        return 2**31 - 1
    if device.type != "cuda":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count

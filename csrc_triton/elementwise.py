"""Row-wise kernels around the expert GEMMs: the MLP activation and the gated combine.

Notation:
    M        grouped rows             h   hidden units per expert (h_l)
    hcat     [M, 2h] (GLU: gate columns first, then up) or [M, h]
    a        [M, h] activation output: act(gate) * up, or act(hcat)
    T, k     tokens and slots per token; y_slots [T*k, d], gates [T, k], out [T, d]

All arithmetic is fp32; results are cast to the storage dtype on the store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from csrc_triton._common import (
    check_float,
    check_runnable,
    check_tensor,
    fix_interpreter_scalars,
    interpreting,
    next_pow2,
)

ACTIVATIONS = ("silu", "gelu", "relu")

if interpreting():
    fix_interpreter_scalars()


@triton.jit
def _act(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "silu":
        return x * tl.sigmoid(x)
    elif ACTIVATION == "gelu":  # exact (erf) GELU
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    else:
        return tl.maximum(x, 0.0)


@triton.jit
def _act_grad(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "silu":
        s = tl.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        return cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    else:
        return tl.where(x > 0.0, 1.0, 0.0)


@triton.jit
def _activation_fwd_kernel(
    H, stride_hm, stride_hn,
    A, stride_am, stride_an,
    M, HIDDEN,
    ACTIVATION: tl.constexpr, GLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = (rows < M)[:, None] & (cols < HIDDEN)[None, :]
    h_ptrs = H + rows[:, None] * stride_hm + cols[None, :] * stride_hn
    a = _act(tl.load(h_ptrs, mask=ok, other=0.0).to(tl.float32), ACTIVATION)
    if GLU:
        a *= tl.load(h_ptrs + HIDDEN * stride_hn, mask=ok, other=0.0).to(tl.float32)
    a_ptrs = A + rows[:, None] * stride_am + cols[None, :] * stride_an
    tl.store(a_ptrs, a.to(A.dtype.element_ty), mask=ok)


@triton.jit
def _activation_bwd_kernel(
    H, stride_hm, stride_hn,
    DA, stride_dam, stride_dan,
    DH, stride_dhm, stride_dhn,
    M, HIDDEN,
    ACTIVATION: tl.constexpr, GLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = (rows < M)[:, None] & (cols < HIDDEN)[None, :]
    h_ptrs = H + rows[:, None] * stride_hm + cols[None, :] * stride_hn
    dh_ptrs = DH + rows[:, None] * stride_dhm + cols[None, :] * stride_dhn
    da_ptrs = DA + rows[:, None] * stride_dam + cols[None, :] * stride_dan
    da = tl.load(da_ptrs, mask=ok, other=0.0).to(tl.float32)
    store_act_grad(da, h_ptrs, dh_ptrs, stride_hn, stride_dhn, HIDDEN, ok, ACTIVATION, GLU)


@triton.jit
def store_act_grad(da, h_ptrs, dh_ptrs, stride_hn, stride_dhn, HIDDEN, ok,
                   ACTIVATION: tl.constexpr, GLU: tl.constexpr):  # fmt: skip
    """Store the activation's backward of one block: ``da`` (fp32) is d_a at the gate
    columns ``h_ptrs`` of hcat; d_gate = da * act'(gate) goes to ``dh_ptrs`` and, for
    GLU, d_up = da * act(gate) to the up columns HIDDEN further (da scaled by up first)."""
    gate = tl.load(h_ptrs, mask=ok, other=0.0).to(tl.float32)
    if GLU:
        up = tl.load(h_ptrs + HIDDEN * stride_hn, mask=ok, other=0.0).to(tl.float32)
        d_up = da * _act(gate, ACTIVATION)
        tl.store(dh_ptrs + HIDDEN * stride_dhn, d_up.to(dh_ptrs.dtype.element_ty), mask=ok)
        da *= up
    d_gate = da * _act_grad(gate, ACTIVATION)
    tl.store(dh_ptrs, d_gate.to(dh_ptrs.dtype.element_ty), mask=ok)


@triton.jit
def _combine_fwd_kernel(
    Y, stride_ym, stride_yd,
    G, stride_gt, stride_gk,
    OUT, stride_ot, stride_od,
    D,
    K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    j = tl.arange(0, K_POW2)
    gates = tl.load(G + token * stride_gt + j * stride_gk, mask=j < K, other=0.0)
    y_ptrs = Y + (token * K + j)[:, None] * stride_ym + cols[None, :] * stride_yd
    y = tl.load(y_ptrs, mask=(j < K)[:, None] & (cols < D)[None, :], other=0.0)
    out = tl.sum(gates.to(tl.float32)[:, None] * y.to(tl.float32), axis=0)
    o_ptrs = OUT + token * stride_ot + cols * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=cols < D)


@triton.jit
def _combine_bwd_kernel(
    Y, stride_ym, stride_yd,
    G, stride_gt, stride_gk,
    DOUT, stride_dot, stride_dod,
    DY, stride_dym, stride_dyd,
    DG, stride_dgt, stride_dgk,
    D,
    K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, K_POW2)
    gates = tl.load(G + token * stride_gt + j * stride_gk, mask=j < K, other=0.0)
    gates = gates.to(tl.float32)
    d_gates = tl.zeros((K_POW2,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = (j < K)[:, None] & (cols < D)[None, :]
        dout = tl.load(DOUT + token * stride_dot + cols * stride_dod, mask=cols < D, other=0.0)
        dout = dout.to(tl.float32)
        y_ptrs = Y + (token * K + j)[:, None] * stride_ym + cols[None, :] * stride_yd
        y = tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32)
        d_gates += tl.sum(y * dout[None, :], axis=1)
        dy_ptrs = DY + (token * K + j)[:, None] * stride_dym + cols[None, :] * stride_dyd
        tl.store(dy_ptrs, (gates[:, None] * dout[None, :]).to(DY.dtype.element_ty), mask=ok)
    tl.store(DG + token * stride_dgt + j * stride_dgk, d_gates.to(DG.dtype.element_ty), mask=j < K)


def _activation_args(hcat: torch.Tensor, glu: bool, activation: str) -> int:
    """Validate and return the hidden width h."""
    check_tensor("hcat", hcat, ndim=2)
    check_float("hcat", hcat)
    check_runnable("hcat", hcat)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if glu and hcat.shape[1] % 2:
        raise ValueError(f"hcat must have an even width for GLU, got {hcat.shape[1]}")
    return hcat.shape[1] // 2 if glu else hcat.shape[1]


def _row_blocks(m: int, hidden: int) -> tuple[int, int]:
    block_h = min(next_pow2(hidden), 64 if interpreting() else 1024)
    block_m = max(1, (256 if interpreting() else 4096) // block_h)
    return block_m, block_h


def activation_fwd(hcat: torch.Tensor, *, glu: bool, activation: str) -> torch.Tensor:
    """``a = act(hcat[:, :h]) * hcat[:, h:]`` (GLU) or ``act(hcat)``; [M, 2h or h] -> [M, h]."""
    _activation_args(hcat, glu, activation)
    return launch_activation(hcat, glu=glu, activation=activation)


def launch_activation(hcat: torch.Tensor, *, glu: bool, activation: str) -> torch.Tensor:
    """:func:`activation_fwd` without the argument checks, for callers whose ``hcat`` is
    consistent by construction (the layer's inference path)."""
    m = hcat.shape[0]
    hidden = hcat.shape[1] // 2 if glu else hcat.shape[1]
    out = torch.empty((m, hidden), dtype=hcat.dtype, device=hcat.device)
    if m == 0 or hidden == 0:
        return out
    block_m, block_h = _row_blocks(m, hidden)
    _activation_fwd_kernel[(triton.cdiv(m, block_m), triton.cdiv(hidden, block_h))](
        hcat, hcat.stride(0), hcat.stride(1),   # H, stride_hm, stride_hn
        out, out.stride(0), out.stride(1),      # A, stride_am, stride_an
        m, hidden,                              # M, HIDDEN
        ACTIVATION=activation, GLU=glu, BLOCK_M=block_m, BLOCK_H=block_h,
    )  # fmt: skip
    return out


def activation_bwd(
    hcat: torch.Tensor, d_a: torch.Tensor, *, glu: bool, activation: str
) -> torch.Tensor:
    """Gradient of :func:`activation_fwd` w.r.t. ``hcat`` given ``d_a`` [M, h]."""
    hidden = _activation_args(hcat, glu, activation)
    m = hcat.shape[0]
    check_tensor("d_a", d_a, ndim=2, shape=(m, hidden), dtype=hcat.dtype, device=hcat.device)
    out = torch.empty_like(hcat, memory_format=torch.contiguous_format)
    if m == 0 or hidden == 0:
        return out
    block_m, block_h = _row_blocks(m, hidden)
    _activation_bwd_kernel[(triton.cdiv(m, block_m), triton.cdiv(hidden, block_h))](
        hcat, hcat.stride(0), hcat.stride(1),   # H, stride_hm, stride_hn
        d_a, d_a.stride(0), d_a.stride(1),      # DA, stride_dam, stride_dan
        out, out.stride(0), out.stride(1),      # DH, stride_dhm, stride_dhn
        m, hidden,                              # M, HIDDEN
        ACTIVATION=activation, GLU=glu, BLOCK_M=block_m, BLOCK_H=block_h,
    )  # fmt: skip
    return out


def _combine_args(y_slots: torch.Tensor, gates: torch.Tensor) -> tuple[int, int, int]:
    """Validate and return (T, k, d)."""
    check_tensor("y_slots", y_slots, ndim=2)
    check_float("y_slots", y_slots)
    check_runnable("y_slots", y_slots)
    check_tensor("gates", gates, ndim=2, device=y_slots.device)
    check_float("gates", gates)
    t, k = gates.shape
    if y_slots.shape[0] != t * k:
        raise ValueError(
            f"y_slots has {y_slots.shape[0]} rows, expected T*k = {t}*{k} "
            f"for gates of shape {tuple(gates.shape)}"
        )
    return t, k, y_slots.shape[1]


def combine_fwd(y_slots: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j gates[t, j] * y_slots[t*k + j]``; [T*k, d], [T, k] -> [T, d]."""
    _combine_args(y_slots, gates)
    return launch_combine(y_slots, gates)


def launch_combine(y_slots: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """:func:`combine_fwd` without the argument checks, for callers whose tensors are
    consistent by construction (the layer's inference path)."""
    (t, k), d = gates.shape, y_slots.shape[1]
    out = torch.empty((t, d), dtype=y_slots.dtype, device=y_slots.device)
    if t == 0 or d == 0:
        return out
    block_d = min(next_pow2(d), 64 if interpreting() else 1024)
    _combine_fwd_kernel[(t, triton.cdiv(d, block_d))](
        y_slots, y_slots.stride(0), y_slots.stride(1),  # Y, stride_ym, stride_yd
        gates, gates.stride(0), gates.stride(1),        # G, stride_gt, stride_gk
        out, out.stride(0), out.stride(1),              # OUT, stride_ot, stride_od
        d,                                              # D
        K=k, K_POW2=next_pow2(k), BLOCK_D=block_d,
    )  # fmt: skip
    return out


def combine_bwd(
    y_slots: torch.Tensor, gates: torch.Tensor, d_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`combine_fwd`: (d_y_slots [T*k, d], d_gates [T, k] in gates' dtype)."""
    t, k, d = _combine_args(y_slots, gates)
    check_tensor("d_out", d_out, ndim=2, shape=(t, d), dtype=y_slots.dtype, device=y_slots.device)
    d_y = torch.empty((t * k, d), dtype=y_slots.dtype, device=y_slots.device)
    d_gates = torch.empty((t, k), dtype=gates.dtype, device=gates.device)
    if t == 0:
        return d_y, d_gates
    if d == 0:
        return d_y, d_gates.zero_()
    block_d = min(next_pow2(d), 64 if interpreting() else 512)
    _combine_bwd_kernel[(t,)](
        y_slots, y_slots.stride(0), y_slots.stride(1),  # Y, stride_ym, stride_yd
        gates, gates.stride(0), gates.stride(1),        # G, stride_gt, stride_gk
        d_out, d_out.stride(0), d_out.stride(1),        # DOUT, stride_dot, stride_dod
        d_y, d_y.stride(0), d_y.stride(1),              # DY, stride_dym, stride_dyd
        d_gates, d_gates.stride(0), d_gates.stride(1),  # DG, stride_dgt, stride_dgk
        d,                                              # D
        K=k, K_POW2=next_pow2(k), BLOCK_D=block_d,
    )  # fmt: skip
    return d_y, d_gates

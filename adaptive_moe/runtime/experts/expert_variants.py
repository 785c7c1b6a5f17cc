"""The expert-MLP variants of ``strategy.KERNELS`` (see ``adaptive_moe.runtime.experts.kernels``
for the notation and what each computes); ``expert_mlp`` validates and dispatches here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adaptive_moe.runtime.experts.grouping import ExpertRows, GroupedRows
from adaptive_moe.runtime.experts.kernel_autograd import (
    ActDownProj,
    ParallelLinear,
    _activation,
    _GroupedDownProj,
    _remat,
)
from adaptive_moe.runtime.experts.kernel_twins import ActivationFn, activation_torch


def _row_align(dtype: torch.dtype) -> int:
    """Elements per 16 bytes: torch._grouped_mm's TMA loads need rows of a multiple."""
    return 16 // dtype.itemsize


def _to_slots(y_grouped: Tensor, sorted_slots: Tensor, num_slots: int) -> Tensor:
    """[M, d] grouped -> [N, d] slot space (N = ``num_slots``), unrouted slots 0."""
    y = y_grouped.new_zeros((num_slots, y_grouped.shape[1]))
    return y.index_copy(0, sorted_slots, y_grouped)


def _expert_of_rows(counts: Tensor, total: int) -> Tensor:
    """[total] expert id of each row of a buffer holding counts[e] rows per expert."""
    experts = torch.arange(counts.numel(), device=counts.device)
    return torch.repeat_interleave(experts, counts, output_size=total)


def _mlp_loop(
    x: Tensor,
    rows: ExpertRows,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    glu: bool,
    activation: ActivationFn,
) -> Tensor:
    src = rows.input_rows  # [M]
    outs, start = [], 0
    for e, count in enumerate(rows.counts):
        xe = x[src[start : start + count]]  # [c_e, d]
        h = xe @ w1[e].T  # [c_e, 2h or h]
        if b1 is not None:
            h = h + b1[e]
        outs.append(activation_torch(h, glu=glu, activation=activation) @ w2[e].T)  # [c_e, d]
        start += count
    return _to_slots(torch.cat(outs), rows.sorted_slots, rows.num_slots)


def _mlp_bmm(
    x: Tensor,
    rows: ExpertRows,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    glu: bool,
    activation: ActivationFn,
) -> Tensor:
    n_exp, m, d = rows.num_experts, rows.num_rows, x.shape[1]
    capacity = max(rows.counts)
    counts = rows.offsets.diff()  # [E]
    expert = _expert_of_rows(counts, m)  # [M]
    # Grouped position i of expert e sits at row e * capacity + (i - offsets[e]).
    pos = torch.arange(m, device=x.device) + expert * capacity - rows.offsets[expert]
    padded = x.new_zeros((n_exp * capacity, d)).index_copy(0, pos, x[rows.input_rows])
    h = torch.bmm(padded.view(n_exp, capacity, d), w1.transpose(1, 2))  # [E, C, 2h or h]
    if b1 is not None:
        h = h + b1[:, None, :]
    a = _activation(h.view(n_exp * capacity, w1.shape[1]), glu, activation)  # [E*C, h]
    a = a.view(n_exp, capacity, w2.shape[2])
    y = torch.bmm(a, w2.transpose(1, 2)).view(n_exp * capacity, d)  # [E*C, d]
    return _to_slots(y[pos], rows.sorted_slots, rows.num_slots)


def _mlp_grouped_mm(
    x: Tensor,
    rows: GroupedRows,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    glu: bool,
    activation: ActivationFn,
) -> Tensor:
    """Every grouped position must be routed (``offsets[-1] == M``): ``ExpertRows``, or
    device-grouped rows with ``covers_all_slots``. Reads no host count: the buffer is
    sized by its bound, so the forward can run without a device-to-host sync."""
    return grouped_mm_slots(
        x, rows.sorted_slots, rows.offsets, rows.fan_out, rows.num_slots, w1, b1, w2,
        glu, activation, traced=False,
    )  # fmt: skip


def grouped_mm_slots(
    x: Tensor,
    sorted_slots: Tensor,
    offsets: Tensor,
    fan_out: int,
    num_slots: int,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    glu: bool,
    activation: ActivationFn,
    *,
    traced: bool,
) -> Tensor:
    """The ``grouped_mm`` variant on the grouping's tensors (``GroupedRows``' fields):
    slot outputs y [num_slots, d]. ``traced``: for ``torch.compile`` (``inference.compiled``)
    -- plain torch ops only, the activation's output left to the compiler's partitioner
    (which recomputes it in backward) instead of this module's Triton activation and
    ``Remat``."""
    m, d, n_exp = sorted_slots.numel(), x.shape[1], w1.shape[0]
    align = _row_align(x.dtype)
    # Every expert gets a positive multiple of `align` rows: TMA needs 16-byte aligned group
    # starts, and CUTLASS's ragged-K (weight-gradient) grouped GEMM may reject empty groups.
    # Rows past the last group's end are never read by a GEMM nor gathered back.
    counts = offsets.diff()  # [E]
    padded_counts = (counts + align - 1).div(align, rounding_mode="floor")
    padded_counts = padded_counts.clamp(min=1) * align  # [E]
    total = m + n_exp * align  # >= sum(padded_counts)
    ends = padded_counts.cumsum(0)  # [E]
    expert = _expert_of_rows(counts, m)  # [M]
    pos = torch.arange(m, device=x.device) - offsets[expert] + (ends - padded_counts)[expert]
    src = torch.div(sorted_slots, fan_out, rounding_mode="floor")  # [M]
    buf = x.new_zeros((total, d)).index_copy(0, pos, x[src])  # [M_pad, d]
    offs = ends.to(torch.int32)
    h = torch._grouped_mm(buf, w1.transpose(1, 2), offs=offs)  # [M_pad, 2h or h]
    if b1 is not None:
        # Expert of each buffer row; the spare rows past the last group (E) read a zero
        # row whose gradient, summed from their unused values, is dropped.
        row_expert = torch.searchsorted(ends, torch.arange(total, device=x.device), right=True)
        h = h + torch.cat([b1, b1.new_zeros((1, b1.shape[1]))])[row_expert]
    if traced:
        a = activation_torch(h, glu=glu, activation=activation)  # [M_pad, h]
        y = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)  # [M_pad, d]
    else:
        a = _activation(h, glu, activation)  # [M_pad, h]
        remat = _remat(h, glu, activation)
        if remat is None:
            y = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)  # [M_pad, d]
        else:
            y = _GroupedDownProj.apply(a, w2, offs, remat)  # [M_pad, d]
    return _to_slots(y[pos], sorted_slots, num_slots)  # [N, d]


def _mlp_scatter(
    x: Tensor,
    rows: ExpertRows,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    glu: bool,
    activation: ActivationFn,
) -> Tensor:
    return _scatter_mlp(x, rows, w1, b1, w2, glu, activation, small=False)


def _mlp_gemv(
    x: Tensor,
    rows: ExpertRows,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    glu: bool,
    activation: ActivationFn,
) -> Tensor:
    return _scatter_mlp(x, rows, w1, b1, w2, glu, activation, small=True)


def _scatter_mlp(
    x: Tensor,
    rows: GroupedRows,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    glu: bool,
    activation: ActivationFn,
    small: bool,
    fuse_act_grad: bool = False,
) -> Tensor:
    """The differentiable Triton MLP; ``rows`` may be device-grouped (no host counts).

    ``fuse_act_grad``: the activation and the second linear as one ``ActDownProj``
    (the activation's backward in the input-gradient GEMM's epilogue), where the
    activation is named and a backward will run. Off until measured on the GPU
    (``benchmarks/kernel_variants.py``); same results up to rounding either way."""
    # fp32 follows torch's own switch, so every variant rounds fp32 matmuls alike.
    tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    hcat = ParallelLinear.apply(x, w1, b1, rows, False, True, tf32, small)  # [M, 2h|h] grouped
    remat = _remat(hcat, glu, activation)
    if fuse_act_grad and remat is not None:
        return ActDownProj.apply(hcat, w2, rows, glu, activation, tf32, small)  # [N, d]
    a = _activation(hcat, glu, activation)  # [M, h]
    return ParallelLinear.apply(a, w2, None, rows, True, False, tf32, small, remat)  # [N, d]


_VARIANTS = {
    "loop": _mlp_loop,
    "bmm": _mlp_bmm,
    "grouped_mm": _mlp_grouped_mm,
    "scatter": _mlp_scatter,
    "gemv": _mlp_gemv,
}

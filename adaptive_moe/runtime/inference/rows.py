"""The static path's device-side grouping, expert compute, combine and loss: every
shape a function of (T, k, W, T_pad), with no host counts (``inference.static``)."""

from __future__ import annotations

import dataclasses
import itertools

import torch
from torch import Tensor

from adaptive_moe.runtime.experts.grouping import ExpertRows, sort_by_expert
from adaptive_moe.runtime.experts.kernels import (
    _TRITON_DTYPES,
    ActivationFn,
    _autocast_inputs,
    _check_grouped_mm,
    _mlp_grouped_mm,
    _scatter_mlp,
    _triton_usable,
    activation_torch,
    combine_slots,
    expert_mlp,
)
from adaptive_moe.runtime.inference.config import DEVICE_OFFSET_KERNELS
from csrc_triton._common import dot_precision

# ---------------------------------------------------------------- grouping on the device


@dataclasses.dataclass(frozen=True)
class StaticRows:
    """Every slot grouped by local expert, with device offsets (no host counts).

    Attributes:
        sorted_slots: [N] int64, all N slots: expert 0's first (stable), then expert 1's,
            ...; slots of no local expert last (past ``offsets[-1]``).
        offsets: [E_l + 1] int64 on the device: expert e owns positions
            [offsets[e], offsets[e + 1]).
        fan_out: slots per input row.
        complete: True when the caller knows every slot has a local expert (one process,
            nothing dropped): slot-space outputs are then fully written by the kernels.
    """

    sorted_slots: Tensor
    offsets: Tensor
    fan_out: int
    complete: bool = False

    @property
    def num_slots(self) -> int:
        return int(self.sorted_slots.numel())

    @property
    def covers_all_slots(self) -> bool:
        """Whether every slot is known to be routed here (``complete``): then no
        slot-space output needs zeroing first."""
        return self.complete

    @property
    def num_experts(self) -> int:
        return int(self.offsets.numel()) - 1

    def to_expert_rows(self) -> ExpertRows:
        """The host-count form the ``loop`` / ``bmm`` / ``grouped_mm`` kernels need (one
        device-to-host copy of the offsets)."""
        bounds = self.offsets.tolist()
        counts = tuple(b - a for a, b in itertools.pairwise(bounds))
        return ExpertRows(
            sorted_slots=self.sorted_slots[: bounds[-1]],
            offsets=self.offsets,
            counts=counts,
            fan_out=self.fan_out,
            num_slots=self.num_slots,
        )


def group_static(
    expert_of_slot: Tensor,
    num_experts: int,
    fan_out: int,
    complete: bool = False,
    *,
    bounds: Tensor | None = None,
) -> StaticRows:
    """Group slots by expert on the device. ``expert_of_slot`` [N] int, -1 = not here
    (``complete``: the caller knows there is no -1, so nothing is moved last).
    ``bounds``: ``arange(num_experts + 1)`` int64 on the slots' device, if the caller
    keeps one (saves a fill per call)."""
    if expert_of_slot.dim() != 1:
        raise ValueError(f"expert_of_slot must be 1-D, got shape {tuple(expert_of_slot.shape)}")
    order, offsets = sort_by_expert(expert_of_slot, num_experts, complete, bounds)
    return StaticRows(order, offsets, fan_out, complete)


# ---------------------------------------------------------------- expert compute


def static_expert_mlp(
    x: Tensor,
    rows: StaticRows,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    *,
    glu: bool,
    activation: ActivationFn,
    kernel: str,
    launch_configs: dict | None = None,
) -> Tensor:
    """Slot outputs y [N, d] of every grouped slot, 0 for slots past ``offsets[-1]``.

    ``scatter`` / ``gemv`` (where Triton runs) read the offsets on the device over
    fixed-size buffers, and so does ``grouped_mm`` when every slot is routed
    (``rows.complete``: its buffer is sized by a bound, and no slot-space output needs a
    zero fill); any other case runs through ``expert_mlp`` with host counts.
    ``launch_configs``: a dict the caller keeps, in which ``gemv`` remembers the
    autotuner's choice per problem and then launches it directly
    (``csrc_triton.gemv.launch_gemv``)."""
    x, w1, b1, w2 = _autocast_inputs(x, w1, b1, w2)  # as every matmul under autocast
    _check_mlp_inputs(x, w1, w2)
    if kernel == "grouped_mm" and rows.complete:
        _check_grouped_mm(x, w1, w2, w2.shape[2], w1.shape[0])
        with torch.autocast(x.device.type, enabled=False):
            return _mlp_grouped_mm(x, rows, w1, b1, w2, glu, activation)
    if kernel not in DEVICE_OFFSET_KERNELS or not _triton_usable(x.device, x.dtype):
        return expert_mlp(
            x, rows.to_expert_rows(), w1, b1, w2, glu=glu, activation=activation, kernel=kernel
        )
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2)):
        # One-process training without host counts (MoELayer's device-grouped forward).
        return _scatter_mlp(x, rows, w1, b1, w2, glu, activation, small=kernel == "gemv")
    n, slots, offsets = rows.num_slots, rows.sorted_slots, rows.offsets
    tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    if kernel == "gemv":
        # The layer's own tensors, consistent by construction: the unchecked launcher
        # (the checked ``grouped_gemv`` would validate the same arguments every call).
        from csrc_triton.gemv import launch_gemv

        precision = dot_precision(x.dtype, tf32)

        def gemm(a: Tensor, w: Tensor, b: Tensor | None, grouped: bool, out: Tensor | None):
            return launch_gemv(
                a, w, b, slots, offsets, out=out, fan_out=rows.fan_out, num_slots=n,
                x_grouped=grouped, y_grouped=not grouped, precision=precision,
                configs=launch_configs,
            )  # fmt: skip
    else:
        from csrc_triton.scatter_gemm import scatter_gemm

        def gemm(a: Tensor, w: Tensor, b: Tensor | None, grouped: bool, out: Tensor | None):
            return scatter_gemm(
                a, w, b, slots, offsets, fan_out=rows.fan_out, num_slots=n,
                x_grouped=grouped, y_grouped=not grouped, allow_tf32=tf32, out=out,
            )  # fmt: skip

    # hcat [N, 2h or h] grouped: rows past offsets[-1] are never written nor read again.
    hcat = gemm(x, w1, b1, False, None)
    a = _activation(hcat, glu, activation)  # [N, h]
    fill = torch.empty if rows.complete else torch.zeros  # unrouted slots stay 0
    y = fill((n, w2.shape[1]), dtype=x.dtype, device=x.device)  # [N, d]
    return gemm(a, w2, None, True, y)


def _activation(hcat: Tensor, glu: bool, activation: ActivationFn) -> Tensor:
    """[M, h] of hcat [M, 2h or h]: the Triton kernel for a named activation, torch for
    a callable one (``ExpertConfig``)."""
    if isinstance(activation, str):
        from csrc_triton.elementwise import launch_activation

        return launch_activation(hcat, glu=glu, activation=activation)
    return activation_torch(hcat, glu=glu, activation=activation)


def combine_static(y_slots: Tensor, gates: Tensor) -> Tensor:
    """``kernels.combine_slots``, without its autograd node when no gradient is recorded:
    y [T, d] of y_slots [T*k, d] and gates [T, k] (shapes are the layer's)."""
    recording = torch.is_grad_enabled() and (y_slots.requires_grad or gates.requires_grad)
    triton = _triton_usable(y_slots.device, y_slots.dtype) and gates.dtype in _TRITON_DTYPES
    if triton and not recording:
        from csrc_triton.elementwise import launch_combine

        return launch_combine(y_slots, gates)
    return combine_slots(y_slots, gates)


def _check_mlp_inputs(x: Tensor, w1: Tensor, w2: Tensor) -> None:
    if w1.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(
            f"x is {x.dtype} but the expert weights are {w1.dtype}; "
            "cast the input (or the layer) to one dtype"
        )


# ---------------------------------------------------------------- losses


def balance_loss_static(scores: Tensor, demand: Tensor) -> Tensor:
    """``E * sum_e f_e * P_e`` as ``router.balance_loss``, with the total number of slots
    summed on the device (padding rows are not slots, so it is not known on the host)."""
    if scores.shape[0] == 0:
        return scores.sum() * 0.0
    f = demand.to(scores.dtype) / demand.sum().clamp(min=1).to(scores.dtype)  # [E]
    return scores.shape[1] * torch.sum(f * scores.mean(dim=0))

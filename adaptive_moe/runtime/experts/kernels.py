"""Expert compute: the grouped expert MLP in interchangeable variants, and the gated combine.

Notation (see adaptive_moe.runtime.experts.grouping and adaptive_moe.core.config):
    x      [N_in, d]                 input rows; slot s reads row s // fan_out
    rows   ExpertRows                M grouped positions over E_l local experts
    w1     [E_l, 2*h_l or h_l, d]    gate_up_proj (GLU, gate rows first) or up_proj
    b1     [E_l, 2*h_l or h_l]       optional bias of w1 (the down bias is the caller's)
    w2     [E_l, d, h_l]             down_proj
    hcat   [M, 2*h_l or h_l]         grouped pre-activation; a [M, h_l] activation output
    y      [N, d]                    slot space, N = rows.num_slots; unrouted slots are 0

Variants (``strategy.KERNELS``), all computing the same function:
    loop        per-expert torch loop with index ops: the readable reference, runs anywhere
    scatter     Triton grouped GEMMs that gather / scatter rows inside the kernel
                (csrc_triton): no padded or regrouped copy of x or y is ever built
    gemv        the same contract with small-row tiles and split-K (csrc_triton.gemv):
                decode-sized batches, where the work is a read of the touched weights;
                its backward is scatter's
    bmm         rows copied into a padded [E_l, max_count, d] batch, torch.bmm
    grouped_mm  rows copied into a grouped buffer (each expert padded to 16 bytes),
                torch._grouped_mm (CUTLASS on sm90 / sm100 in bf16)

This module holds the public entry points, their validation and the kernel choice; the
variants live in ``expert_variants``, their autograd Functions in ``kernel_autograd``, and
the ``*_torch`` plain-torch twins of the Triton launchers (same arguments, same results up
to rounding; tests compare each kernel with its twin) in ``kernel_twins``. The names the
rest of the package imports from here are re-exported.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from adaptive_moe.core.config import check_activation
from adaptive_moe.core.strategy import KERNELS
from adaptive_moe.runtime.experts.expert_variants import (  # noqa: F401 (re-exported)
    _VARIANTS,
    _mlp_grouped_mm,
    _row_align,
    _scatter_mlp,
)
from adaptive_moe.runtime.experts.grouping import ExpertRows
from adaptive_moe.runtime.experts.kernel_autograd import (  # noqa: F401 (re-exported)
    _TRITON_DTYPES,
    ParallelLinear,
    Remat,
    _Combine,
    _triton_usable,
)
from adaptive_moe.runtime.experts.kernel_twins import (  # noqa: F401 (re-exported)
    ActivationFn,
    _describe,
    activation_torch,
    combine_torch,
    group_bias_grad_torch,
    group_weight_grad_torch,
    scatter_gemm_torch,
)

# ---------------------------------------------------------------- availability


def _grouped_mm_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm (torch >= 2.11): CUTLASS on sm90 / sm100 for bf16 only (other CUDA
    dtypes fall back to a host-synchronising loop, so they are not offered); a per-group
    mm loop on CPU for fp32 / bf16 / fp16."""
    if device.type == "cuda":
        major = torch.cuda.get_device_capability(device)[0]
        return dtype == torch.bfloat16 and major in (9, 10)
    return device.type == "cpu" and dtype in _TRITON_DTYPES


def available_kernels(
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    d_model: int | None = None,
    hidden: int | None = None,
) -> tuple[str, ...]:
    """Expert-compute variants usable for ``dtype`` on ``device``, default first.

    Given the layer's ``d_model`` and local hidden size ``hidden`` (h_l), variants that
    cannot run that shape are left out too (``grouped_mm`` needs 16-byte rows)."""
    device = torch.device(device)
    if device.type == "cuda":
        order = ("scatter", "grouped_mm", "bmm", "loop", "gemv")
    else:
        order = ("loop", "bmm", "grouped_mm", "scatter", "gemv")
    usable = {
        "scatter": _triton_usable(device, dtype),
        "gemv": _triton_usable(device, dtype),
        "grouped_mm": _grouped_mm_usable(device, dtype)
        and all(n is None or n % _row_align(dtype) == 0 for n in (d_model, hidden)),
        "bmm": dtype.is_floating_point,
        "loop": dtype.is_floating_point,
    }
    return tuple(name for name in order if usable[name])


def default_kernel(device: torch.device | str, dtype: torch.dtype) -> str:
    """The variant used when no strategy table says otherwise."""
    kernels = available_kernels(device, dtype)
    if not kernels:
        raise ValueError(f"no expert kernel supports dtype {dtype} on {device}")
    return kernels[0]


# Kernels a layer without a table measures on CUDA: the loop is never competitive there
# (minutes on 256 experts), and bmm pads every expert to the busiest one's rows (memory
# grows with skew) while never beating grouped_mm in our measurements.
MEASURED_KERNELS = ("scatter", "grouped_mm")


def time_expert_kernels(
    x: Tensor,
    rows: ExpertRows,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    *,
    glu: bool,
    activation: ActivationFn,
    kernels: Sequence[str],
    warmup: int = 1,
    repeats: int = 3,
) -> list[float]:
    """Median ms of forward (+ backward when grad mode is on) of each of ``kernels`` on
    this problem (shapes as in :func:`expert_mlp`).

    Gradients come from ``torch.autograd.grad``: nothing accumulates into ``.grad``, and
    the caller's graph is untouched (``x`` is detached). CUDA events on GPU,
    ``perf_counter`` after a synchronisation elsewhere."""
    on_gpu = x.device.type == "cuda"
    xd = x.detach().requires_grad_(torch.is_grad_enabled())
    params = [t for t in (w1, b1, w2) if t is not None and t.requires_grad]
    inputs = [xd, *params] if torch.is_grad_enabled() else []
    grad_y = torch.randn(rows.num_slots, x.shape[1], device=x.device, dtype=x.dtype)

    def once(kernel: str) -> None:
        y = expert_mlp(xd, rows, w1, b1, w2, glu=glu, activation=activation, kernel=kernel)
        if inputs:
            torch.autograd.grad(y, inputs, grad_y, allow_unused=True)

    medians = []
    for kernel in kernels:
        for _ in range(warmup):  # compiles and autotunes outside the timing
            once(kernel)
        times = []
        for _ in range(repeats):
            if on_gpu:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                once(kernel)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                once(kernel)
                times.append((time.perf_counter() - t0) * 1e3)
        medians.append(statistics.median(times))
    return medians


@dataclasses.dataclass
class KernelChoice:
    """The expert kernel of a layer without a table, measured once per problem key.

    On the first call for a key (device, dtype and a bucket of the workload that every
    rank computes alike), ``choose`` times each candidate on that call's own problem
    through ``measure`` (ms per candidate), reduces the times with ``reduce`` (the
    group's MAX, so that every rank settles on the same kernel; identity alone), keeps
    the fastest and caches it here, on the layer's object: later calls with that key pay
    a dict lookup.
    """

    chosen: dict[tuple[object, ...], str] = dataclasses.field(default_factory=dict)
    times: dict[tuple[object, ...], dict[str, float]] = dataclasses.field(default_factory=dict)

    def choose(
        self,
        key: tuple[object, ...],
        candidates: Sequence[str],
        measure: Callable[[Sequence[str]], list[float]],
        reduce: Callable[[list[float]], list[float]] | None = None,
    ) -> str:
        """The cached kernel for ``key``, measuring ``candidates`` first if there is none."""
        if key in self.chosen:
            return self.chosen[key]
        if not candidates:
            raise ValueError("candidates must name at least one kernel")
        if len(candidates) == 1:
            ms = [0.0]
        else:
            ms = measure(candidates)
            if reduce is not None:
                ms = reduce(list(ms))
            if len(ms) != len(candidates):
                raise ValueError(f"measure returned {len(ms)} times for {len(candidates)} kernels")
        best = min(range(len(ms)), key=ms.__getitem__)  # ties: the earlier candidate
        self.times[key] = dict(zip(candidates, ms))
        self.chosen[key] = candidates[best]
        return self.chosen[key]


# ---------------------------------------------------------------- public entry points


def expert_mlp(
    x: Tensor,
    rows: ExpertRows,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    *,
    glu: bool,
    activation: ActivationFn,
    kernel: str,
) -> Tensor:
    """Run every routed slot through its expert's MLP.

    For grouped position i of expert e, slot ``s = rows.sorted_slots[i]`` and
    ``hcat = x[s // fan_out] @ w1[e].T (+ b1[e])``; ``a = act(gate) * up`` (GLU) or
    ``act(hcat)``; ``y[s] = a @ w2[e].T``. Shapes in the module docstring.

    Under ``torch.autocast`` the inputs are cast to the autocast dtype first (as any
    matmul would be), so every variant computes in the same precision.

    Returns:
        y: [rows.num_slots, d] in the compute dtype; slots not in ``rows`` are exactly 0.
    """
    x, w1, b1, w2 = _autocast_inputs(x, w1, b1, w2)
    _check_mlp_args(x, rows, w1, b1, w2, glu, activation, kernel)
    with torch.autocast(x.device.type, enabled=False):
        return _VARIANTS[kernel](x, rows, w1, b1, w2, glu, activation)


def combine_slots(y_slots: Tensor, gates: Tensor) -> Tensor:
    """``out[t] = sum_j gates[t, j] * y_slots[t*k + j]``, accumulated in fp32.

    Args:
        y_slots: [T*k, d] expert outputs in slot space.
        gates: [T, k] gate weights (fp32 from the router).

    Returns:
        out: [T, d] in y_slots' dtype; differentiable w.r.t. both inputs.
    """
    _check_combine_args(y_slots, gates)
    if _triton_usable(y_slots.device, y_slots.dtype) and gates.dtype in _TRITON_DTYPES:
        return _Combine.apply(y_slots, gates)
    return combine_torch(y_slots, gates)


def bias_combine(b2: Tensor, topk_ids: Tensor, gates: Tensor, dtype: torch.dtype) -> Tensor:
    """The down-projection bias's share of the combine: [T, d]
    ``sum_j gates[t, j] * b2[ids[t, j]]`` in fp32, cast to ``dtype``; b2 [E, d]
    (dropped slots have gate 0: any expert's bias row stands in for them)."""
    bias = (gates.unsqueeze(-1) * b2[topk_ids.clamp(min=0)].float()).sum(1)  # [T, d]
    return bias.to(dtype)


# ---------------------------------------------------------------- validation


def _check_mlp_args(
    x: Tensor,
    rows: ExpertRows,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    glu: bool,
    activation: ActivationFn,
    kernel: str,
) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    check_activation(activation)
    if not isinstance(glu, bool):
        raise ValueError(f"glu must be a bool, got {glu!r}")
    if not isinstance(rows, ExpertRows):
        raise ValueError(f"rows must be an ExpertRows, got {type(rows).__name__}")
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a 2-D floating tensor [N_in, d], got {_describe(x)}")
    if rows.num_slots != x.shape[0] * rows.fan_out:
        raise ValueError(
            f"rows.num_slots={rows.num_slots} must equal x rows * fan_out = "
            f"{x.shape[0]} * {rows.fan_out}"
        )
    if rows.sorted_slots.device != x.device:
        raise ValueError(f"rows are on {rows.sorted_slots.device} but x is on {x.device}")
    e, d = rows.num_experts, x.shape[1]
    _check_weight("w1", w1, x, (e, None, d))
    if glu and w1.shape[1] % 2:
        raise ValueError(f"w1 must have 2*h_l rows for GLU, got {w1.shape[1]}")
    hidden = w1.shape[1] // 2 if glu else w1.shape[1]
    _check_weight("w2", w2, x, (e, d, hidden))
    if b1 is not None:
        _check_weight("b1", b1, x, (e, w1.shape[1]))
    if kernel not in available_kernels(x.device, x.dtype):
        raise ValueError(
            f"kernel={kernel!r} is not available for {x.dtype} on {x.device}; "
            f"available: {available_kernels(x.device, x.dtype)}"
        )
    if kernel == "grouped_mm":
        _check_grouped_mm(x, w1, w2, hidden, e)


def _check_weight(name: str, w: object, x: Tensor, shape: tuple[int | None, ...]) -> None:
    if not isinstance(w, Tensor) or w.dim() != len(shape):
        raise ValueError(f"{name} must be a {len(shape)}-D tensor, got {_describe(w)}")
    if any(s is not None and s != n for s, n in zip(shape, w.shape)):
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name} must have shape {want}, got {tuple(w.shape)}")
    if w.dtype != x.dtype or w.device != x.device:
        raise ValueError(
            f"{name} is {w.dtype} on {w.device} but x is {x.dtype} on {x.device}; "
            "cast the weights (or use torch.autocast)"
        )


def _check_grouped_mm(
    x: Tensor, w1: Tensor, w2: Tensor, hidden: int, experts: int, dtype: torch.dtype | None = None
) -> None:
    """torch._grouped_mm reads every matrix with TMA: 16-byte aligned rows and bases.
    ``dtype``: the dtype the GEMMs run in, where the tensors are cast to it later."""
    dtype = x.dtype if dtype is None else dtype
    align = _row_align(dtype)
    if x.shape[1] % align or hidden % align:
        raise ValueError(
            f"kernel='grouped_mm' needs d_model and h_l to be multiples of {align} for "
            f"{dtype} (16-byte rows), got d_model={x.shape[1]}, h_l={hidden}"
        )
    if experts >= 1024:
        raise ValueError(f"kernel='grouped_mm' handles fewer than 1024 experts, got {experts}")
    for name, w in (("w1", w1), ("w2", w2)):
        if w.stride(-1) != 1 or w.data_ptr() % 16:
            raise ValueError(f"kernel='grouped_mm' needs {name} contiguous and 16-byte aligned")


def _check_combine_args(y_slots: Tensor, gates: Tensor) -> None:
    for name, t in (("y_slots", y_slots), ("gates", gates)):
        if not isinstance(t, Tensor) or t.dim() != 2 or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a 2-D floating tensor, got {_describe(t)}")
    if gates.device != y_slots.device:
        raise ValueError(f"gates are on {gates.device} but y_slots on {y_slots.device}")
    if y_slots.shape[0] != gates.numel():
        raise ValueError(
            f"y_slots has {y_slots.shape[0]} rows, expected T*k = {gates.numel()} "
            f"for gates of shape {tuple(gates.shape)}"
        )


def _autocast_inputs(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    if not isinstance(x, Tensor) or not torch.is_autocast_enabled(x.device.type):
        return x, w1, b1, w2
    dtype = torch.get_autocast_dtype(x.device.type)
    return x.to(dtype), w1.to(dtype), None if b1 is None else b1.to(dtype), w2.to(dtype)

"""Expert compute: the grouped expert MLP in interchangeable variants, and the gated combine.

Notation (see adaptive_moe.runtime.grouping and adaptive_moe.core.config):
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

The ``*_torch`` functions are the plain-torch twins of the Triton launchers (same
arguments, same results up to rounding); tests compare each kernel with its twin.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from types import ModuleType

import torch
from torch import Tensor

from adaptive_moe.core.activations import ACTIVATION_FNS
from adaptive_moe.core.config import check_activation
from adaptive_moe.core.dtypes import TORCH_DTYPES
from adaptive_moe.core.strategy import KERNELS
from adaptive_moe.runtime.grouping import ExpertRows, GroupedRows
from csrc_triton._common import interpreting

_TRITON_DTYPES = tuple(TORCH_DTYPES.values())
# An activation name ("silu", "gelu", "relu") or an elementwise callable.
ActivationFn = str | Callable[[Tensor], Tensor]
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # probed once, at import


# ---------------------------------------------------------------- availability


def _triton_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Triton runs CUDA tensors, and CPU tensors only in its interpreter (tests)."""
    if dtype not in _TRITON_DTYPES or not _TRITON_INSTALLED:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


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


def _row_align(dtype: torch.dtype) -> int:
    """Elements per 16 bytes: torch._grouped_mm's TMA loads need rows of a multiple."""
    return 16 // dtype.itemsize


def _triton_ops() -> tuple[ModuleType, ModuleType]:
    """The csrc_triton launcher modules, imported on first use so that this module loads
    where Triton is missing."""
    from csrc_triton import elementwise, scatter_gemm

    return scatter_gemm, elementwise


def _gemv_launcher() -> Callable[..., Tensor]:
    from csrc_triton.gemv import grouped_gemv

    return grouped_gemv


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


def _check_grouped_mm(x: Tensor, w1: Tensor, w2: Tensor, hidden: int, experts: int) -> None:
    """torch._grouped_mm reads every matrix with TMA: 16-byte aligned rows and bases."""
    align = _row_align(x.dtype)
    if x.shape[1] % align or hidden % align:
        raise ValueError(
            f"kernel='grouped_mm' needs d_model and h_l to be multiples of {align} for "
            f"{x.dtype} (16-byte rows), got d_model={x.shape[1]}, h_l={hidden}"
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


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def _autocast_inputs(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    if not isinstance(x, Tensor) or not torch.is_autocast_enabled(x.device.type):
        return x, w1, b1, w2
    dtype = torch.get_autocast_dtype(x.device.type)
    return x.to(dtype), w1.to(dtype), None if b1 is None else b1.to(dtype), w2.to(dtype)


# ---------------------------------------------------------------- shared pieces


def _to_slots(y_grouped: Tensor, rows: GroupedRows) -> Tensor:
    """[M, d] grouped -> [N, d] slot space, unrouted slots 0."""
    y = y_grouped.new_zeros((rows.num_slots, y_grouped.shape[1]))
    return y.index_copy(0, rows.sorted_slots, y_grouped)


@dataclasses.dataclass(frozen=True)
class Remat:
    """How a backward rebuilds its input ``a = activation(source)`` instead of keeping it.

    The second expert GEMM's weight gradient needs the activation output a [M, h]; the
    pre-activation ``source`` [M, 2h|h] is kept for the activation's own backward anyway,
    so rebuilding a from it (one elementwise pass) keeps one tensor fewer alive from
    forward to backward, and the rebuilt a lives only until the weight gradient is done.
    Only for named activations: a callable need not be deterministic."""

    source: Tensor
    glu: bool
    activation: str


def _rebuild(source: Tensor, glu: bool, activation: str) -> Tensor:
    """``Remat``'s a from the saved copy of its source, outside autograd, with the same
    kernel as the forward's ``_activation`` (so the same bits)."""
    if _triton_usable(source.device, source.dtype):
        _, ew = _triton_ops()
        return ew.activation_fwd(source, glu=glu, activation=activation)
    with torch.no_grad():
        return activation_torch(source, glu=glu, activation=activation)


def _remat(source: Tensor, glu: bool, activation: ActivationFn) -> Remat | None:
    """A ``Remat`` where a backward will run and the activation is named; else None."""
    if not torch.is_grad_enabled() or not isinstance(activation, str):
        return None
    return Remat(source, glu, activation)


def _expert_of_rows(counts: Tensor, total: int) -> Tensor:
    """[total] expert id of each row of a buffer holding counts[e] rows per expert."""
    experts = torch.arange(counts.numel(), device=counts.device)
    return torch.repeat_interleave(experts, counts, output_size=total)


def activation_torch(hcat: Tensor, *, glu: bool, activation: ActivationFn) -> Tensor:
    """Twin of ``elementwise.activation_fwd``: [..., 2h or h] -> [..., h]. ``activation``
    is a name or an elementwise callable (run as is)."""
    act = activation if callable(activation) else ACTIVATION_FNS[activation]
    pre = hcat.chunk(2, dim=-1)[0] if glu else hcat
    out = act(pre)
    if not isinstance(out, Tensor) or out.shape != pre.shape:
        raise ValueError(
            f"activation must be elementwise: it mapped a {tuple(pre.shape)} tensor to "
            f"{_describe(out) if not isinstance(out, Tensor) else tuple(out.shape)}"
        )
    return out * hcat.chunk(2, dim=-1)[1] if glu else out


def _activation(hcat: Tensor, glu: bool, activation: ActivationFn) -> Tensor:
    """The fused Triton activation where Triton runs and the activation is one of its
    names; torch elsewhere (any callable always runs in torch)."""
    if isinstance(activation, str) and _triton_usable(hcat.device, hcat.dtype):
        return _Activation.apply(hcat, glu, activation)
    return activation_torch(hcat, glu=glu, activation=activation)


# ---------------------------------------------------------------- variants


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
    return _to_slots(torch.cat(outs), rows)


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
    return _to_slots(y[pos], rows)


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
    m, d, n_exp = rows.sorted_slots.numel(), x.shape[1], w1.shape[0]
    align = _row_align(x.dtype)
    # Every expert gets a positive multiple of `align` rows: TMA needs 16-byte aligned group
    # starts, and CUTLASS's ragged-K (weight-gradient) grouped GEMM may reject empty groups.
    # Rows past the last group's end are never read by a GEMM nor gathered back.
    counts = rows.offsets.diff()  # [E]
    padded_counts = (counts + align - 1).div(align, rounding_mode="floor")
    padded_counts = padded_counts.clamp(min=1) * align  # [E]
    total = m + n_exp * align  # >= sum(padded_counts)
    ends = padded_counts.cumsum(0)  # [E]
    expert = _expert_of_rows(counts, m)  # [M]
    pos = torch.arange(m, device=x.device) - rows.offsets[expert] + (ends - padded_counts)[expert]
    src = torch.div(rows.sorted_slots, rows.fan_out, rounding_mode="floor")  # [M]
    buf = x.new_zeros((total, d)).index_copy(0, pos, x[src])  # [M_pad, d]
    offs = ends.to(torch.int32)
    h = torch._grouped_mm(buf, w1.transpose(1, 2), offs=offs)  # [M_pad, 2h or h]
    if b1 is not None:
        # Expert of each buffer row; the spare rows past the last group (E) read a zero
        # row whose gradient, summed from their unused values, is dropped.
        row_expert = torch.searchsorted(ends, torch.arange(total, device=x.device), right=True)
        h = h + torch.cat([b1, b1.new_zeros((1, b1.shape[1]))])[row_expert]
    a = _activation(h, glu, activation)  # [M_pad, h]
    remat = _remat(h, glu, activation)
    if remat is None:
        y = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)  # [M_pad, d]
    else:
        y = _GroupedDownProj.apply(a, w2, offs, remat)  # [M_pad, d]
    return _to_slots(y[pos], rows)


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
) -> Tensor:
    """The differentiable Triton MLP; ``rows`` may be device-grouped (no host counts)."""
    # fp32 follows torch's own switch, so every variant rounds fp32 matmuls alike.
    tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    hcat = ParallelLinear.apply(x, w1, b1, rows, False, True, tf32, small)  # [M, 2h|h] grouped
    a = _activation(hcat, glu, activation)  # [M, h]
    remat = _remat(hcat, glu, activation)
    return ParallelLinear.apply(a, w2, None, rows, True, False, tf32, small, remat)  # [N, d]


_VARIANTS = {
    "loop": _mlp_loop,
    "bmm": _mlp_bmm,
    "grouped_mm": _mlp_grouped_mm,
    "scatter": _mlp_scatter,
    "gemv": _mlp_gemv,
}


# ---------------------------------------------------------------- autograd Functions


class ParallelLinear(torch.autograd.Function):
    """One expert linear over grouped rows, ``y[row] = x[row] @ w[e].T (+ b[e])``.

    ``x`` is grouped [M, K] or token space (row ``slot // fan_out``); ``y`` is grouped [M, N]
    or slot space [N_slots, N]. Forward is one ``scatter_gemm``; backward is a
    ``scatter_gemm`` with the weights transposed (dx), the weight-gradient grouped GEMM
    (dw) and the grouped row sum (db). A token-space dx is summed over its fan_out slots.
    ``small`` runs the forward with the small-batch kernel (``csrc_triton.gemv``) instead.
    ``remat`` (grouped x only): x is not kept; backward rebuilds it for the weight
    gradient, which it computes before dx so that the rebuilt x is freed first.
    Only the device fields of ``rows`` are read (``GroupedRows``): the launch grids are
    bounded by the row count, so no host count is needed.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        w: Tensor,
        b: Tensor | None,
        rows: GroupedRows,
        x_grouped: bool,
        y_grouped: bool,
        allow_tf32: bool,
        small: bool = False,
        remat: Remat | None = None,
    ) -> Tensor:
        gemm, _ = _triton_ops()
        ctx.save_for_backward(x if remat is None else remat.source, w)
        ctx.remat = None if remat is None else (remat.glu, remat.activation)
        ctx.rows, ctx.has_bias = rows, b is not None
        ctx.layout = (x_grouped, y_grouped, allow_tf32)
        launch = _gemv_launcher() if small else gemm.scatter_gemm
        return launch(
            x, w, b, rows.sorted_slots, rows.offsets,
            fan_out=rows.fan_out, num_slots=rows.num_slots,
            x_grouped=x_grouped, y_grouped=y_grouped, allow_tf32=allow_tf32,
            out=_slot_space_out(rows, y_grouped, w.shape[1], x),
        )  # fmt: skip

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: Tensor) -> tuple:
        gemm, _ = _triton_ops()
        x, w = ctx.saved_tensors
        rows, (x_grouped, y_grouped, tf32) = ctx.rows, ctx.layout
        route = (rows.sorted_slots, rows.offsets)
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]

        def weight_grad() -> Tensor | None:
            if not need_dw:
                return None
            x_in = x if ctx.remat is None else _rebuild(x, *ctx.remat)  # [M | N_in, K]
            return gemm.group_weight_grad(
                dy, x_in, *route, fan_out=rows.fan_out,
                dy_grouped=y_grouped, x_grouped=x_grouped, allow_tf32=tf32,
            )  # fmt: skip

        def input_grad() -> Tensor | None:
            if not need_dx:
                return None
            # dy is slot space (fan_out 1) or grouped; dx lands in x's layout, slot space
            # first when x is token space.
            dx = gemm.scatter_gemm(
                dy, w, None, *route, fan_out=1, num_slots=rows.num_slots,
                x_grouped=y_grouped, y_grouped=x_grouped, trans_w=True, allow_tf32=tf32,
                out=_slot_space_out(rows, x_grouped, w.shape[2], dy),
            )  # fmt: skip
            if not x_grouped and rows.fan_out > 1:
                dx = dx.view(-1, rows.fan_out, w.shape[2]).sum(1)  # [N_in, K]
            return dx

        # The order sets the peak: a rebuilt x dies before dx is allocated; a token-space
        # dx's [num_slots, K] temporary dies before dw is allocated.
        if ctx.remat is not None:
            dw = weight_grad()
            dx = input_grad()
        else:
            dx = input_grad()
            dw = weight_grad()
        db = None
        if ctx.has_bias and need_db:
            db = gemm.group_bias_grad(dy, *route, dy_grouped=y_grouped)
        return dx, dw, db, None, None, None, None, None, None


def _slot_space_out(rows: GroupedRows, grouped: bool, cols: int, like: Tensor) -> Tensor | None:
    """A zeroed [num_slots, cols] output where a slot-space result has slots no grouped
    position writes; None (the launcher allocates) otherwise. Device-grouped rows
    (``inference.StaticRows``) hold every slot, routed or not, so only they can tell."""
    if grouped or rows.covers_all_slots:
        return None
    return like.new_zeros((rows.num_slots, cols))


class _GroupedDownProj(torch.autograd.Function):
    """``y = a @ w2[e].T`` per group with ``torch._grouped_mm`` (``offs`` [E] int32 group
    ends), keeping the pre-activation instead of a (``Remat``). Backward: the weight
    gradient dy^T a first from the rebuilt a, then a is freed, then da = dy w2, both
    ``torch._grouped_mm`` calls over the same groups.

        a [M_pad, h], w2 [E, d, h], dy / y [M_pad, d]
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, a: Tensor, w2: Tensor, offs: Tensor,
        remat: Remat,
    ) -> Tensor:  # fmt: skip
        ctx.save_for_backward(remat.source, w2, offs)
        ctx.remat = (remat.glu, remat.activation)
        return torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)  # [M_pad, d]

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: Tensor) -> tuple:
        source, w2, offs = ctx.saved_tensors
        da = dw2 = None
        if ctx.needs_input_grad[1]:
            a = _rebuild(source, *ctx.remat)  # [M_pad, h]
            # dy^T a per group: [E, d, h] in w2's own layout (a transposed gradient would
            # cost AccumulateGrad a strided copy of the whole weight)
            dw2 = torch._grouped_mm(dy.t(), a, offs=offs)
            del a
        if ctx.needs_input_grad[0]:
            da = torch._grouped_mm(dy, w2, offs=offs)  # [M_pad, h]
        return da, dw2, None, None


class _Activation(torch.autograd.Function):
    """GLU / plain activation with the Triton kernels; saves only ``hcat``."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, hcat: Tensor, glu: bool, activation: str
    ) -> Tensor:
        _, ew = _triton_ops()
        ctx.save_for_backward(hcat)
        ctx.glu, ctx.activation = glu, activation
        return ew.activation_fwd(hcat, glu=glu, activation=activation)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, d_a: Tensor) -> tuple:
        _, ew = _triton_ops()
        (hcat,) = ctx.saved_tensors
        d_h = ew.activation_bwd(hcat, d_a, glu=ctx.glu, activation=ctx.activation)
        return d_h, None, None


class _Combine(torch.autograd.Function):
    """Gated sum of each token's k slot rows with the Triton kernels."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, y_slots: Tensor, gates: Tensor) -> Tensor:
        _, ew = _triton_ops()
        ctx.save_for_backward(y_slots, gates)
        return ew.combine_fwd(y_slots, gates)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, d_out: Tensor) -> tuple:
        _, ew = _triton_ops()
        y_slots, gates = ctx.saved_tensors
        return ew.combine_bwd(y_slots, gates, d_out)


# ---------------------------------------------------------------- plain-torch twins


def _acc(t: Tensor) -> Tensor:
    """``t`` in the accumulation dtype of the kernels: fp32, or fp64 for fp64 inputs."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _grouped_view(t: Tensor, slots: Tensor, grouped: bool, fan_out: int) -> Tensor:
    """[M, *] rows of ``t`` in grouped order, in the accumulation dtype."""
    return _acc(t if grouped else t[torch.div(slots, fan_out, rounding_mode="floor")])


def _bounds(offsets: Tensor) -> list[tuple[int, int]]:
    return list(itertools.pairwise(offsets.tolist()))


def scatter_gemm_torch(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
    slots: Tensor,
    offsets: Tensor,
    *,
    fan_out: int,
    num_slots: int,
    x_grouped: bool,
    y_grouped: bool,
    trans_w: bool = False,
) -> Tensor:
    """Twin of ``csrc_triton.scatter_gemm.scatter_gemm`` (fp32 math, one final rounding)."""
    xg = _grouped_view(x, slots, x_grouped, fan_out)  # [M, K]
    wt = _acc(w if trans_w else w.transpose(1, 2))  # [E, K, N]
    y = xg.new_zeros((xg.shape[0], wt.shape[2]))  # [M, N]
    for e, (lo, hi) in enumerate(_bounds(offsets)):
        y[lo:hi] = xg[lo:hi] @ wt[e] + (0.0 if bias is None else _acc(bias[e]))
    y = y.to(x.dtype)
    if y_grouped:
        return y
    return y.new_zeros((num_slots, y.shape[1])).index_copy(0, slots, y)


def group_weight_grad_torch(
    dy: Tensor,
    x: Tensor,
    slots: Tensor,
    offsets: Tensor,
    *,
    fan_out: int,
    dy_grouped: bool,
    x_grouped: bool,
) -> Tensor:
    """Twin of ``csrc_triton.scatter_gemm.group_weight_grad``: [E, N, K]."""
    dyg = _grouped_view(dy, slots, dy_grouped, 1)  # [M, N]
    xg = _grouped_view(x, slots, x_grouped, fan_out)  # [M, K]
    dw = [dyg[lo:hi].T @ xg[lo:hi] for lo, hi in _bounds(offsets)]
    return torch.stack(dw).to(dy.dtype)


def group_bias_grad_torch(
    dy: Tensor, slots: Tensor, offsets: Tensor, *, dy_grouped: bool
) -> Tensor:
    """Twin of ``csrc_triton.scatter_gemm.group_bias_grad``: [E, N]."""
    dyg = _grouped_view(dy, slots, dy_grouped, 1)  # [M, N]
    return torch.stack([dyg[lo:hi].sum(0) for lo, hi in _bounds(offsets)]).to(dy.dtype)


def combine_torch(y_slots: Tensor, gates: Tensor) -> Tensor:
    """Twin of ``csrc_triton.elementwise.combine_fwd`` (differentiable)."""
    t, k = gates.shape
    y = _acc(y_slots.view(t, k, y_slots.shape[1]))  # [T, k, d]
    return torch.bmm(gates.to(y.dtype).unsqueeze(1), y).squeeze(1).to(y_slots.dtype)  # [T, d]

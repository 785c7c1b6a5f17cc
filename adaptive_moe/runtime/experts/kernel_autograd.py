"""The autograd Functions of the Triton expert kernels, and what their backwards share.

``ParallelLinear`` (one grouped expert linear, ``csrc_triton.scatter_gemm``),
``_GroupedDownProj`` (the second GEMM on ``torch._grouped_mm``), ``_Activation`` and
``_Combine`` (``csrc_triton.elementwise``); ``Remat`` says how a backward rebuilds the
activation output instead of keeping it. Shapes as in ``adaptive_moe.runtime.experts.kernels``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from adaptive_moe.core.dtypes import TORCH_DTYPES
from adaptive_moe.runtime.experts.grouping import GroupedRows
from adaptive_moe.runtime.experts.kernel_twins import ActivationFn, activation_torch
from csrc_triton._common import interpreting

_TRITON_DTYPES = tuple(TORCH_DTYPES.values())
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # probed once, at import


def _triton_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Triton runs CUDA tensors, and CPU tensors only in its interpreter (tests)."""
    if dtype not in _TRITON_DTYPES or not _TRITON_INSTALLED:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def _triton_ops() -> tuple[ModuleType, ModuleType]:
    """The csrc_triton launcher modules, imported on first use so that this module loads
    where Triton is missing."""
    from csrc_triton import elementwise, scatter_gemm

    return scatter_gemm, elementwise


def _gemv_launcher() -> Callable[..., Tensor]:
    from csrc_triton.gemv import grouped_gemv

    return grouped_gemv


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


def _activation(hcat: Tensor, glu: bool, activation: ActivationFn) -> Tensor:
    """The fused Triton activation where Triton runs and the activation is one of its
    names; torch elsewhere (any callable always runs in torch)."""
    if isinstance(activation, str) and _triton_usable(hcat.device, hcat.dtype):
        return _Activation.apply(hcat, glu, activation)
    return activation_torch(hcat, glu=glu, activation=activation)


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
        ctx.save_for_backward(x if remat is None else remat.source, w)
        ctx.remat = None if remat is None else (remat.glu, remat.activation)
        ctx.rows, ctx.has_bias = rows, b is not None
        ctx.layout = (x_grouped, y_grouped, allow_tf32)
        return _forward_gemm(x, w, b, rows, x_grouped, y_grouped, allow_tf32, small)

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


def _forward_gemm(
    x: Tensor, w: Tensor, b: Tensor | None, rows: GroupedRows, x_grouped: bool,
    y_grouped: bool, allow_tf32: bool, small: bool,
) -> Tensor:  # fmt: skip
    """The forward grouped GEMM of an expert linear: ``scatter_gemm``, or the small-batch
    ``grouped_gemv`` with ``small``."""
    gemm, _ = _triton_ops()
    launch = _gemv_launcher() if small else gemm.scatter_gemm
    return launch(
        x, w, b, rows.sorted_slots, rows.offsets,
        fan_out=rows.fan_out, num_slots=rows.num_slots,
        x_grouped=x_grouped, y_grouped=y_grouped, allow_tf32=allow_tf32,
        out=_slot_space_out(rows, y_grouped, w.shape[1], x),
    )  # fmt: skip


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


class ActDownProj(torch.autograd.Function):
    """The second expert linear with its activation, ``y = act(hcat) @ w2[e].T`` into
    slot space, whose backward applies the activation's backward in the input-gradient
    GEMM's epilogue (``scatter_gemm``'s ``act_grad``): d_a [M, h] never reaches memory,
    and one launch (the activation backward) is saved.

        hcat [M, 2h | h] grouped, w2 [E, d, h], y / dy [num_slots, d] slot space

    Keeps only hcat (as ``Remat``): backward rebuilds a for the weight gradient first,
    frees it, then computes d_hcat = act'(hcat) * (dy w2[e]).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, hcat: Tensor, w2: Tensor, rows: GroupedRows,
        glu: bool, activation: str, allow_tf32: bool, small: bool,
    ) -> Tensor:  # fmt: skip
        _, ew = _triton_ops()
        ctx.save_for_backward(hcat, w2)
        ctx.rows, ctx.act, ctx.tf32 = rows, (glu, activation), allow_tf32
        a = ew.activation_fwd(hcat, glu=glu, activation=activation)  # [M, h]
        return _forward_gemm(a, w2, None, rows, True, False, allow_tf32, small)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: Tensor) -> tuple:
        gemm, _ = _triton_ops()
        hcat, w2 = ctx.saved_tensors
        rows, (glu, activation), tf32 = ctx.rows, ctx.act, ctx.tf32
        route = (rows.sorted_slots, rows.offsets)
        d_hcat = dw2 = None
        if ctx.needs_input_grad[1]:
            a = _rebuild(hcat, glu, activation)  # [M, h], freed before d_hcat exists
            dw2 = gemm.group_weight_grad(
                dy, a, *route, fan_out=rows.fan_out, dy_grouped=False, x_grouped=True,
                allow_tf32=tf32,
            )  # fmt: skip
            del a
        if ctx.needs_input_grad[0]:
            d_hcat = gemm.scatter_gemm(
                dy, w2, None, *route, fan_out=1, num_slots=rows.num_slots,
                x_grouped=False, y_grouped=True, trans_w=True, allow_tf32=tf32,
                act_grad=gemm.ActGrad(hcat, glu, activation),
            )  # fmt: skip
        return d_hcat, dw2, None, None, None, None, None


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

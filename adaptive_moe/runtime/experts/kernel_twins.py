"""Plain-torch twins of the Triton launchers (same arguments, same results up to
rounding), and the activation in torch; tests compare each kernel with its twin.

Shapes as in ``adaptive_moe.runtime.experts.kernels``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

from adaptive_moe.core.activations import ACTIVATION_FNS

# An activation name ("silu", "gelu", "relu") or an elementwise callable.
ActivationFn = str | Callable[[Tensor], Tensor]


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


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
    with torch.autocast(y.device.type, enabled=False):  # autocast would run the bmm in bf16
        out = torch.bmm(gates.to(y.dtype).unsqueeze(1), y).squeeze(1)  # [T, d]
    return out.to(y_slots.dtype)

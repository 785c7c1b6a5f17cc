"""``ParallelLinear``: one linear layer per expert over rows grouped by expert — the
building block ScatterMoE's ``ParallelLinear`` exposes, usable outside ``MoELayer``.

    x       [N_in, K]       token space: slot s reads row ``s // fan_out``  (x_grouped=False)
            [M, K]          grouped: row i belongs to grouped position i     (x_grouped=True)
    rows    ExpertRows      which slots each expert processes (``expert_rows``)
    weight  [E, N, K]       one [N, K] matrix per expert (``nn.Linear`` orientation)
    bias    [E, N] | None
    y       [M, N]          grouped                                         (y_grouped=True)
            [num_slots, N]  slot space, unrouted slots exactly 0            (y_grouped=False)

``y[i] = x[row of i] @ weight[e].T + bias[e]`` for grouped position i of expert e. The
intermediate results are ordinary tensors, so several ``ParallelLinear`` calls compose
with any torch code in between (an activation, attention, a norm), as in ScatterMoE.

On CUDA (or under ``TRITON_INTERPRET=1``) this is the package's Triton scatter GEMM
(``kernels.ParallelLinear``: rows gathered and scattered inside the kernel, no padded or
regrouped copy of x or y); elsewhere a differentiable per-expert torch loop computes the
same function.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from adaptive_moe.core.checks import positive_int
from adaptive_moe.runtime.experts import kernels
from adaptive_moe.runtime.experts.grouping import ExpertRows, expert_counts, group_by_expert


def expert_rows(topk_ids: Tensor, num_experts: int) -> ExpertRows:
    """Group the slots of a routing ``topk_ids`` [T, k] (-1 = dropped) by expert:
    slot ``t * k + j`` is token t's j-th choice, fan_out = k. ValueError for an id
    outside [-1, num_experts)."""
    integer = isinstance(topk_ids, Tensor) and not (
        topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool
    )
    if not integer or topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be an integer [T, k] tensor, got {_describe(topk_ids)}")
    positive_int("num_experts", num_experts)
    ids = topk_ids.flatten().long()  # [N]
    if not ids.numel():
        return group_by_expert(ids, num_experts, topk_ids.shape[1], [0] * num_experts)
    # The grouping reads the per-expert counts back to the host anyway (they size its
    # outputs): the same copy carries the range check, so it costs no extra sync.
    counts = expert_counts(ids, num_experts)  # [E]
    low, high = ids.min().view(1), ids.max().view(1)
    *host, lo, hi = torch.cat([counts, low, high]).tolist()
    if lo < -1 or hi >= num_experts:
        raise ValueError(
            f"topk_ids must lie in [-1, {num_experts}) (expert ids, -1: dropped) for "
            f"num_experts={num_experts}, got values in [{lo}, {hi}]"
        )
    return group_by_expert(ids, num_experts, topk_ids.shape[1], host)


def parallel_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    rows: ExpertRows,
    *,
    x_grouped: bool = False,
    y_grouped: bool = True,
) -> Tensor:
    """The grouped linear of the module docstring (differentiable in x, weight, bias)."""
    _check(x, weight, bias, rows, x_grouped)
    if kernels._triton_usable(x.device, x.dtype):
        tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
        return kernels.ParallelLinear.apply(
            x, weight, bias, rows, x_grouped, y_grouped, tf32, False
        )
    return _parallel_linear_torch(x, weight, bias, rows, x_grouped, y_grouped)


def _parallel_linear_torch(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    rows: ExpertRows,
    x_grouped: bool,
    y_grouped: bool,
) -> Tensor:
    xg = x if x_grouped else x.index_select(0, rows.input_rows)  # [M, K]
    parts, start = [], 0
    for e, count in enumerate(rows.counts):
        b = None if bias is None else bias[e]
        parts.append(nn.functional.linear(xg[start : start + count], weight[e], b))  # [c_e, N]
        start += count
    yg = torch.cat(parts) if parts else xg.new_zeros((0, weight.shape[1]))  # [M, N]
    if y_grouped:
        return yg
    return yg.new_zeros((rows.num_slots, yg.shape[1])).index_copy(0, rows.sorted_slots, yg)


def _check(x: object, weight: object, bias: object, rows: object, x_grouped: bool) -> None:
    if not isinstance(rows, ExpertRows):
        raise ValueError(f"rows must be an ExpertRows (see expert_rows), got {_describe(rows)}")
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a 2-D floating tensor, got {_describe(x)}")
    e = rows.num_experts
    if not isinstance(weight, Tensor) or weight.dim() != 3 or weight.shape[0] != e:
        raise ValueError(f"weight must be [E={e}, N, K], got {_describe(weight)}")
    if weight.shape[2] != x.shape[1]:
        raise ValueError(f"weight [E, N, K] has K={weight.shape[2]} but x has {x.shape[1]} columns")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != weight.shape[:2]):
        raise ValueError(f"bias must be [E, N] = {tuple(weight.shape[:2])}, got {_describe(bias)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")
    # A hand-built ExpertRows: its host-side bookkeeping must agree (no device read).
    if sum(rows.counts) != rows.num_rows or rows.offsets.numel() != e + 1:
        raise ValueError(
            f"rows is inconsistent: counts sum to {sum(rows.counts)} but sorted_slots has "
            f"{rows.num_rows} entries, offsets {rows.offsets.numel()} (want E + 1 = {e + 1}); "
            f"build it with expert_rows"
        )
    want = rows.num_rows if x_grouped else rows.num_slots // rows.fan_out
    if x.shape[0] != want:
        where = "grouped rows M" if x_grouped else "input rows (num_slots / fan_out)"
        raise ValueError(f"x must have {want} rows ({where}), got {x.shape[0]}")


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


class ParallelLinear(nn.Module):
    """E independent ``nn.Linear(in_features, out_features)`` applied to rows grouped by
    expert (see the module docstring); weights initialised like ``nn.Linear``.

    Attributes:
        weight: [E, out_features, in_features].
        bias: [E, out_features] or None.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        for name, value in (
            ("num_experts", num_experts),
            ("in_features", in_features),
            ("out_features", out_features),
        ):
            positive_int(name, value)
        kw = {"device": device, "dtype": dtype}
        self.num_experts, self.in_features, self.out_features = (
            num_experts,
            in_features,
            out_features,
        )
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def forward(
        self, x: Tensor, rows: ExpertRows, *, x_grouped: bool = False, y_grouped: bool = True
    ) -> Tensor:
        return parallel_linear(
            x, self.weight, self.bias, rows, x_grouped=x_grouped, y_grouped=y_grouped
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )

"""Parameter all-gather whose backward is a reduce-scatter (ZeRO-style), and the
all-gather of per-expert counts.

    shard   [R, *rest]       this rank's rows (e.g. its hidden slice of a weight)
    full    [G * R, *rest]   the shards of the G ranks of the group, in group-rank order

Every strategy reads the same stored shards; gathering them for one forward and
reduce-scattering (summing) their gradients back means each rank's shard gradient is the
sum of what every rank of the group computed with that shard, whatever the strategy.

Gloo has implemented reduce_scatter_tensor since torch 2.2 (pytorch#112144, as an
all-reduce then a chunk), so the same call serves NCCL and gloo on every torch this
package supports (>= 2.11); no fallback is needed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.distributed import ProcessGroup

# torch renamed the tensor-in/tensor-out collectives (the old names warn); use whichever
# this torch has.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_rows(shard: Tensor, group: ProcessGroup | None) -> Tensor:
    """Concatenate the ``shard`` [R, *rest] of every rank of ``group`` along dim 0 in
    group-rank order -> [G * R, *rest]. Differentiable: the backward reduce-scatters
    (sums) the gradient, so each rank gets the sum of every rank's gradient for its rows.
    With ``group`` None or of one rank, returns ``shard`` itself."""
    if group is None or dist.get_world_size(group) == 1:
        return shard
    if shard.dim() < 1:
        raise ValueError(f"shard must have at least one dimension, got shape {tuple(shard.shape)}")
    return _AllGatherRows.apply(shard, group)


def all_gather_counts(counts: Tensor, group: ProcessGroup | None) -> Tensor:
    """Stack the integer ``counts`` [*shape] of every rank of ``group`` -> [G, *shape]
    (group-rank order; no gradient). Every rank must pass the same shape."""
    if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
        raise ValueError(f"counts must be an integer tensor, got dtype {counts.dtype}")
    if group is None or dist.get_world_size(group) == 1:
        return counts.unsqueeze(0)
    size = dist.get_world_size(group)
    flat = counts.new_empty(size * counts.numel())  # [G * numel]: gloo wants it flat
    _all_gather_single(flat, counts.reshape(-1).contiguous(), group=group)
    return flat.view(size, *counts.shape)  # [G, *shape]


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, shard: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        full = shard.new_empty((size * shard.shape[0], *shard.shape[1:]))  # [G * R, *rest]
        _all_gather_single(full, shard.contiguous(), group=group)
        return full

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        size = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))  # [R, *rest]
        _reduce_scatter_single(out, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def reduce_scatter_rows(full: Tensor, group: ProcessGroup | None) -> Tensor:
    """Sum ``full`` [G * R, *rest] over the ranks of ``group`` and keep this rank's block
    of R rows -> [R, *rest] (group-rank order, the inverse layout of ``all_gather_rows``).
    No gradient (inference). With ``group`` None or of one rank, returns ``full`` itself."""
    if group is None or dist.get_world_size(group) == 1:
        return full
    size = dist.get_world_size(group)
    if full.dim() < 1 or full.shape[0] % size:
        raise ValueError(
            f"full must have a multiple of the group size {size} rows, got {tuple(full.shape)}"
        )
    out = full.new_empty((full.shape[0] // size, *full.shape[1:]))  # [R, *rest]
    _reduce_scatter_single(out, full.contiguous(), op=dist.ReduceOp.SUM, group=group)
    return out

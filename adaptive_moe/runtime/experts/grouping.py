"""Grouping metadata: which rows each local expert processes, computed once per forward.

The expert kernels never receive a padded or regrouped copy of their input. They read
row ``sorted_slots[i] // fan_out`` of the input for the i-th grouped position, and
write (or read, in backward) the "slot space" row ``sorted_slots[i]``:

    x         [N_in, d]                 input rows (tokens, or received rows)
    slots     N = N_in * fan_out        one slot per (input row, copy)
    expert_of_slot [N]                  local expert id of each slot, -1 = no expert
    sorted_slots   [M]                  slots grouped by expert (stable), M = kept slots
    offsets        [E_l + 1]            expert e owns grouped positions [offsets[e], offsets[e+1])

Single device: x are the T tokens, fan_out = k, slot t*k + j is token t's j-th choice.
Distributed: x are the rows received by the all-to-all, fan_out = 1.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor


class GroupedRows(Protocol):
    """What the Triton expert kernels read of a grouping: ``ExpertRows`` (host counts
    known) and ``inference.StaticRows`` (device offsets only) both provide it."""

    sorted_slots: torch.Tensor  # [M] int64
    offsets: torch.Tensor  # [E_l + 1] int64, on the device
    fan_out: int

    @property
    def num_slots(self) -> int: ...

    @property
    def covers_all_slots(self) -> bool: ...


@dataclasses.dataclass(frozen=True)
class ExpertRows:
    """Rows grouped by local expert (see module docstring).

    Attributes:
        sorted_slots: [M] int64, slot ids grouped by expert, stable within an expert.
        offsets: [E_l + 1] int64 on the same device, cumulative row counts.
        counts: per-expert row counts as Python ints (host copy, needed for shapes).
        fan_out: slots per input row (k on one device, 1 after an all-to-all).
        num_slots: N, the size of the slot space the output is written to.
    """

    sorted_slots: torch.Tensor
    offsets: torch.Tensor
    counts: tuple[int, ...]
    fan_out: int
    num_slots: int

    @property
    def num_experts(self) -> int:
        return len(self.counts)

    @property
    def num_rows(self) -> int:
        return int(self.sorted_slots.numel())

    @property
    def covers_all_slots(self) -> bool:
        """Whether every slot is a grouped position (then a slot-space output has no row
        left unwritten)."""
        return self.num_rows == self.num_slots

    @property
    def input_rows(self) -> torch.Tensor:
        """[M] input row read for each grouped position."""
        if self.fan_out == 1:
            return self.sorted_slots
        return torch.div(self.sorted_slots, self.fan_out, rounding_mode="floor")


def group_by_expert(
    expert_of_slot: torch.Tensor,
    num_experts: int,
    fan_out: int,
    counts: Sequence[int] | None = None,
    offsets: torch.Tensor | None = None,
) -> ExpertRows:
    """Group slots by expert. ``expert_of_slot`` [N] int, values in [-1, num_experts).

    ``counts``: the per-expert number of kept slots when the caller already has it on the
    host (the layer does, from its count exchange): it saves a device-to-host sync.
    ``offsets``: their [E + 1] cumulative sums already on the device (a dispatch plan
    uploads them with the rest of its metadata): it saves a host-to-device copy."""
    if expert_of_slot.dim() != 1:
        raise ValueError(f"expert_of_slot must be 1-D, got shape {tuple(expert_of_slot.shape)}")
    keys = expert_of_slot.long()
    if counts is None:
        counts = expert_counts(keys, num_experts).tolist()
    elif len(counts) != num_experts:
        raise ValueError(f"counts must have num_experts={num_experts} entries, got {len(counts)}")
    counts = tuple(int(c) for c in counts)
    # Dropped slots (-1) sort past every expert and are cut off below.
    sort_keys = torch.where(keys >= 0, keys, torch.full_like(keys, num_experts))
    order = torch.sort(sort_keys, stable=True).indices  # [N]
    if offsets is None:
        offsets = torch.tensor(cumulative(counts), dtype=torch.long)
        offsets = offsets.to(keys.device, non_blocking=True)
    return ExpertRows(
        sorted_slots=order[: sum(counts)],
        offsets=offsets,
        counts=counts,
        fan_out=fan_out,
        num_slots=int(expert_of_slot.numel()),
    )


def cumulative(counts: Sequence[int]) -> tuple[int, ...]:
    """(0, c0, c0 + c1, ...): the [E + 1] offsets of ``counts``."""
    return (0, *itertools.accumulate(counts))


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64: how many entries of ``expert_ids`` (any shape; -1 = none) name each
    expert. Unlike ``torch.bincount``, which on CUDA reads the input's maximum back to
    size its output, this never synchronises with the device."""
    ids = expert_ids.reshape(-1).long()
    bins = ids.remainder(num_experts + 1)  # -1 -> spare bin E (one op, not a where chain)
    out = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device)
    return out.scatter_add_(0, bins, torch.ones_like(bins))[:num_experts]


def sort_by_expert(
    expert_of_slot: Tensor, num_experts: int, complete: bool, bounds: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The slots ``expert_of_slot`` [N] (-1 = not here) grouped by expert on the device,
    with no host count: their order [N] (unrouted slots last) and the offsets [E_l + 1]
    (``inference.rows.group_static``'s tensors). ``complete``: no -1 among the ids.
    Plain torch ops, which ``torch.compile`` traces too."""
    keys = expert_of_slot.long()
    if not complete:
        keys = keys.remainder(num_experts + 1)  # -1 -> E: unrouted slots sort last  [N]
    sorted_keys, order = torch.sort(keys, stable=True)  # [N] each
    # offsets[e] = first position whose expert is >= e: the cumulative counts, no count op.
    if bounds is None:
        bounds = torch.arange(num_experts + 1, device=keys.device)
    return order, torch.searchsorted(sorted_keys, bounds)  # [N], [E_l + 1] int64

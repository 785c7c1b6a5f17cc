"""The router: fp32 scores, top-k selection, capacity and the balancing losses.

    x        [T, d]      tokens (any float dtype; the router computes in fp32)
    logits   [T, E]      fp32
    scores   [T, E]      softmax over experts, or per-expert sigmoid
    topk_ids [T, k]      global expert ids, -1 where the slot was dropped
    gates    [T, k]      fp32 combine weights, 0 where dropped

Slot ``t * k + j`` is token t's j-th choice; the executor works in that slot space.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from adaptive_moe.core.config import RouterConfig, check_top_k
from adaptive_moe.runtime.grouping import expert_counts


@dataclasses.dataclass(frozen=True)
class Routing:
    """The router's decision for one forward, computed once and passed down.

    Attributes:
        logits: [T, E] fp32 router logits (for the z-loss and for recording).
        scores: [T, E] fp32 softmax or sigmoid scores (for the balance loss).
        topk_ids: [T, k] int64 chosen experts; -1 marks a dropped slot.
        gates: [T, k] fp32 combine weights; 0 for dropped slots.
        counts: [E] int64 slots routed to each expert *before* capacity drops (the
            balance loss counts demand, not what fitted).
        kept: [E] int64 slots per expert after drops, when known without counting again
            (``counts`` itself when nothing can be dropped); None: ``kept_counts`` counts.
    """

    logits: torch.Tensor
    scores: torch.Tensor
    topk_ids: torch.Tensor
    gates: torch.Tensor
    counts: torch.Tensor
    kept: torch.Tensor | None = None

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[0])

    def kept_counts(self, num_experts: int) -> torch.Tensor:
        """[E] int64 slots per expert after capacity drops."""
        return self.kept if self.kept is not None else expert_counts(self.topk_ids, num_experts)


def capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int | None:
    """Per-expert slot capacity on this rank, or None for dropless.

    ``|f| * k * T / E`` rounded up (GShard eq. 1), at least 1. A negative factor caps
    dropless routing at the same number; since dispatch here never pads to capacity, a
    negative and a positive factor drop exactly the same slots.
    """
    if capacity_factor == 0:
        return None
    return max(1, math.ceil(abs(capacity_factor) * top_k * num_tokens / num_experts))


class Router(nn.Module):
    """Linear fp32 router (no bias) with the selection rules of ``RouterConfig``."""

    def __init__(self, d_model: int, cfg: RouterConfig, device: torch.device | None = None):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model, device=device))
        if cfg.score_correction_bias:
            self.register_buffer(
                "e_score_correction_bias", torch.zeros(cfg.num_experts, device=device)
            )
        else:
            self.e_score_correction_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, top_k: int | None = None) -> Routing:
        cfg = self.cfg
        k = cfg.top_k if top_k is None else top_k
        check_top_k(k, cfg.num_experts)
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        if cfg.score_func == "softmax":
            scores = torch.softmax(logits, dim=-1)  # [T, E]
        else:
            scores = torch.sigmoid(logits)
        topk_ids = self._select(scores, k)  # [T, k]
        gates = scores.gather(1, topk_ids)  # [T, k]
        if cfg.renormalize and k == 1:
            # p / p is exactly 1: dividing would only feed rounding noise into the router.
            gates = torch.ones_like(gates)
        elif cfg.renormalize:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.routed_scaling_factor != 1.0:
            gates = gates * cfg.routed_scaling_factor
        counts = expert_counts(topk_ids, cfg.num_experts)  # [E], no device sync
        keep = self._keep_mask(topk_ids, gates, scores)
        if keep is not None:
            topk_ids = torch.where(keep, topk_ids, torch.full_like(topk_ids, -1))
            gates = gates * keep
        kept = counts if keep is None else None  # nothing dropped: no second count
        return Routing(logits, scores, topk_ids, gates, counts, kept)

    def _select(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """[T, k] chosen expert ids (group-limited, bias-corrected where configured)."""
        cfg = self.cfg
        choice = scores.detach()
        if self.e_score_correction_bias is not None:
            choice = choice + self.e_score_correction_bias  # selection only, never the gates
        if cfg.num_groups > 1:
            t, e = choice.shape
            grouped = choice.view(t, cfg.num_groups, e // cfg.num_groups)  # [T, G, E/G]
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            top_groups = group_score.topk(cfg.topk_groups, dim=-1).indices  # [T, g]
            allowed = torch.zeros_like(group_score, dtype=torch.bool)
            allowed.scatter_(1, top_groups, True)
            allowed = allowed.unsqueeze(-1).expand_as(grouped).reshape(t, e)
            choice = choice.masked_fill(~allowed, float("-inf"))
        return choice.topk(k, dim=-1).indices

    def _keep_mask(
        self, topk_ids: torch.Tensor, gates: torch.Tensor, scores: torch.Tensor
    ) -> torch.Tensor | None:
        """[T, k] bool: slots that survive random routing and capacity, or None."""
        cfg = self.cfg
        t, k = topk_ids.shape
        keep = None
        if cfg.random_second_expert and self.training and k >= 2:
            # GShard: the 2nd expert is used with probability 2 * its (normalised) gate.
            pair = gates[:, :2]
            p2 = 2 * pair[:, 1] / (pair.sum(-1) + 1e-20)
            keep = torch.ones_like(topk_ids, dtype=torch.bool)
            keep[:, 1] = torch.rand(t, device=gates.device) < p2
        cap = capacity(cfg.capacity_factor, t, k, cfg.num_experts)
        if cap is None:
            return keep
        fits = self._fits_capacity(topk_ids, scores, cap, keep)
        return fits if keep is None else keep & fits

    def _fits_capacity(
        self,
        topk_ids: torch.Tensor,
        scores: torch.Tensor,
        cap: int,
        keep: torch.Tensor | None,
    ) -> torch.Tensor:
        """[T, k] bool: slot's position in its expert's queue is < cap.

        Queue order is GShard's: every token's 1st choice before any 2nd choice; within a
        choice level, token order, or with batch-prioritised routing, descending top score.
        """
        t, k = topk_ids.shape
        ids = topk_ids.t().reshape(-1)  # [k*T] choice-major
        if keep is not None:
            # Slots already dropped take no place in the queue.
            ids = torch.where(keep.t().reshape(-1), ids, torch.full_like(ids, -1))
        if self.cfg.batch_prioritized:
            by_score = torch.argsort(scores.max(dim=-1).values, descending=True, stable=True)
            level = torch.arange(k, device=ids.device).repeat_interleave(t) * t
            order = level + by_score.repeat(k)  # [k*T] queue order over choice-major slots
        else:
            order = torch.arange(k * t, device=ids.device)
        queued = ids[order]
        sort_key = torch.where(queued >= 0, queued, torch.full_like(queued, self.cfg.num_experts))
        perm = torch.sort(sort_key, stable=True).indices  # grouped by expert, queue order kept
        counts = expert_counts(sort_key, self.cfg.num_experts + 1)  # no device sync
        starts = torch.cumsum(counts, 0) - counts
        position = torch.empty_like(perm)
        position[perm] = torch.arange(perm.numel(), device=perm.device) - starts[sort_key[perm]]
        fits_queued = (position < cap) & (queued >= 0)
        fits = torch.empty_like(fits_queued)
        fits[order] = fits_queued
        return fits.view(k, t).t()


def balance_loss(
    scores: torch.Tensor, global_counts: torch.Tensor, global_slots: int
) -> torch.Tensor:
    """GShard/Switch auxiliary loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the share of all slots of the whole group routed to e (no gradient),
    ``P_e`` this rank's mean score of e. The mean of this value over equally loaded ranks
    equals the loss of the global batch, so a data-parallel average gives the right gradient.
    """
    num_experts = scores.shape[1]
    if scores.shape[0] == 0 or global_slots == 0:
        return scores.sum() * 0.0
    f = global_counts.to(scores.dtype) / global_slots  # [E]
    p = scores.mean(dim=0)  # [E]
    return num_experts * torch.sum(f * p)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()

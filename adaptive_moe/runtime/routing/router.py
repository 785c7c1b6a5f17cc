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

from adaptive_moe.core.config import RouterConfig, check_capacity_factor, check_top_k
from adaptive_moe.runtime.experts.grouping import expert_counts
from adaptive_moe.runtime.routing.router_matmul import tensor_core_linear
from adaptive_moe.runtime.routing.router_select import softmax_topk, triton_runs_on
from csrc_triton._common import MAX_ROUTED_EXPERTS


@dataclasses.dataclass(frozen=True)
class Routing:
    """The router's decision for one forward, computed once and passed down.

    Attributes:
        logits: [T, E] fp32 router logits (for the z-loss and for recording).
        scores: [T, E] fp32 softmax or sigmoid scores (for the balance loss).
        topk_ids: [T, k] int64 chosen experts; -1 marks a dropped slot.
        gates: [T, k] fp32 combine weights; 0 for dropped slots.
        counts: [E] int64 slots routed to each expert *before* capacity drops (the
            balance loss counts demand, not what fitted). None only from
            ``Router.forward(count=False)`` when no slot was dropped: then every id of
            ``topk_ids`` is >= 0 and ``demand_counts`` counts them on demand.
        kept: [E] int64 slots per expert after drops, when known without counting again
            (``counts`` itself when nothing can be dropped); None: ``kept_counts`` counts.
        dropless: no slot was dropped (no capacity, no random routing): every id of
            ``topk_ids`` is >= 0. False when unknown.
    """

    logits: torch.Tensor
    scores: torch.Tensor
    topk_ids: torch.Tensor
    gates: torch.Tensor
    counts: torch.Tensor | None
    kept: torch.Tensor | None = None
    dropless: bool = False

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[0])

    def kept_counts(self, num_experts: int) -> torch.Tensor:
        """[E] int64 slots per expert after capacity drops."""
        return self.kept if self.kept is not None else expert_counts(self.topk_ids, num_experts)

    def demand_counts(self, num_experts: int) -> torch.Tensor:
        """[E] int64 slots per expert before capacity drops (``counts``, counted here
        when the router skipped it: then nothing was dropped)."""
        return self.counts if self.counts is not None else self.kept_counts(num_experts)


def capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int | None:
    """Per-expert slot capacity on this rank, or None for dropless.

    ``C = min(T, max(1, ceil(|f| * k * T / E)))``: GShard's / Switch's expert capacity
    (Tutel paper eq. 1, ``k*f*T/E``) rounded up once, at least 1, at most T (an expert
    never receives more than T slots: a token picks an expert once). A negative factor
    caps dropless routing at the same number; since dispatch here never pads to
    capacity, a negative and a positive factor drop exactly the same slots.

    Tutel's code rounds twice, ``k * int(f * ceil(T / E))``: it rounds T/E up, then
    ``f * ...`` *down*, then multiplies by k, so its capacity moves in steps of k and can
    be below the formula (f=1.25, T=10, k=2, E=4: Tutel 6, here 7) or above it (f=1,
    T=9, k=2, E=4: Tutel 6, here 5). One rounding of the exact product keeps the
    capacity monotone in f with no plateaus and equal to the paper's formula up to one
    slot, and it needs no padding to a multiple of k because dispatch never pads.
    """
    if capacity_factor == 0:
        return None
    cap = math.ceil(abs(capacity_factor) * top_k * num_tokens / num_experts)
    return min(max(1, num_tokens), max(1, cap))


_MATMUL_PARTS = {"float32": 0, "bfloat16": 1, "bfloat16x2": 2}


def matmul_parts(matmul_dtype: str, x: torch.Tensor) -> int:
    """bf16 parts of the router weight in its GEMM (``router_matmul``): 0 for the exact
    fp32 GEMM. ``"auto"`` takes the split weight (2, fp32-grade logits on tensor cores)
    where the tokens are bf16 CUDA tensors, so exact in bf16, and fp32 elsewhere (fp16
    or fp32 tokens would be rounded; the CPU has no bf16 tensor cores to gain)."""
    if matmul_dtype == "auto":
        return 2 if x.is_cuda and x.dtype == torch.bfloat16 else 0
    return _MATMUL_PARTS[matmul_dtype]


# Largest scale of the cosine router's logits (Tutel's cosine_top and Swin-V2 clamp the
# learned temperature at 1 / 0.01): cosines lie in [-1, 1], so logits stay in [-100, 100].
_COSINE_MAX_SCALE = 100.0


class Router(nn.Module):
    """fp32 router with the selection rules of ``RouterConfig``.

    ``router_type="linear"``: ``weight`` [E, d] (no bias). ``"cosine"``: ``proj``
    (d -> p, with bias), ``expert_embedding`` [E, p] and the scalar ``log_scale``;
    ``weight`` is None.
    """

    def __init__(self, d_model: int, cfg: RouterConfig, device: torch.device | None = None):
        super().__init__()
        self.cfg = cfg
        e = cfg.num_experts
        if cfg.router_type == "cosine":
            self.register_parameter("weight", None)
            self.proj = nn.Linear(d_model, cfg.cosine_dim, device=device)
            self.expert_embedding = nn.Parameter(torch.empty(e, cfg.cosine_dim, device=device))
            self.log_scale = nn.Parameter(torch.empty((), device=device))
        else:
            self.weight = nn.Parameter(torch.empty(e, d_model, device=device))
        if cfg.score_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(e, device=device))
        else:
            self.e_score_correction_bias = None
        # The fused selection kernel (runtime/routing/router_select.py): off until measured on
        # the GPU (benchmarks/kernel_variants.py); the same routing either way.
        self.fused_select = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            return
        self.proj.reset_parameters()
        with torch.no_grad():
            self.expert_embedding.normal_(0.0, 0.01)  # only its direction matters
            self.log_scale.fill_(math.log(1.0 / self.cfg.cosine_temperature))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[T, E] fp32 logits of x [T, d] (any float dtype); the matmuls as
        ``cfg.matmul_dtype`` says (:func:`matmul_parts`), never autocast's dtype."""
        with torch.autocast(x.device.type, enabled=False):
            return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        parts = matmul_parts(self.cfg.matmul_dtype, x)
        if self.weight is not None:
            return self._linear(x, self.weight, parts)
        p = self._linear(x, self.proj.weight, parts, self.proj.bias)  # [T, p]
        cos = F.normalize(p, dim=-1) @ F.normalize(self.expert_embedding.float(), dim=-1).T
        scale = self.log_scale.float().clamp(max=math.log(_COSINE_MAX_SCALE)).exp()
        return cos * scale  # [T, E]

    @staticmethod
    def _linear(
        x: torch.Tensor, w: torch.Tensor, parts: int, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[T, rows of w] fp32 ``x @ w.T (+ bias)``: exact fp32 (parts 0) or on bf16
        tensor cores (fp32 bias added after)."""
        b = None if bias is None else bias.float()
        if parts == 0:
            return F.linear(x.float(), w.float(), b)
        y = tensor_core_linear(x, w, parts)
        return y if b is None else y + b

    def _score(self, logits: torch.Tensor) -> torch.Tensor:
        if self.cfg.score_func == "softmax":
            return torch.softmax(logits, dim=-1)
        return torch.sigmoid(logits)

    def forward(
        self,
        x: torch.Tensor,
        top_k: int | None = None,
        capacity_factor: float | None = None,
        *,
        count: bool = True,
    ) -> Routing:
        """Route x [T, d]; ``top_k`` and ``capacity_factor`` override the config's for
        this call (same semantics: > 0 fixed, 0 dropless, < 0 capped dropless).
        ``count=False``: leave ``counts`` None when no slot is dropped (the inference
        path counts only if a loss is read)."""
        cfg = self.cfg
        k = cfg.top_k if top_k is None else top_k
        check_top_k(k, cfg.num_experts)
        factor = cfg.capacity_factor if capacity_factor is None else capacity_factor
        check_capacity_factor(factor)
        noise = cfg.gate_noise if self.training else "none"
        eps = cfg.noise_eps
        if noise == "jitter":
            x = x.float()
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)  # [T, d]
        logits = self.logits(x)  # [T, E]
        if noise == "gaussian":
            logits = logits + torch.randn_like(logits) * (eps / cfg.num_experts)
        demand = None  # [E] counts from the fused kernel
        if self.fused_select and self._fusable(noise, logits):
            renorm = cfg.renormalize and k > 1
            scores, topk_ids, gates, demand = softmax_topk(logits, k, renorm)  # fused kernel
        else:
            scores, topk_ids, gates = self._score_and_select(logits, k, noise)
        if cfg.renormalize and k == 1 and cfg.top1_gate == "one":
            # p / p is exactly 1: dividing would only feed rounding noise into the router.
            gates = torch.ones_like(gates)
        if cfg.routed_scaling_factor != 1.0:
            gates = gates * cfg.routed_scaling_factor
        keep = self._keep_mask(topk_ids, gates, scores, factor)
        counts = None
        if count or keep is not None:
            counts = demand if demand is not None else expert_counts(topk_ids, cfg.num_experts)
        if keep is not None:
            # masked_fill keeps topk_ids' row-major layout (keep is a transposed view).
            topk_ids = topk_ids.masked_fill(keep.logical_not(), -1)
            gates = gates * keep
        kept = counts if keep is None else None  # nothing dropped: no second count
        return Routing(logits, scores, topk_ids, gates, counts, kept, dropless=keep is None)

    def _fusable(self, noise: str, logits: torch.Tensor) -> bool:
        """Whether ``csrc_triton.routing`` computes this selection: softmax scores chosen
        as they are (no Gumbel sample, bias correction or expert groups), on a device
        Triton runs on."""
        cfg = self.cfg
        plain = self.e_score_correction_bias is None and cfg.num_groups == 1
        softmax = cfg.score_func == "softmax" and noise != "rsample"
        fits = cfg.num_experts <= MAX_ROUTED_EXPERTS
        return plain and softmax and fits and triton_runs_on(logits.device)

    def _score_and_select(
        self, logits: torch.Tensor, k: int, noise: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores [T, E], topk_ids [T, k], gates [T, k]) in torch; gates renormalised
        for k > 1 where configured."""
        cfg = self.cfg
        scores = self._score(logits)  # [T, E]
        choice = scores
        if noise == "rsample":
            gumbel = -torch.empty_like(logits).exponential_().log()  # Gumbel(0, 1)
            choice = self._score(logits + cfg.noise_eps * gumbel)
        topk_ids, top = self._select(choice, k, gates_from=scores)  # [T, k] each
        gates = scores.gather(1, topk_ids) if top is None else top  # [T, k]
        if cfg.renormalize and k > 1:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, topk_ids, gates

    def _select(
        self, scores: torch.Tensor, k: int, gates_from: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([T, k] chosen expert ids (group-limited, bias-corrected where configured),
        their values in ``gates_from`` or None). The values come with the top-k itself,
        no gather, when the choice is made on ``gates_from`` unchanged and no gradient
        is recorded (top-k's values are the selected elements themselves)."""
        cfg = self.cfg
        plain = self.e_score_correction_bias is None and cfg.num_groups == 1
        recording = torch.is_grad_enabled() and scores.requires_grad
        if plain and scores is gates_from and not recording:
            values, ids = scores.topk(k, dim=-1)
            return ids, values
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
        return choice.topk(k, dim=-1).indices, None

    def _keep_mask(
        self, topk_ids: torch.Tensor, gates: torch.Tensor, scores: torch.Tensor, factor: float
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
        cap = capacity(factor, t, k, cfg.num_experts)
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
        order = None  # queue order over choice-major slots [k*T]; None: that order itself
        if self.cfg.batch_prioritized:
            by_score = torch.argsort(scores.max(dim=-1).values, descending=True, stable=True)
            level = torch.arange(k, device=ids.device).repeat_interleave(t) * t
            order = level + by_score.repeat(k)
        queued = ids if order is None else ids[order]
        sort_key = queued.remainder(self.cfg.num_experts + 1)  # -1 -> E: dropped last
        sorted_key, perm = torch.sort(sort_key, stable=True)  # by expert, queue order kept
        counts = expert_counts(sort_key, self.cfg.num_experts + 1)  # no device sync
        starts = torch.cumsum(counts, 0) - counts
        position = torch.empty_like(perm)
        position[perm] = torch.arange(perm.numel(), device=perm.device) - starts[sorted_key]
        fits = (position < cap) & (queued >= 0)
        if order is not None:
            fits = torch.empty_like(fits).index_put_((order,), fits)
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

"""``StaticDispatcher``: decode-time inference, a forward with static shapes and no
device-to-host sync.

The training forward copies the per-expert counts to the host once per call (they size
the all-to-all splits and the grouped buffers). That sync, and every allocation sized by
the routing, keeps a forward out of a CUDA graph and costs a round trip per layer at
decode sizes. When no gradient is needed the layer runs this path instead:

    route       the router on the device (its counts are scatter-adds, ``expert_counts``)
    dispatch    W = 1: nothing. W > 1: all-gather the tokens and their expert ids over
                the expert group (every rank pads to the same T_pad rows first)
    group       every one of the N = W * T_pad * k slots is sorted by local expert on the
                device; ``offsets`` [E_l + 1] stay on the device, slots of experts stored
                elsewhere (and dropped slots) sort last and are never computed
    experts     the Triton kernels (``scatter`` or the small-batch ``gemv``) read offsets
                from device memory and launch a grid sized by the upper bound of tiles
    combine     W > 1: reduce-scatter the slot outputs (each slot is computed by the ranks
                storing its expert: one rank, or the s ranks of a sliced expert whose
                partial outputs the sum adds); then the gated sum of each token's k slots

Shapes (notation in ``core.config``):
    x          [T, d]              this rank's tokens
    x_all      [W * T_pad, d]      gathered tokens (rank r's rows at r * T_pad)
    ids_all    [W * T_pad, k]      gathered global expert ids, -1 = dropped or padding
    y_all      [W * T_pad * k, d]  slot outputs of this rank's experts, 0 elsewhere
    y_slots    [T_pad * k, d]      this rank's slots, summed over the group
    y          [T, d]

Every shape is a function of (T, k, W, T_pad) alone, so one forward can be captured with
``torch.cuda.CUDAGraph`` and replayed on new tokens. Capacity modes work unchanged: the
capacity is computed from T on the host. The kernels ``loop``, ``bmm`` and
``grouped_mm`` need host counts for their shapes; on CPU (and if a table picks them on
GPU) this path copies the counts once, like the training forward.

Weights are never moved: each rank computes only with the shard it stores (the layout's
expert slicing, E < W, included), unlike the r = 0 strategy that gathers weights.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from adaptive_moe.comm import all_gather_rows, reduce_scatter_rows
from adaptive_moe.comm.order import CollectiveOrder
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.runtime.dispatch.dispatcher import Counts, Dispatcher
from adaptive_moe.runtime.experts.kernels import bias_combine
from adaptive_moe.runtime.experts.stacked import Experts
from adaptive_moe.runtime.inference.rows import combine_static, group_static, static_expert_mlp

# ---------------------------------------------------------------- the dispatcher


@dataclasses.dataclass(frozen=True)
class StaticPlan:
    """Host-side shapes of one static forward (nothing here depends on the routing).

    Attributes:
        tokens: T, this rank's tokens.
        padded: T_pad >= T, rows every rank contributes.
        topk_ids: [T_pad, k] this rank's expert ids, -1 on padding rows.
        kernel: the expert-compute variant.
        complete: every slot is routed to a local expert (one process, nothing dropped,
            no padding): see ``StaticRows.complete``.
    """

    tokens: int
    padded: int
    topk_ids: Tensor
    kernel: str
    complete: bool = False


@dataclasses.dataclass(frozen=True)
class StaticDispatched:
    """x_all [W * T_pad, d], ids_all [W * T_pad, k] and the local weights."""

    x_all: Tensor
    ids_all: Tensor
    experts: Experts


@dataclasses.dataclass(frozen=True)
class StaticComputed:
    """y_all [W * T_pad * k, d] and the local weights (for the down-projection bias)."""

    y_all: Tensor
    experts: Experts


@dataclasses.dataclass
class StaticDispatcher(Dispatcher[StaticPlan, StaticDispatched, StaticComputed]):
    """The static-shape family (module docstring): token all-gather, local experts,
    reduce-scatter; on one process just the device-side grouping and the kernels.

    ``tokens_per_rank``: T_pad (see ``InferenceConfig``); None: every rank's T."""

    tokens_per_rank: int | None = None
    # arange(E_l + 1) per device, the searchsorted bounds of the grouping (read only).
    _bounds: dict[torch.device, Tensor] = dataclasses.field(
        default_factory=dict, repr=False, compare=False
    )
    # The gemv launch configs the autotuner chose, per problem (``launch_gemv``).
    _launch_configs: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def bounds(self, device: torch.device) -> Tensor:
        """[E_l + 1] int64 ``arange`` on ``device``, made once per device. Not kept when
        made during a CUDA-graph capture: it would live in that graph's memory pool."""
        b = self._bounds.get(device)
        if b is None:
            b = torch.arange(self.layout.experts_per_rank + 1, device=device)
            if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
                self._bounds[device] = b
        return b

    def forward_local(
        self,
        x: Tensor,
        topk_ids: Tensor,
        gates: Tensor,
        kernel: str,
        experts: Experts,
        *,
        complete: bool,
    ) -> Tensor:
        """y [T, d] on one process: group -> experts -> combine, nothing exchanged and no
        per-phase objects (what ``forward`` computes when the group has one rank).
        ``complete``: no id of topk_ids [T, k] is -1 (no capacity drop), so the
        grouping moves nothing last and the slot outputs need no zero fill."""
        k = topk_ids.shape[1]
        num_experts = self.layout.experts_per_rank
        rows = group_static(
            topk_ids.reshape(-1), num_experts, k, complete,
            bounds=self.bounds(topk_ids.device),
        )  # fmt: skip
        cfg = self.cfg
        # y_slots [T * k, d]
        y_slots = static_expert_mlp(
            x, rows, experts.w1, experts.b1, experts.down_proj, glu=cfg.glu,
            activation=cfg.activation, kernel=kernel, launch_configs=self._launch_configs,
        )  # fmt: skip
        y = combine_static(y_slots, gates)  # [T, d]
        b2 = experts.down_proj_bias
        if b2 is None:
            return y
        return y + bias_combine(b2.reshape(num_experts, cfg.d_model), topk_ids, gates, y.dtype)

    @property
    def _group(self) -> object:
        if self.mesh is None or self.mesh.world == 1:
            return None
        return self.mesh.group

    def padded_tokens(self, num_tokens: int) -> int:
        """T_pad for a rank passing ``num_tokens`` tokens."""
        pad = self.tokens_per_rank
        if pad is None or self._group is None:
            return num_tokens
        if num_tokens > pad:
            raise ValueError(
                f"x has {num_tokens} tokens but InferenceConfig.tokens_per_rank={pad}: "
                "raise tokens_per_rank or split the batch"
            )
        return pad

    def exchange_counts(
        self, kept: Tensor, demand: Tensor, *, num_tokens: int | None = None
    ) -> Counts:
        """Phase 1 without a host sync: ``demand`` [E] is summed over the group on the
        device (one all-reduce); ``kept`` is not needed. ``num_tokens`` (this rank's T) is
        required: ``max_tokens`` is its static bound W * T_pad (a token picks an expert at
        most once) and ``demand_total`` the same bound, since the true total is only on
        the device (``balance_loss_static`` normalises there)."""
        del kept  # the static family plans from shapes, not counts
        if num_tokens is None:
            raise ValueError("StaticDispatcher.exchange_counts needs num_tokens (this rank's T)")
        group = self._group
        demand = demand.long().clone()
        if group is not None:
            torch.distributed.all_reduce(demand, group=group)
        world = 1 if group is None else self.mesh.world
        bound = world * self.padded_tokens(num_tokens)
        return Counts(kept=None, max_tokens=bound, demand=demand, demand_total=bound)

    def plan(
        self, topk_ids: Tensor, counts: Counts, strategy: Strategy, *, complete: bool = False
    ) -> StaticPlan:
        """``complete``: the caller knows no slot is dropped (see ``StaticPlan``); it
        holds only on one process without padding."""
        t = topk_ids.shape[0]
        padded = self.padded_tokens(t)
        if padded > t:
            pad = topk_ids.new_full((padded - t, topk_ids.shape[1]), -1)
            topk_ids = torch.cat([topk_ids, pad])  # [T_pad, k]
        complete = complete and padded == t and self.layout.experts_per_rank == self.cfg.num_experts
        return StaticPlan(t, padded, topk_ids, strategy.kernel, complete)

    def forward(
        self,
        x: Tensor,
        topk_ids: Tensor,
        gates: Tensor,
        counts: Counts,
        strategy: Strategy,
        experts: Experts,
        *,
        complete: bool = False,
    ) -> Tensor:
        """The contract's forward, passing ``complete`` to ``plan``."""
        order = CollectiveOrder(x.device)
        plan = self.plan(topk_ids, counts, strategy, complete=complete)
        computed = self.experts(self.dispatch(x, plan, experts, order), plan, order)
        return self.combine(computed, plan, gates, order)

    def dispatch(
        self, x: Tensor, plan: StaticPlan, experts: Experts, order: CollectiveOrder
    ) -> StaticDispatched:
        if plan.padded > plan.tokens:
            x = torch.cat([x, x.new_zeros(plan.padded - plan.tokens, x.shape[1])])  # [T_pad, d]
        group = self._group
        x_all = all_gather_rows(x, group)  # [W * T_pad, d]
        ids_all = all_gather_rows(plan.topk_ids, group)  # [W * T_pad, k]
        return StaticDispatched(x_all, ids_all, experts)

    def experts(
        self, dispatched: StaticDispatched, plan: StaticPlan, order: CollectiveOrder
    ) -> StaticComputed:
        """y_all [W * T_pad * k, d]: this rank's experts' (partial) slot outputs."""
        ids = dispatched.ids_all.flatten()  # [N]
        lay = self.layout
        first = lay.local_experts.start
        if lay.experts_per_rank < self.cfg.num_experts:  # some experts live elsewhere
            local = ids - first
            mine = (ids >= first) & (local < lay.experts_per_rank)
            ids = torch.where(mine, local, torch.full_like(local, -1))
        rows = group_static(ids, lay.experts_per_rank, dispatched.ids_all.shape[1], plan.complete)
        ex = dispatched.experts
        x = dispatched.x_all
        cfg = self.cfg
        y_all = static_expert_mlp(
            x, rows, ex.w1, ex.b1, ex.down_proj,
            glu=cfg.glu, activation=cfg.activation, kernel=plan.kernel,
            launch_configs=self._launch_configs,
        )  # fmt: skip
        return StaticComputed(y_all, ex)

    def combine(
        self, computed: StaticComputed, plan: StaticPlan, gates: Tensor, order: CollectiveOrder
    ) -> Tensor:
        """Phase 5: y [T, d] from y_all (reduce-scatter, gated sum, down-projection bias)."""
        k = gates.shape[1]
        y_slots = reduce_scatter_rows(computed.y_all, self._group)  # [T_pad * k, d]
        if plan.padded > plan.tokens:  # a full-range slice would cost a zero-filled copy
            y_slots = y_slots[: plan.tokens * k]  # [T * k, d]  in backward
        y = combine_static(y_slots, gates)  # [T, d]
        topk_ids = plan.topk_ids[: plan.tokens]  # [T, k]
        b2 = computed.experts.down_proj_bias
        if b2 is None:
            return y
        group = self._group
        if group is not None:
            b2 = all_gather_rows(b2, group)  # [W * E_l, d / s]
        b2 = b2.reshape(self.cfg.num_experts, self.cfg.d_model)  # [E, d]
        return y + bias_combine(b2, topk_ids, gates, y.dtype)

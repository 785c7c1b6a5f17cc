"""The three dispatcher families (``dispatcher.Dispatcher``) and the executor that picks one.

    x          [T, d]        this rank's tokens
    topk_ids   [T, k]        global expert ids, -1 = dropped slot
    gates      [T, k]        fp32 combine weights
    y_slots    [T*k, d]      expert output per slot (partial sums added in place)
    y          [T, d]        sum_j gates[t, j] * (y_slots[t*k + j] + down_bias[e])

Families over the fixed layout (``core.layout``):
    LocalDispatcher     one process: every expert is local; no collective.
    GatherDispatcher    r = 0: gather every expert's weights over the group (backward:
                        reduce-scatter), compute all experts locally; no token exchange.
    ExchangeDispatcher  r >= 1: exchange rows to the ranks storing their experts
                        (``dispatch``); when s > 1 each of the r hidden blocks gathers the
                        h/r slice it needs from its s/r ranks and the r partial outputs
                        are summed on return. With ``degree`` chunks every chunk's
                        all-to-all is started before any expert computes (the
                        asynchronous ``comm.exchange_start``), so chunk i+1's exchange
                        runs while chunk i's experts compute, on gloo as on NCCL.
Every path is differentiable; expert gradients reach the owning shard fully summed.
"""

from __future__ import annotations

import dataclasses

import torch

from adaptive_moe.comm import (
    ExchangePlan,
    Mesh,
    PendingExchange,
    all_gather_rows,
    exchange_start,
    prepare_exchange,
)
from adaptive_moe.comm.order import CollectiveOrder
from adaptive_moe.core.config import ExpertConfig
from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.core.transfer import HostBatch
from adaptive_moe.runtime.dispatch.dispatcher import Counts, Dispatcher
from adaptive_moe.runtime.dispatch.plan import build_plan
from adaptive_moe.runtime.experts.grouping import ExpertRows, cumulative, group_by_expert
from adaptive_moe.runtime.experts.kernels import combine_slots, expert_mlp
from adaptive_moe.runtime.experts.stacked import Experts


@dataclasses.dataclass(frozen=True)
class ExpertTensors:
    """The weights one forward computes with (this rank's shard, or gathered ones).

    w1 [n_e, rows, d], b1 [n_e, rows] | None, w2 [n_e, d, hid]."""

    w1: torch.Tensor
    b1: torch.Tensor | None
    w2: torch.Tensor

    def as_args(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        # Not dataclasses.astuple: that deep-copies, cutting the tensors from autograd.
        return self.w1, self.b1, self.w2

    def for_compute(self) -> ExpertTensors:
        """The weights in the autocast dtype when autocast is on for their device, else
        themselves. Cast once per forward here, not in every chunk's expert call: a
        pipelined strategy (degree d) would otherwise cast fp32 masters d times."""
        device = self.w1.device.type
        if not torch.is_autocast_enabled(device):
            return self
        dtype = torch.get_autocast_dtype(device)
        b1 = None if self.b1 is None else self.b1.to(dtype)
        return ExpertTensors(self.w1.to(dtype), b1, self.w2.to(dtype))


def _own_weights(experts: Experts) -> ExpertTensors:
    return ExpertTensors(experts.w1, experts.b1, experts.down_proj).for_compute()


def _gather_weights(
    experts: Experts,
    cfg: ExpertConfig,
    layout: ShardLayout,
    group: object,
    n_experts: int,
    parts: int,
    order: CollectiveOrder,
) -> ExpertTensors:
    """All-gather hidden slices over ``group`` into ``n_experts`` experts whose hidden
    dimension is ``parts`` consecutive slices (gate parts first, then up parts)."""
    glu, h_l = cfg.glu, layout.hidden_per_rank
    halves = 2 if glu else 1
    w1 = _gather(experts.w1, group, order)  # [n_experts*parts, halves*h_l, d]
    d = w1.shape[-1]
    w1 = w1.view(n_experts, parts, halves, h_l, d).transpose(1, 2)
    w1 = w1.reshape(n_experts, halves * parts * h_l, d)
    b1 = None
    if experts.b1 is not None:
        b1 = _gather(experts.b1, group, order).view(n_experts, parts, halves, h_l)
        b1 = b1.transpose(1, 2).reshape(n_experts, halves * parts * h_l)
    w2 = _gather(experts.down_proj, group, order).view(n_experts, parts, d, h_l)
    w2 = w2.permute(0, 2, 1, 3).reshape(n_experts, d, parts * h_l)  # [n, d, parts*h_l]
    # Gathered in the stored dtype, so the backward's reduce-scatter sums fp32 gradients.
    return ExpertTensors(w1, b1, w2).for_compute()


def _gather(t: torch.Tensor, group: object, order: CollectiveOrder) -> torch.Tensor:
    """``all_gather_rows`` with its input and output tied into ``order``."""
    return order.tie(all_gather_rows(order.tie(t), group))


def _full_down_bias(
    experts: Experts, cfg: ExpertConfig, mesh: Mesh | None, order: CollectiveOrder
) -> torch.Tensor:
    """[E, d] down-projection bias of every expert (gathered over the group)."""
    b2 = experts.down_proj_bias  # [E_l, d/s]
    if mesh is None or mesh.world == 1:
        return b2
    return _gather(b2, mesh.group, order).reshape(cfg.num_experts, cfg.d_model)


def _add_routed_bias(
    y: torch.Tensor, topk_ids: torch.Tensor, gates: torch.Tensor, b2: torch.Tensor | None
) -> torch.Tensor:
    """y [T, d] + sum_j gates[t, j] * b2[topk_ids[t, j]] (fp32; dropped slots have gate 0)."""
    if b2 is None:
        return y
    bias = (gates.unsqueeze(-1) * b2[topk_ids.clamp(min=0)].float()).sum(1)  # [T, d]
    return y + bias.to(y.dtype)


def _mlp(
    cfg: ExpertConfig,
    x: torch.Tensor,
    rows: ExpertRows,
    weights: ExpertTensors,
    strategy: Strategy,
) -> torch.Tensor:
    # Every kernel keeps its output in the graph even with no rows, so a rank that
    # computes nothing still reaches the weight gather's backward collective.
    return expert_mlp(
        x, rows, *weights.as_args(), glu=cfg.glu, activation=cfg.activation, kernel=strategy.kernel
    )


# ---- all experts on this rank: one process (Local) or gathered weights (Gather, r = 0) ----


@dataclasses.dataclass(frozen=True)
class LocalPlan:
    """Local slots grouped by expert: rows.sorted_slots [M], rows.offsets [E + 1]."""

    strategy: Strategy
    rows: ExpertRows
    topk_ids: torch.Tensor  # [T, k]


@dataclasses.dataclass(frozen=True)
class LocalDispatched:
    x: torch.Tensor  # [T, d]
    weights: ExpertTensors  # all E experts
    down_bias: torch.Tensor | None  # [E, d]


@dataclasses.dataclass(frozen=True)
class LocalComputed:
    y_slots: torch.Tensor  # [T*k, d]
    down_bias: torch.Tensor | None  # [E, d]


class LocalDispatcher(Dispatcher[LocalPlan, LocalDispatched, LocalComputed]):
    """One process: every expert is stored here; no collective at all."""

    def plan(self, topk_ids: torch.Tensor, counts: Counts, strategy: Strategy) -> LocalPlan:
        kept = counts.kept[self.layout.rank]
        batch = HostBatch()
        offsets = batch.add(cumulative(kept))
        views = batch.upload(topk_ids.device)  # the plan's one host-to-device copy
        k = topk_ids.shape[1]
        rows = group_by_expert(
            topk_ids.flatten(), self.cfg.num_experts, k, kept, offsets=views[offsets]
        )
        return LocalPlan(strategy, rows, topk_ids)

    def _weights(
        self, experts: Experts, order: CollectiveOrder
    ) -> tuple[ExpertTensors, torch.Tensor | None]:
        """All E experts' weights and [E, d] down bias (None without bias)."""
        return _own_weights(experts), experts.down_proj_bias

    def dispatch(
        self, x: torch.Tensor, plan: LocalPlan, experts: Experts, order: CollectiveOrder
    ) -> LocalDispatched:
        return LocalDispatched(x, *self._weights(experts, order))

    def experts(
        self, dispatched: LocalDispatched, plan: LocalPlan, order: CollectiveOrder
    ) -> LocalComputed:
        y_slots = _mlp(self.cfg, dispatched.x, plan.rows, dispatched.weights, plan.strategy)
        return LocalComputed(y_slots, dispatched.down_bias)

    def combine(
        self, computed: LocalComputed, plan: LocalPlan, gates: torch.Tensor, order: CollectiveOrder
    ) -> torch.Tensor:
        y = combine_slots(computed.y_slots, gates)  # [T, d]
        return _add_routed_bias(y, plan.topk_ids, gates, computed.down_bias)


class GatherDispatcher(LocalDispatcher):
    """r = 0: every expert's weights (and down bias) are all-gathered in ``dispatch``; the
    tokens stay on their rank. Backward reduce-scatters the weight gradients."""

    def _weights(
        self, experts: Experts, order: CollectiveOrder
    ) -> tuple[ExpertTensors, torch.Tensor | None]:
        mesh = self.mesh
        if mesh is None or mesh.world == 1:
            return super()._weights(experts, order)
        e, s = self.cfg.num_experts, self.layout.shards
        weights = _gather_weights(experts, self.cfg, self.layout, mesh.group, e, s, order)
        bias = None
        if experts.down_proj_bias is not None:
            bias = _full_down_bias(experts, self.cfg, mesh, order)
        return weights, bias


# ---- r >= 1: the token exchange -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExchangeChunk:
    """One chunk on the device.

    Attributes:
        send_positions: [N_send] positions in the expert-sorted local slot order, in send
            order (by destination).
        rows: the N_recv received rows grouped by local expert (fan_out 1).
        recv_expert: [N_recv] local expert of each received row, for the down bias.
        exchange: the chunk's all-to-all; ``exchange.inverse()`` returns the outputs.
    """

    send_positions: torch.Tensor
    rows: ExpertRows
    recv_expert: torch.Tensor
    exchange: ExchangePlan


@dataclasses.dataclass(frozen=True)
class ExchangePlanned:
    """Local slots grouped by global expert (the send order) and every chunk."""

    strategy: Strategy
    grouped: ExpertRows
    chunks: tuple[ExchangeChunk, ...]
    topk_ids: torch.Tensor  # [T, k]


@dataclasses.dataclass(frozen=True)
class ExchangeDispatched:
    weights: ExpertTensors  # this rank's hidden block of its experts
    local_bias: torch.Tensor | None  # [E_l, d]: added by the owner (s == 1)
    full_bias: torch.Tensor | None  # [E, d]: added in combine (s > 1)
    received: tuple[PendingExchange, ...]  # per chunk: the rows arriving here


@dataclasses.dataclass(frozen=True)
class ExchangeComputed:
    returned: tuple[PendingExchange, ...]  # per chunk: the outputs on their way back
    full_bias: torch.Tensor | None  # [E, d] (s > 1)


class ExchangeDispatcher(Dispatcher[ExchangePlanned, ExchangeDispatched, ExchangeComputed]):
    """r >= 1: rows travel to the ranks storing their experts and back (EP+DP, EP+MP)."""

    def plan(self, topk_ids: torch.Tensor, counts: Counts, strategy: Strategy) -> ExchangePlanned:
        layout, mesh = self.layout, self.mesh
        assert mesh is not None  # the executor uses LocalDispatcher without a group
        kept = counts.kept[layout.rank]
        host_chunks = build_plan(counts.kept, layout, strategy.r, strategy.degree)
        batch = HostBatch()
        offsets = batch.add(cumulative(kept))
        slots = []
        for c in host_chunks:
            slots.append(
                (
                    batch.add(c.send_positions),
                    batch.add(c.recv_grouped),
                    batch.add(cumulative(c.recv_counts)),
                    batch.add(c.recv_expert),
                    prepare_exchange(c.sizes, mesh, strategy.a2a, batch),
                )
            )
        views = batch.upload(topk_ids.device)  # the plan's one host-to-device copy
        k = topk_ids.shape[1]
        grouped = group_by_expert(
            topk_ids.flatten(), self.cfg.num_experts, k, kept, offsets=views[offsets]
        )
        chunks = tuple(
            ExchangeChunk(
                send_positions=views[send],
                rows=ExpertRows(
                    sorted_slots=views[order],
                    offsets=views[bounds],
                    counts=c.recv_counts,
                    fan_out=1,
                    num_slots=int(c.recv_expert.size),
                ),
                recv_expert=views[expert],
                exchange=prepared.finish(views),
            )
            for c, (send, order, bounds, expert, prepared) in zip(host_chunks, slots)
        )
        return ExchangePlanned(strategy, grouped, chunks, topk_ids)

    def dispatch(
        self, x: torch.Tensor, plan: ExchangePlanned, experts: Experts, order: CollectiveOrder
    ) -> ExchangeDispatched:
        mesh, layout = self.mesh, self.layout
        r = plan.strategy.r
        q = layout.shards // r
        group = mesh.shard_blocks.get(r) if q > 1 else None
        if group is None:
            weights = _own_weights(experts)
        else:
            weights = _gather_weights(experts, self.cfg, layout, group, 1, q, order)
        local_bias = full_bias = None
        if experts.down_proj_bias is not None and layout.shards == 1:
            local_bias = experts.down_proj_bias  # the owner holds its experts' whole bias
        elif experts.down_proj_bias is not None:
            full_bias = _full_down_bias(experts, self.cfg, mesh, order)
        src_rows = plan.grouped.input_rows  # [M] token row of each sorted position
        received = tuple(
            exchange_start(x.index_select(0, src_rows[c.send_positions]), c.exchange, mesh, order)
            for c in plan.chunks
        )
        return ExchangeDispatched(weights, local_bias, full_bias, received)

    def experts(
        self, dispatched: ExchangeDispatched, plan: ExchangePlanned, order: CollectiveOrder
    ) -> ExchangeComputed:
        returned = []
        for chunk, pending in zip(plan.chunks, dispatched.received):
            recv = pending.wait()  # [N_recv, d]
            y = _mlp(self.cfg, recv, chunk.rows, dispatched.weights, plan.strategy)
            if dispatched.local_bias is not None:
                y = y + dispatched.local_bias[chunk.recv_expert].to(y.dtype)
            returned.append(exchange_start(y, chunk.exchange.inverse(), self.mesh, order))
        return ExchangeComputed(tuple(returned), dispatched.full_bias)

    def combine(
        self,
        computed: ExchangeComputed,
        plan: ExchangePlanned,
        gates: torch.Tensor,
        order: CollectiveOrder,
    ) -> torch.Tensor:
        backs = [pending.wait() for pending in computed.returned]  # [N_send, d] each
        y_slots = backs[0].new_zeros(plan.grouped.num_slots, backs[0].shape[1])  # [T*k, d]
        for chunk, back in zip(plan.chunks, backs):
            # index_add sums the r partial outputs of a row when s > 1.
            y_slots.index_add_(0, plan.grouped.sorted_slots[chunk.send_positions], back)
        y = combine_slots(y_slots, gates)  # [T, d]
        return _add_routed_bias(y, plan.topk_ids, gates, computed.full_bias)


class Executor:
    """Holds one dispatcher per family for a layer and runs the family of a strategy."""

    def __init__(self, cfg: ExpertConfig, layout: ShardLayout, mesh: Mesh | None):
        self.cfg, self.layout, self.mesh = cfg, layout, mesh
        self.local = LocalDispatcher(cfg, layout, None)
        self.gather = GatherDispatcher(cfg, layout, mesh)
        self.exchange = ExchangeDispatcher(cfg, layout, mesh)

    @property
    def alone(self) -> bool:
        """No other rank: every strategy runs the local family, with no collective (a
        one-rank all-to-all would only copy the rows, once per chunk)."""
        return self.mesh is None or self.mesh.world == 1

    def dispatcher(self, strategy: Strategy) -> Dispatcher:
        """The family that runs ``strategy`` (one rank: always the local one)."""
        if self.alone:
            return self.local
        return self.gather if strategy.r == 0 else self.exchange

    def exchange_counts(
        self, kept: torch.Tensor, demand: torch.Tensor, extra: torch.Tensor | None = None
    ) -> Counts:
        """Phase 1 (the same for every family): see ``Dispatcher.exchange_counts``."""
        family = self.local if self.alone else self.gather
        return family.exchange_counts(kept, demand, extra)

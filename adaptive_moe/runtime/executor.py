"""Run one MoE forward under a ``Strategy``: dispatch -> experts -> combine.

    x          [T, d]        this rank's tokens
    topk_ids   [T, k]        global expert ids, -1 = dropped slot
    gates      [T, k]        fp32 combine weights
    counts     [W][E]        kept slots per (source rank, expert), host ints, same on all ranks
    y_slots    [T*k, d]      expert output per slot (partial sums added in place)
    y          [T, d]        sum_j gates[t, j] * (y_slots[t*k + j] + down_bias[e])

Strategies over the fixed layout (``layout``):
    r = 0      gather every expert's weights over the group (backward: reduce-scatter),
               compute all experts locally; no token exchange.
    r >= 1     exchange rows to the ranks storing their experts (``dispatch_plan``); when
               s > 1 each of the r hidden blocks gathers the h/r slice it needs from its
               s/r ranks and the r partial outputs are summed on return.
    degree     chunks of the exchange are in flight together: chunk i+1's all-to-all runs
               while chunk i's experts compute (the collectives are asynchronous).
Every path is differentiable; expert gradients reach the owning shard fully summed.
"""

from __future__ import annotations

import dataclasses

import torch

from adaptive_moe.comm import ExchangePlan, Mesh, all_gather_rows, exchange, plan_exchange
from adaptive_moe.comm.order import CollectiveOrder
from adaptive_moe.core.config import ExpertConfig
from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.runtime.dispatch import DispatchPlan, build_plan
from adaptive_moe.runtime.experts import Experts
from adaptive_moe.runtime.grouping import ExpertRows, group_by_expert
from adaptive_moe.runtime.kernels import combine_slots, expert_mlp


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


@dataclasses.dataclass
class _InFlight:
    """An exchange's output and, on GPU, the event its communication stream records."""

    out: torch.Tensor
    done: torch.cuda.Event | None

    def get(self) -> torch.Tensor:
        if self.done is not None:
            current = torch.cuda.current_stream(self.out.device)
            current.wait_event(self.done)
            self.out.record_stream(current)
        return self.out


@dataclasses.dataclass(frozen=True)
class Executor:
    """Runs strategies for one layer; holds only references (mesh, layout, shapes)."""

    cfg: ExpertConfig
    layout: ShardLayout
    mesh: Mesh | None  # None: a single process without a process group
    streams: dict[int, torch.cuda.Stream] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    def run(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        gates: torch.Tensor,
        counts: list[list[int]],
        strategy: Strategy,
        experts: Experts,
    ) -> torch.Tensor:
        """y [T, d] for tokens x [T, d] routed by (topk_ids, gates) under ``strategy``."""
        k = topk_ids.shape[1]
        order = CollectiveOrder(x.device)
        local_counts = counts[self.layout.rank]
        if self.mesh is None or strategy.r == 0:
            weights = self._all_expert_weights(experts, order)
            rows = group_by_expert(topk_ids.flatten(), self.cfg.num_experts, k, local_counts)
            y_slots = self._experts(x, rows, weights, strategy)
        else:
            y_slots = self._exchange_and_compute(x, topk_ids, counts, strategy, experts, order)
        return self._combine(y_slots, topk_ids, gates, experts, order)

    # Phases -----------------------------------------------------------------------------

    def _exchange_and_compute(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        counts: list[list[int]],
        strategy: Strategy,
        experts: Experts,
        order: CollectiveOrder,
    ) -> torch.Tensor:
        """Dispatch, expert compute and return of every chunk; y_slots [T*k, d]."""
        mesh, layout = self.mesh, self.layout
        k = topk_ids.shape[1]
        grouped = group_by_expert(topk_ids.flatten(), self.cfg.num_experts, k, counts[layout.rank])
        plan: DispatchPlan = build_plan(counts, layout, strategy.r, strategy.degree, x.device)
        weights = self._block_weights(experts, strategy.r, order)
        src_rows = grouped.input_rows  # [M] token row of each sorted position
        plans = [plan_exchange(c.sizes, mesh, strategy.a2a, x.device) for c in plan.chunks]

        # Every dispatch is issued first: on GPU they queue on the communication stream
        # while the experts of the chunks already received compute.
        received = [
            self._exchange(x.index_select(0, src_rows[c.send_positions]), p, order)
            for c, p in zip(plan.chunks, plans)
        ]
        returned = []
        for chunk, xp, recv in zip(plan.chunks, plans, received):
            rows = group_by_expert(chunk.recv_expert, layout.experts_per_rank, 1, chunk.recv_counts)
            y_recv = self._experts(recv.get(), rows, weights, strategy)  # [N_recv, d]
            returned.append(self._exchange(y_recv, xp.inverse(), order))

        y_slots = x.new_zeros(topk_ids.numel(), x.shape[1])  # [T*k, d]
        for chunk, back in zip(plan.chunks, returned):
            # index_add sums the r partial outputs of a row when s > 1.
            y_slots.index_add_(0, grouped.sorted_slots[chunk.send_positions], back.get())
        return y_slots

    def _exchange(self, x: torch.Tensor, plan: ExchangePlan, order: CollectiveOrder) -> _InFlight:
        x = order.tie(x)
        stream = self._comm_stream(x.device)
        if stream is None:
            return _InFlight(order.tie(exchange(x, plan, self.mesh)), None)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            out = order.tie(exchange(x, plan, self.mesh))
            done = torch.cuda.Event()
            done.record(stream)
        x.record_stream(stream)  # x is freed on the compute stream but read here
        return _InFlight(out, done)

    def _comm_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        """The communication stream of ``device`` (created on first use), None on CPU."""
        if device.type != "cuda":
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self.streams:
            self.streams[index] = torch.cuda.Stream(device=index)
        return self.streams[index]

    def _combine(
        self,
        y_slots: torch.Tensor,
        topk_ids: torch.Tensor,
        gates: torch.Tensor,
        experts: Experts,
        order: CollectiveOrder,
    ) -> torch.Tensor:
        y = combine_slots(y_slots, gates)  # [T, d]
        if experts.down_proj_bias is None:
            return y
        b2 = self._full_down_bias(experts, order)  # [E, d]
        bias = (gates.unsqueeze(-1) * b2[topk_ids.clamp(min=0)].float()).sum(1)  # [T, d]
        return y + bias.to(y.dtype)

    def _experts(
        self, x: torch.Tensor, rows: ExpertRows, weights: ExpertTensors, strategy: Strategy
    ) -> torch.Tensor:
        # Every kernel keeps its output in the graph even with no rows, so a rank that
        # computes nothing still reaches the weight gather's backward collective.
        cfg = self.cfg
        return expert_mlp(
            x,
            rows,
            *weights.as_args(),
            glu=cfg.glu,
            activation=cfg.activation,
            kernel=strategy.kernel,
        )

    # Weights ---------------------------------------------------------------------------

    def _all_expert_weights(self, experts: Experts, order: CollectiveOrder) -> ExpertTensors:
        """All E experts' full weights: the shard itself on one process, else gathered."""
        if self.mesh is None or self.mesh.world == 1:
            return ExpertTensors(experts.w1, experts.b1, experts.down_proj)
        group, shards = self.mesh.group, self.layout.shards
        return self._gather(experts, group, self.cfg.num_experts, shards, order)

    def _block_weights(self, experts: Experts, r: int, order: CollectiveOrder) -> ExpertTensors:
        """Weights of the hidden block this rank computes under r >= 1 (h/r of its expert)."""
        q = self.layout.shards // r
        group = self.mesh.shard_blocks.get(r) if q > 1 else None
        if group is None:
            return ExpertTensors(experts.w1, experts.b1, experts.down_proj)
        return self._gather(experts, group, 1, q, order)

    def _gather(
        self, experts: Experts, group: object, n_experts: int, parts: int, order: CollectiveOrder
    ) -> ExpertTensors:
        """All-gather hidden slices over ``group`` into ``n_experts`` experts whose hidden
        dimension is ``parts`` consecutive slices (gate parts first, then up parts)."""
        glu, h_l = self.cfg.glu, self.layout.hidden_per_rank
        halves = 2 if glu else 1
        gather = lambda t: order.tie(all_gather_rows(order.tie(t), group))
        w1 = gather(experts.w1)  # [n_experts*parts, halves*h_l, d]
        d = w1.shape[-1]
        w1 = w1.view(n_experts, parts, halves, h_l, d).transpose(1, 2)
        w1 = w1.reshape(n_experts, halves * parts * h_l, d)
        b1 = None
        if experts.b1 is not None:
            b1 = gather(experts.b1).view(n_experts, parts, halves, h_l)
            b1 = b1.transpose(1, 2).reshape(n_experts, halves * parts * h_l)
        w2 = gather(experts.down_proj).view(n_experts, parts, d, h_l)
        w2 = w2.permute(0, 2, 1, 3).reshape(n_experts, d, parts * h_l)  # [n, d, parts*h_l]
        return ExpertTensors(w1, b1, w2)

    def _full_down_bias(self, experts: Experts, order: CollectiveOrder) -> torch.Tensor:
        """[E, d] down-projection bias of every expert (gathered over the group)."""
        b2 = experts.down_proj_bias  # [E_l, d/s]
        if self.mesh is None or self.mesh.world == 1:
            return b2
        full = order.tie(all_gather_rows(order.tie(b2), self.mesh.group))  # [W*E_l, d/s]
        return full.reshape(self.cfg.num_experts, self.cfg.d_model)

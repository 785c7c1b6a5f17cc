"""The dispatcher contract: the one interface every parallel strategy family implements.

A *family* is one way of getting each routed slot to the weights of its expert and its
output back (one class per family, as torchtitan has one dispatcher per backend):

    single process          all E experts are local; nothing is exchanged
    r = 0  gathered weights every expert's weights are all-gathered, tokens stay put (DP)
    r >= 1 token exchange   rows go to the ranks storing their experts (EP+DP, EP+MP)
    (static-shape inference implements the same contract, padded to a fixed capacity)

One forward is five phases, in this order, on every rank of the expert group:

    phase            collectives it issues                    host / device work
    ---------------  ---------------------------------------  -----------------------------
    exchange_counts  one all-gather of [2E] int64 counts      the forward's one device-to-
                     over the expert group (none on one       host sync: every rank then
                     process)                                 holds the same [W][E] counts
    plan             none                                     all host-side metadata of the
                                                              forward (split sizes, row
                                                              orders, grouping offsets),
                                                              copied to the device in ONE
                                                              batch (``HostBatch``)
    dispatch         weight all-gathers (r = 0: every         index_select of the rows to
                     expert; r >= 1 with q = s/r > 1: the     send
                     hidden block), then every chunk's
                     token all-to-all, started asynchronously
    experts          for each chunk: wait for its rows, run   the grouped expert MLP
                     the experts, start its return all-to-all
    combine          wait for every return                    sum slot outputs into tokens

Shapes (notation in ``core.config``):
    kept, demand  [E] int64     this rank's slots per expert after / before capacity drops
    counts.kept   [W][E]        host ints, identical on every rank
    topk_ids      [T, k] int64  global expert ids, -1 = dropped slot
    gates         [T, k] fp32   combine weights (0 for dropped slots)
    x             [T, d]        this rank's tokens
    y             [T, d]        ``sum_j gates[t, j] * expert_{topk_ids[t, j]}(x[t])``, in the
                                expert compute dtype (the layer casts it back to x's)

Collective discipline (``comm.order.CollectiveOrder``): the forward issues the same
collectives in the same order on every rank (the plan is computed from counts every rank
holds), and every collective's input and output is tied into one ``order`` chain created
per forward, so autograd issues the backward collectives in exactly the reverse order on
every rank, even where a rank's chunk is empty. A family must keep every expert output in
the graph (an empty chunk still reaches the loss) for the same reason.

The intermediate values (``plan``'s, ``dispatch``'s and ``experts``' results) are
family-specific; callers only pass them from one phase to the next (``forward`` does).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Generic, TypeVar

import torch

from adaptive_moe.comm import Mesh, all_gather_counts
from adaptive_moe.comm.order import CollectiveOrder
from adaptive_moe.core.config import ExpertConfig
from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.runtime.experts.stacked import Experts

PlanT = TypeVar("PlanT")
DispatchedT = TypeVar("DispatchedT")
ComputedT = TypeVar("ComputedT")


@dataclasses.dataclass(frozen=True)
class Counts:
    """The exchanged counts of one forward (``Dispatcher.exchange_counts``).

    Attributes:
        kept: [W][E] kept slots per (source rank, expert), host ints, the same on every
            rank; None for a family that plans from static shapes instead.
        max_tokens: the largest number of slots any one expert receives over the group
            (the workload key the strategy is looked up by).
        demand: [E] int64 on the device: the group's slots per expert before capacity
            drops (the balance loss counts demand, not what fitted).
        demand_total: sum of ``demand`` (host int).
        extra: [W][F] the ``extra`` columns each rank sent along (host ints; the layer's
            argument-error code and forced strategy, so that ranks that disagree all
            raise), empty when none were sent.
    """

    kept: tuple[tuple[int, ...], ...] | None
    max_tokens: int
    demand: torch.Tensor
    demand_total: int
    extra: tuple[tuple[int, ...], ...] = ()


@dataclasses.dataclass
class Dispatcher(abc.ABC, Generic[PlanT, DispatchedT, ComputedT]):
    """One parallel strategy family (see module docstring); holds only references.

    Attributes:
        cfg: the expert MLP's shape.
        layout: this rank's fixed share of the expert weights.
        mesh: the expert group's communicators; None on a single process.
    """

    cfg: ExpertConfig
    layout: ShardLayout
    mesh: Mesh | None

    def exchange_counts(
        self, kept: torch.Tensor, demand: torch.Tensor, extra: torch.Tensor | None = None
    ) -> Counts:
        """Phase 1. All-gather this rank's ``kept`` and ``demand`` ([E] int each), and
        ``extra`` [F] int columns if given, over the expert group: one collective and the
        forward's one device-to-host sync."""
        e = self.cfg.num_experts
        cols = [kept, demand] if extra is None else [kept, demand, extra]
        local = torch.cat([c.long() for c in cols])  # [2E (+ F)]
        group = self.mesh.group if self.mesh is not None else None
        table = all_gather_counts(local, group)  # [W, 2E (+ F)]
        demand_t = table[:, e : 2 * e].sum(0)  # [E]: stays on the device for the balance loss
        rows = table.tolist()  # the sync
        kept_rows = tuple(tuple(row[:e]) for row in rows)
        return Counts(
            kept=kept_rows,
            max_tokens=max((sum(col) for col in zip(*kept_rows)), default=0),
            demand=demand_t,
            demand_total=sum(sum(row[e : 2 * e]) for row in rows),
            extra=tuple(tuple(row[2 * e :]) for row in rows) if extra is not None else (),
        )

    @abc.abstractmethod
    def plan(self, topk_ids: torch.Tensor, counts: Counts, strategy: Strategy) -> PlanT:
        """Phase 2. Everything host-side about this forward under ``strategy``, computed
        once from ``counts`` and moved to the device in one batch; issues no collective.
        ``topk_ids`` [T, k] is used only for device-side grouping of the local slots."""

    @abc.abstractmethod
    def dispatch(
        self, x: torch.Tensor, plan: PlanT, experts: Experts, order: CollectiveOrder
    ) -> DispatchedT:
        """Phase 3. Issue the weight gathers and start every token exchange of ``x``
        [T, d]; returns without waiting for the exchanges."""

    @abc.abstractmethod
    def experts(self, dispatched: DispatchedT, plan: PlanT, order: CollectiveOrder) -> ComputedT:
        """Phase 4. Run the expert MLP on every chunk as it arrives and start its return."""

    @abc.abstractmethod
    def combine(
        self, computed: ComputedT, plan: PlanT, gates: torch.Tensor, order: CollectiveOrder
    ) -> torch.Tensor:
        """Phase 5. Wait for the returns and combine the slot outputs: y [T, d]."""

    def forward(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        gates: torch.Tensor,
        counts: Counts,
        strategy: Strategy,
        experts: Experts,
    ) -> torch.Tensor:
        """plan -> dispatch -> experts -> combine for one forward: y [T, d]."""
        order = CollectiveOrder(x.device)
        plan = self.plan(topk_ids, counts, strategy)
        dispatched = self.dispatch(x, plan, experts, order)
        computed = self.experts(dispatched, plan, order)
        return self.combine(computed, plan, gates, order)

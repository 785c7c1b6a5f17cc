"""``CountedPath``: the training forward, on host counts, in any world.

    exchange_counts   the executor's all-gather of the kept / demanded counts, carrying
                      each rank's argument error code and forced strategy, so that a bad
                      argument on one rank raises the same ValueError on every rank
    run               choose (``StrategyPolicy.choose_counted``: table, measured default
                      kernel, exploration, replay under activation checkpointing) ->
                      ``Executor.dispatcher(strategy).forward`` -> timed statistics
    run_gated_inputs  the same on per-slot rows scaled by their gates before dispatch

The path holds the executor, the policy and the layout it was given, nothing of the
layer: the routed tokens, the experts, the statistics and a ``record`` callback for the
layer's ``last_*`` attributes come with each call, as one ``CountedCall``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from adaptive_moe.comm import Mesh
from adaptive_moe.core.config import ExpertConfig
from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.runtime.dispatch.dispatcher import Counts
from adaptive_moe.runtime.dispatch.executor import Executor
from adaptive_moe.runtime.experts.grouping import ExpertRows, group_by_expert
from adaptive_moe.runtime.experts.kernels import time_expert_kernels
from adaptive_moe.runtime.experts.stacked import Experts
from adaptive_moe.runtime.layer_args import check_agreement
from adaptive_moe.runtime.policy.policy import StrategyPolicy, Where
from adaptive_moe.runtime.policy.stats import StrategyStats

# record(strategy, max_tokens): the layer's last_* attributes; strategy None: keep the
# last one (before the choice, and under activation checkpointing's recomputation).
Record = Callable[[Strategy | None, int], None]


@dataclasses.dataclass(frozen=True)
class CountedCall:
    """One counted forward: the routed tokens and what the layer lends the path for it.

    Attributes:
        x: the tokens [T, d] (float, any dtype the experts take).
        topk_ids: [T, k] integer expert ids, -1 for a dropped slot.
        gates: [T, k] fp32 combine weights.
        counts: the exchanged counts (``exchange_counts``).
        strategy: the forced strategy, or None: the policy chooses.
        where: (device, dtype) of the expert compute.
        experts: the layer's expert weights.
        stats: the layer's strategy statistics; the forward is timed into them.
        record: the layer's ``last_*`` attributes (``Record``).
    """

    x: Tensor
    topk_ids: Tensor
    gates: Tensor
    counts: Counts
    strategy: Strategy | None
    where: Where
    experts: Experts
    stats: StrategyStats
    record: Record


class CountedPath:
    """See the module docstring.

    Args:
        expert_cfg: the layer's expert config (the probe's kernel arguments).
        layout: the fixed shard layout.
        mesh: the expert group's mesh, or None for one process.
        executor: the training dispatchers of every strategy.
        policy: the layer's strategy policy.
    """

    def __init__(
        self,
        expert_cfg: ExpertConfig,
        layout: ShardLayout,
        mesh: Mesh | None,
        executor: Executor,
        policy: StrategyPolicy,
    ) -> None:
        self.expert_cfg, self.layout, self.mesh = expert_cfg, layout, mesh
        self.executor, self.policy = executor, policy
        self.distributed = mesh is not None and mesh.world > 1

    # Eager under torch.compile: the exchange ends in the counts' host copy (a graph
    # break anyway), and the strategy list it matches a forced strategy against holds
    # frozen dataclasses dynamo cannot rebuild across that break.
    @torch.compiler.disable
    def exchange_counts(
        self,
        kept: Tensor,
        demand: Tensor,
        where: Where,
        error_code: int = 0,
        strategy: Strategy | None = None,
        error: ValueError | None = None,
    ) -> Counts:
        """The executor's count exchange, with two more columns riding on it: this rank's
        argument error code and its forced strategy. A bad argument on one rank, or
        ranks forcing different strategies, would otherwise leave the other ranks waiting
        in a collective this rank never joins; now every rank raises the same ValueError
        (chained to the local detail where there is one)."""
        codes = (error_code, self.policy.code(strategy, where))
        # Usually both 0: a fill on the device, not a host-to-device copy.
        flags = kept.new_zeros(2) if codes == (0, 0) else torch.tensor(codes, device=kept.device)
        counts = self.executor.exchange_counts(kept, demand, extra=flags)
        valid = list(self.policy.strategies(where))
        check_agreement([r[0] for r in counts.extra], [r[1] for r in counts.extra], error, valid)
        return counts

    # Dispatch runs eagerly under torch.compile: it plans on the exchanged counts (host
    # ints that differ every step), so traced frames would specialise on them and
    # recompile each step; its kernels are not dynamo-traceable graphs anyway.
    @torch.compiler.disable
    def run(self, call: CountedCall) -> Tensor:
        """Dispatch -> experts -> combine of ``call.x`` [T, d] by its topk_ids / gates
        [T, k]: y [T, d] in x's dtype."""
        x, topk_ids, gates = call.x, call.topk_ids, call.gates
        counts, experts = call.counts, call.experts
        call.record(None, counts.max_tokens)
        if not self.distributed:
            self.policy.observe(x.shape[0], counts)

        def measure(kernels: list[str]) -> list[float]:
            rows, cfg = self.probe_rows(topk_ids, counts), self.expert_cfg
            return time_expert_kernels(x, rows, experts.w1, experts.b1, experts.down_proj,
                                       glu=cfg.glu, activation=cfg.activation,
                                       kernels=kernels)  # fmt: skip

        choice = self.policy.choose_counted(counts, call.strategy, call.where, measure)
        strategy, probe = choice.strategy, choice.probe
        dispatcher = self.executor.dispatcher(strategy)
        if choice.replayed:  # activation checkpointing's recomputation: not counted
            return dispatcher.forward(x, topk_ids, gates, counts, strategy, experts).to(x.dtype)
        started = call.stats.start(x.device)
        if probe is not None:
            self.policy.probe_started(probe, x)
        y = dispatcher.forward(x, topk_ids, gates, counts, strategy, experts)
        if probe is not None:
            self.policy.probe_finished(probe, x, y)
        call.stats.stop(strategy, started, x.device)
        self.policy.ran_counted(counts, strategy)
        call.record(strategy, counts.max_tokens)
        return y.to(x.dtype)

    def run_gated_inputs(self, call: CountedCall) -> Tensor:
        """``y[t] = sum_j expert_{ids[t, j]}(gates[t, j] * x[t])`` (Tutel is_postscore=False):
        each slot becomes a row of its own, scaled before dispatch, combined with weight
        1. The per-expert counts are those of the slots, so ``call.counts`` is unchanged."""
        x, gates, (t, k) = call.x, call.gates, call.topk_ids.shape
        rows = (x.unsqueeze(1) * gates.unsqueeze(-1).to(x.dtype)).reshape(t * k, -1)  # [T*k, d]
        ids = call.topk_ids.reshape(t * k, 1)  # [T*k, 1]
        unit = (ids >= 0).float()  # dropped slots stay 0
        y = self.run(dataclasses.replace(call, x=rows, topk_ids=ids, gates=unit))  # [T*k, d]
        return y.view(t, k, -1).float().sum(1).to(x.dtype)  # [T, d]

    def probe_rows(self, topk_ids: Tensor, counts: Counts) -> ExpertRows:
        """This rank's tokens grouped over its local experts: the problem its expert
        kernel runs (alone: exactly; in a group: a stand-in of the same size, the local
        slots folded onto the local experts)."""
        k, ids = topk_ids.shape[1], topk_ids.flatten()
        if self.mesh is None or self.mesh.world == 1:
            return group_by_expert(ids, self.expert_cfg.num_experts, k, counts.kept[0])
        e_l = self.layout.experts_per_rank
        return group_by_expert(torch.where(ids >= 0, ids % e_l, -1), e_l, k)

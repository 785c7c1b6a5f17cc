"""``DeviceGroupedPath``: the one-process training forward with no device-to-host sync.

    choose   the strategy for the previous forward's workload (``StrategyPolicy``), or
             None for the counted path: taken only when its kernel reads device offsets;
             with compiled experts, their kernel in place of the measured default
    run      the counts on the device -> the losses -> ``StaticDispatcher.forward`` on
             the routed tokens (differentiable; ``grouped_mm`` on dropless routing: the
             layer's ``CompiledExperts``, losses included, where it has one), timed into the given
             statistics; the workload's host copy started for the next forward's choice

The path holds the static dispatcher and the policy it was given, nothing of the layer:
the routing, the experts and the statistics come with each call, the shared expert
stays with ``MoELayer.forward``, and the layer records what the returned ``Ran`` says.
"""

from __future__ import annotations

import torch

from adaptive_moe.core.strategy import Strategy
from adaptive_moe.runtime.experts.kernels import _triton_usable
from adaptive_moe.runtime.experts.stacked import Experts
from adaptive_moe.runtime.inference.compiled import CompiledExperts
from adaptive_moe.runtime.inference.config import COMPLETE_ROWS_KERNELS, DEVICE_OFFSET_KERNELS
from adaptive_moe.runtime.inference.ran import Ran
from adaptive_moe.runtime.inference.rows import balance_loss_static
from adaptive_moe.runtime.inference.static import StaticDispatcher
from adaptive_moe.runtime.policy.policy import StrategyPolicy, Where
from adaptive_moe.runtime.policy.replay import in_backward
from adaptive_moe.runtime.policy.stats import StrategyStats
from adaptive_moe.runtime.routing.router import Routing, z_loss


class DeviceGroupedPath:
    """See the module docstring.

    Args:
        static: the layer's static dispatcher (the same kernels and grouping).
        policy: the layer's strategy policy (lagged choice and replay).
        num_experts: E, for the kept counts.
        enabled: False across ranks (the all-to-all splits need host counts) and with
            gated inputs (per-slot scaled rows run on the counted path only).
        compiled: the ``grouped_mm`` experts as one compiled graph, or None (eager).
    """

    def __init__(
        self,
        static: StaticDispatcher,
        policy: StrategyPolicy,
        num_experts: int,
        enabled: bool,
        compiled: CompiledExperts | None = None,
    ) -> None:
        self.static, self.policy = static, policy
        self.num_experts, self.enabled, self.compiled = num_experts, enabled, compiled

    # Host-side decision (reads the lagged workload, the table, the kernel cache).
    @torch.compiler.disable
    def choose(self, tokens: int, forced: Strategy | None, where: Where) -> Strategy | None:
        """The strategy of this forward on the device-grouped rows, or None: counted."""
        if not self.enabled:
            return None

        def on_device(kernel: str) -> bool:
            return self._compiles(kernel, where) or groups_on_device(kernel, where)

        prefer = "grouped_mm" if self._compiles("grouped_mm", where) else None
        return self.policy.choose_device_grouped(tokens, forced, where, on_device, prefer)

    @torch.compiler.disable
    def run(
        self,
        x: torch.Tensor,
        routing: Routing,
        strategy: Strategy,
        experts: Experts,
        stats: StrategyStats,
        where: Where,
    ) -> Ran:
        """Count exchange (one process: on the device) -> losses -> group -> experts ->
        combine on the device for x [T, d] and its routing; the losses equal the
        counted path's. ``where``: the compute (device, dtype)."""
        recomputing = in_backward()
        started = None if recomputing else stats.start(x.device)
        if routing.dropless and self._compiles(strategy.kernel, where):
            y, aux, z = self.compiled(x, routing, experts, where[1])  # the losses in the graph
        else:
            y, aux, z = self._eager(x, routing, strategy, experts)
        max_tokens = 0
        if not recomputing:
            kept = routing.kept_counts(self.num_experts)  # [E]
            max_tokens = self.policy.observe_device(x.shape[0], kept)
            stats.stop(strategy, started, x.device)
        return Ran(y.to(x.dtype), routing, strategy, max_tokens, (aux, z), recomputing)

    def _eager(
        self, x: torch.Tensor, routing: Routing, strategy: Strategy, experts: Experts
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y [T, d], aux, z) by ``StaticDispatcher.forward`` and the eager losses."""
        counts = self.static.exchange_counts(routing.counts, routing.counts, num_tokens=x.shape[0])
        y = self.static.forward(
            x, routing.topk_ids, routing.gates, counts, strategy, experts,
            complete=routing.dropless,
        )  # fmt: skip
        return y, balance_loss_static(routing.scores, counts.demand), z_loss(routing.logits)

    def _compiles(self, kernel: str, where: Where) -> bool:
        return self.compiled is not None and self.compiled.takes(kernel, where[1])


def groups_on_device(kernel: str, where: Where) -> bool:
    """Whether ``kernel`` runs on device-grouped rows on ``where``: the Triton kernels
    where Triton runs (the interpreter included), grouped_mm on CUDA. (grouped_mm needs
    every slot routed; a forward that drops slots copies its counts after all.)"""
    device, dtype = where
    if kernel in DEVICE_OFFSET_KERNELS:
        return _triton_usable(device, dtype)
    return kernel in COMPLETE_ROWS_KERNELS and device.type == "cuda"

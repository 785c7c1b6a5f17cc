"""``StaticPath``: the layer's forward when no autograd graph is recorded.

    key      the CUDA graph this call may replay (``InferenceConfig.cuda_graph_tokens``),
             or None: run eagerly
    eager    route -> (several ranks: exchange the counts) -> choose (``StrategyPolicy``)
             -> ``StaticDispatcher`` -> shared expert, with no device-to-host sync
    graphs   the captured forwards (``GraphCache``), dropped when the weights move

The path holds the static dispatcher, the policy, the inference config and its graphs,
nothing of the layer: the router, the experts, the shared expert and the weights' data
pointers come with each call (one ``StaticCall``), and the layer records what the
returned ``Ran`` says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from adaptive_moe.core.strategy import Strategy
from adaptive_moe.runtime.experts.stacked import Experts
from adaptive_moe.runtime.inference.config import InferenceConfig
from adaptive_moe.runtime.inference.graphs import GraphCache
from adaptive_moe.runtime.inference.ran import Ran
from adaptive_moe.runtime.inference.rows import balance_loss_static
from adaptive_moe.runtime.inference.static import StaticDispatcher
from adaptive_moe.runtime.policy.policy import StrategyPolicy, Where
from adaptive_moe.runtime.routing.router import Router, Routing, z_loss


@dataclasses.dataclass(frozen=True)
class StaticCall:
    """One static forward: the tokens, the per-call arguments and what the layer lends
    the path for it.

    Attributes:
        x: the tokens [T, d] (float).
        top_k: this call's k, or None: the router's.
        capacity_factor: this call's capacity factor, or None: the router's.
        strategy: the forced strategy, or None: the policy chooses.
        where: (device, dtype) of the expert compute.
        router: the layer's router (run inside the path: a CUDA graph captures it).
        experts: the layer's expert weights.
        shared: ``shared(x, y)``, y [T, d] plus the shared expert's output on x [T, d].
        weights: every weight's data pointer (a change drops the captured graphs).
        training: the layer's training mode (router noise, random routing: no graphs).
    """

    x: Tensor
    top_k: int | None
    capacity_factor: float | None
    strategy: Strategy | None
    where: Where
    router: Router
    experts: Experts
    shared: Callable[[Tensor, Tensor], Tensor]
    weights: Callable[[], tuple[int, ...]]
    training: bool


def static_losses(routing: Routing, num_experts: int) -> tuple[Tensor, Tensor]:
    """(aux_loss, z_loss) of a one-process static forward's routing."""
    demand = routing.demand_counts(num_experts)  # [E]
    return balance_loss_static(routing.scores, demand), z_loss(routing.logits)


class StaticPath:
    """See the module docstring.

    Args:
        static: the layer's static dispatcher.
        policy: the layer's strategy policy (``choose_static``; its table keys graphs).
        config: the layer's ``InferenceConfig`` (the CUDA-graph limit).
        num_experts: E, for the losses under torch.compile.
        distributed: several ranks (counts exchanged, losses computed, no graphs).
    """

    def __init__(
        self,
        static: StaticDispatcher,
        policy: StrategyPolicy,
        config: InferenceConfig,
        num_experts: int,
        distributed: bool,
    ) -> None:
        self.static, self.policy, self.config = static, policy, config
        self.num_experts, self.distributed = num_experts, distributed
        self.graphs = GraphCache()

    # Eager under torch.compile, like the training dispatch: the static forward keeps its
    # own CUDA graphs and launch-config caches (host state dynamo cannot rebuild across a
    # graph break: it failed on the strategy cache's frozenset), and its kernels are not
    # traceable graphs anyway.
    @torch.compiler.disable
    def run(self, call: StaticCall) -> Ran:
        """The inference forward of ``call.x`` [T, d], replayed from a CUDA graph where
        the path keeps them, else run eagerly."""
        key = self.graph_key(call)
        if key is None:
            return self.run_eager(call)

        def forward(xs: Tensor) -> tuple[Tensor, Ran]:
            ran = self.run_eager(dataclasses.replace(call, x=xs))
            return ran.y, ran

        y, ran = self.graphs.run(key, call.x, forward, call.weights())
        return dataclasses.replace(ran, y=y)  # the captured call's state, this call's y

    def graph_key(self, call: StaticCall) -> tuple | None:
        """The ``GraphCache`` key of this call, or None where no graph may be used: off,
        T above the limit, not CUDA, several ranks, training mode (router noise and
        random routing), inside a capture or a compile, autocast, hooks on the router."""
        x, limit = call.x, self.config.cuda_graph_tokens
        t = x.shape[0]
        if not limit or not 0 < t <= limit or x.device.type != "cuda":
            return None
        if self.distributed or call.training or torch.compiler.is_compiling():
            return None
        if torch.cuda.is_current_stream_capturing() or torch.is_autocast_enabled("cuda"):
            return None
        if call.router._forward_hooks or call.router._forward_pre_hooks:
            return None
        return (t, x.dtype, x.device, x.stride(), call.top_k, call.capacity_factor,
                call.strategy, id(self.policy.table),
                torch.is_inference_mode_enabled())  # fmt: skip

    def run_eager(self, call: StaticCall) -> Ran:
        """Route -> static dispatch -> experts -> combine with no host sync; losses as
        the training forward's, on the device.

        On one process the losses are left to the layer to compute when first read: a
        decode loop that never reads them does not pay their ~15 ops per forward. Under
        torch.compile they are computed here (no attribute deletion traced)."""
        x, experts, alone = call.x, call.experts, not self.distributed
        routing = call.router(x, call.top_k, call.capacity_factor, count=not alone)
        tokens = x.shape[0]
        if alone:
            max_tokens = tokens  # the static bound: a token picks an expert at most once
            compiling = torch.compiler.is_compiling()
            losses = static_losses(routing, self.num_experts) if compiling else None
        else:
            counts = self.static.exchange_counts(routing.counts, routing.counts, num_tokens=tokens)
            max_tokens = counts.max_tokens
            losses = (balance_loss_static(routing.scores, counts.demand), z_loss(routing.logits))
        strategy = self.policy.choose_static(max_tokens, routing.top_k, call.strategy, call.where)
        if alone:
            y = self.static.forward_local(
                x, routing.topk_ids, routing.gates, strategy.kernel, experts,
                complete=routing.dropless,
            )  # fmt: skip
        else:
            y = self.static.forward(x, routing.topk_ids, routing.gates, counts, strategy, experts)
        return Ran(call.shared(x, y.to(x.dtype)), routing, strategy, max_tokens, losses)

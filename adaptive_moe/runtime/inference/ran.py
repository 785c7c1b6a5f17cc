"""``Ran``: what the static or the device-grouped path ran, for the layer to record
(its ``last_*`` attributes and losses)."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from adaptive_moe.core.strategy import Strategy
from adaptive_moe.runtime.routing.router import Routing


@dataclasses.dataclass(frozen=True)
class Ran:
    """What a forward on the static or the device-grouped path ran.

    Attributes:
        y: the path's output [T, d], in x's dtype (the static path's includes the shared
            expert: its CUDA graphs capture it).
        routing: the router's decision (its tensors: graph buffers after a replay).
        strategy: the strategy that ran.
        max_tokens: the busiest expert's slots (one process, static: the bound T;
            device-grouped: the previous workload's, 0 before any).
        losses: (aux_loss, z_loss), or None: deferred, computed from ``routing`` when
            first read (``static_path.static_losses``).
        recomputed: activation checkpointing's recomputation (strategy and max_tokens
            are not recorded).
    """

    y: Tensor
    routing: Routing
    strategy: Strategy
    max_tokens: int
    losses: tuple[Tensor, Tensor] | None
    recomputed: bool = False

"""Typed, validated configuration of an MoE layer.

Every field is checked at construction; a bad value raises ``ValueError`` naming the
field, the value and what would be valid. It imports only ``core.checks`` (no torch):
it sits at the bottom of the import graph, so the calculator can load it cheaply.

Notation used across the package:
    T  tokens on this rank            d  d_model
    h  d_ff (hidden size per expert)  E  number of routed experts
    k  top-k                          W  ranks in the expert group
    s  shard count: W // E when E < W, else 1 (ranks sharing one expert)
    E_l experts stored on this rank   h_l hidden units stored per local expert (h // s)
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal

from adaptive_moe.core.checks import choice, int_between, positive_int

Activation = Literal["silu", "gelu", "relu"]
ScoreFunc = Literal["softmax", "sigmoid"]

ACTIVATIONS: tuple[str, ...] = typing.get_args(Activation)
SCORE_FUNCS: tuple[str, ...] = typing.get_args(ScoreFunc)


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How tokens choose experts.

    Attributes:
        num_experts: E, routed experts.
        top_k: default k; a forward may override it (dynamic top-any).
        score_func: ``"softmax"`` over all experts, or ``"sigmoid"`` per expert
            (DeepSeek-V3).
        renormalize: rescale the k selected gate weights to sum to 1.
        capacity_factor: ``> 0`` fixed factor (per-expert capacity on each rank
            ``ceil(f * k * T / E)``), ``0`` dropless, ``< 0`` dropless but capped at the
            capacity of ``|f|``. Overflow slots are dropped (they contribute 0).
        batch_prioritized: drop overflow by gate score (lowest first) instead of by
            token order.
        random_second_expert: GShard random routing: keep the 2nd choice with
            probability ``min(1, 2 * gate_2)`` during training.
        num_groups, topk_groups: group-limited routing (DeepSeek-V3): experts are split
            into ``num_groups`` groups, only the best ``topk_groups`` groups are eligible.
            ``num_groups=1`` disables it.
        routed_scaling_factor: multiplies the final gate weights (DeepSeek-V3).
        score_correction_bias: a per-expert bias added to the scores for *selection only*
            (aux-loss-free balancing); the gate weights use the raw scores.
    """

    num_experts: int
    top_k: int = 2
    score_func: ScoreFunc = "softmax"
    renormalize: bool = True
    capacity_factor: float = 0.0
    batch_prioritized: bool = False
    random_second_expert: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    score_correction_bias: bool = False

    def __post_init__(self) -> None:
        positive_int("num_experts", self.num_experts)
        check_top_k(self.top_k, self.num_experts)
        choice("score_func", self.score_func, SCORE_FUNCS)
        if not math.isfinite(self.capacity_factor):
            raise ValueError(f"capacity_factor must be finite, got {self.capacity_factor!r}")
        positive_int("num_groups", self.num_groups)
        positive_int("topk_groups", self.topk_groups)
        if self.num_experts % self.num_groups:
            raise ValueError(
                f"num_groups={self.num_groups} must divide num_experts={self.num_experts}"
            )
        if self.topk_groups > self.num_groups:
            raise ValueError(
                f"topk_groups={self.topk_groups} must be <= num_groups={self.num_groups}"
            )
        if not (math.isfinite(self.routed_scaling_factor) and self.routed_scaling_factor > 0):
            raise ValueError(
                f"routed_scaling_factor must be a positive number, "
                f"got {self.routed_scaling_factor!r}"
            )
        if self.random_second_expert and self.top_k < 2:
            raise ValueError(f"random_second_expert needs top_k >= 2, got top_k={self.top_k}")


def check_top_k(top_k: object, num_experts: int) -> None:
    """Raise ValueError unless ``1 <= top_k <= num_experts``."""
    int_between("top_k", top_k, 1, num_experts, "num_experts")


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    """Shape of the routed experts (all E share it).

    ``glu=True``: ``gate_up_proj [E, 2h, d]`` (gate rows first) and ``down_proj [E, d, h]``;
    ``glu=False``: ``up_proj [E, h, d]`` and ``down_proj [E, d, h]``.
    """

    d_model: int
    d_ff: int
    num_experts: int
    glu: bool = True
    activation: Activation = "silu"
    bias: bool = False

    def __post_init__(self) -> None:
        positive_int("d_model", self.d_model)
        positive_int("d_ff", self.d_ff)
        positive_int("num_experts", self.num_experts)
        choice("activation", self.activation, ACTIVATIONS)


@dataclasses.dataclass(frozen=True)
class SharedExpertConfig:
    """Always-on experts (DeepSeek-MoE, Qwen2-MoE): one dense MLP of hidden size
    ``d_ff * num_shared`` run on every token, optionally scaled by a sigmoid gate
    (``gated=True``, Qwen2-MoE's ``shared_expert_gate``)."""

    d_ff: int
    gated: bool = False

    def __post_init__(self) -> None:
        positive_int("shared d_ff", self.d_ff)

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
from collections.abc import Callable
from typing import Any, Literal

from adaptive_moe.core.checks import choice, int_between, positive_int

Activation = Literal["silu", "gelu", "relu"]
ScoreFunc = Literal["softmax", "sigmoid"]

GateNoise = Literal["none", "jitter", "rsample", "gaussian"]
RouterKind = Literal["linear", "cosine"]
GatePosition = Literal["output", "input"]
Top1Gate = Literal["probability", "one"]
RouterMatmul = Literal["float32", "bfloat16", "bfloat16x2", "auto"]
# torch.compile backends: inductor (generated kernels), aot_eager (the same graphs and
# autograd split run eagerly: for tests and debugging).
CompileBackend = Literal["inductor", "aot_eager"]

ACTIVATIONS: tuple[str, ...] = typing.get_args(Activation)
SCORE_FUNCS: tuple[str, ...] = typing.get_args(ScoreFunc)
GATE_NOISES: tuple[str, ...] = typing.get_args(GateNoise)
ROUTER_KINDS: tuple[str, ...] = typing.get_args(RouterKind)
GATE_POSITIONS: tuple[str, ...] = typing.get_args(GatePosition)
TOP1_GATES: tuple[str, ...] = typing.get_args(Top1Gate)
ROUTER_MATMULS: tuple[str, ...] = typing.get_args(RouterMatmul)
COMPILE_BACKENDS: tuple[str, ...] = typing.get_args(CompileBackend)
# Default noise_scale per gate_noise: DeepSpeed's jitter epsilon, and unit Gumbel /
# Gaussian noise (Tutel divides its gate_noise by E itself).
DEFAULT_NOISE_SCALE = (("jitter", 1e-2), ("rsample", 1.0), ("gaussian", 1.0))


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
        top1_gate: the gate of a k = 1 forward with ``renormalize=True``:
            ``"probability"`` (default; Switch / GShard) keeps the raw score p so that
            the router gets a gradient from the task loss; ``"one"`` is what
            renormalising one weight gives, p / p = 1 (transformers' ``norm_topk_prob``
            at k = 1), and the router then learns from the auxiliary losses only.
        gate_noise: training-only noise, off in eval: ``"jitter"`` (DeepSpeed
            ``noisy_gate_policy="Jitter"``) multiplies the router's input by
            U(1 - eps, 1 + eps); ``"rsample"`` (DeepSpeed ``"RSample"``) selects the k
            experts by the scores of ``logits + eps * Gumbel`` (Gumbel-top-k: sampling
            without replacement in proportion to softmax(logits)) while the gates keep
            the clean scores; ``"gaussian"`` (Tutel ``gate_noise=eps``) adds
            ``eps * N(0, 1) / E`` to the logits that both selection and gates use.
        noise_scale: eps above; None: 1e-2 for jitter, 1.0 otherwise.
        router_type: ``"linear"`` (logits = x W^T) or ``"cosine"`` (Tutel
            ``cosine_top``): logits = s * cos(P x, e_j), tokens projected to
            ``cosine_dim`` against learned expert embeddings e_j, with a learned scale
            s = exp(min(log_scale, log 100)) initialised to 1 / ``cosine_temperature``.
        gate_position: ``"output"`` (default) y = sum_j g_j * expert_j(x) (Tutel
            ``is_postscore=True``); ``"input"`` y = sum_j expert_j(g_j * x) (Tutel
            ``is_postscore=False``: the gate scales the expert's input; each slot then
            dispatches its own scaled copy of the token).
        matmul_dtype: how the router's matmuls run (the weights stay fp32 and get fp32
            gradients; scores, top-k and losses are fp32 either way;
            ``runtime/routing/router_matmul.py``). ``"float32"`` (default): exact fp32 logits, on
            the GPU's fp32 units (about 0.3-0.5 ms per step on the fine-grained shapes of
            benchmarks/RESULTS.md). ``"bfloat16"``: tokens and weights rounded to bf16,
            multiplied on tensor cores with fp32 accumulation and output (Megatron-Core's
            and transformers' choice where the router runs in the model dtype); near-ties
            between experts may then pick differently than in fp32. ``"bfloat16x2"``:
            the weight split into two bf16 parts (represented to 2^-18 of each element)
            in one tensor-core GEMM: with bf16 tokens the logits are fp32-grade.
            ``"auto"``: ``"bfloat16x2"`` for bf16 CUDA tokens, else ``"float32"``.
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
    top1_gate: Top1Gate = "probability"
    gate_noise: GateNoise = "none"
    noise_scale: float | None = None
    router_type: RouterKind = "linear"
    cosine_dim: int = 256
    cosine_temperature: float = 0.5
    gate_position: GatePosition = "output"
    matmul_dtype: RouterMatmul = "float32"

    def __post_init__(self) -> None:
        positive_int("num_experts", self.num_experts)
        choice("top1_gate", self.top1_gate, TOP1_GATES)
        choice("gate_noise", self.gate_noise, GATE_NOISES)
        choice("router_type", self.router_type, ROUTER_KINDS)
        choice("gate_position", self.gate_position, GATE_POSITIONS)
        choice("matmul_dtype", self.matmul_dtype, ROUTER_MATMULS)
        positive_int("cosine_dim", self.cosine_dim)
        for name in ("noise_scale", "cosine_temperature"):
            value = getattr(self, name)
            if value is None and name == "noise_scale":
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value > 0)
            ):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        check_top_k(self.top_k, self.num_experts)
        choice("score_func", self.score_func, SCORE_FUNCS)
        check_capacity_factor(self.capacity_factor)
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
        scaling = self.routed_scaling_factor
        ok = isinstance(scaling, int | float) and not isinstance(scaling, bool)
        if not (ok and math.isfinite(scaling) and scaling > 0):
            raise ValueError(
                f"routed_scaling_factor must be a positive number, "
                f"got {self.routed_scaling_factor!r}"
            )
        if self.gate_noise == "jitter" and self.noise_scale is not None and self.noise_scale >= 1:
            raise ValueError(
                f"noise_scale must be < 1 for gate_noise='jitter' (the factor "
                f"U(1 - eps, 1 + eps) must stay positive), got {self.noise_scale!r}"
            )
        if self.random_second_expert and self.top_k < 2:
            raise ValueError(f"random_second_expert needs top_k >= 2, got top_k={self.top_k}")

    @property
    def noise_eps(self) -> float:
        """The noise scale in effect (``noise_scale`` or the gate_noise's default)."""
        if self.noise_scale is not None:
            return float(self.noise_scale)
        return dict(DEFAULT_NOISE_SCALE).get(self.gate_noise, 0.0)


# An expert receives at most T slots (a token picks an expert once), so every |f| >= E / k
# already keeps every slot; a factor beyond this bound is a unit mistake, and its capacity
# ceil(|f| * k * T / E) would leave int64 for large batches.
MAX_CAPACITY_FACTOR = 1e6


def check_capacity_factor(value: object, name: str = "capacity_factor") -> None:
    """Raise ValueError unless ``value`` is a real number with ``|f| <= 1e6``.

    ``> 0`` fixed factor, ``0`` dropless, ``< 0`` dropless capped at the capacity of ``|f|``.
    """
    modes = "> 0 fixed, 0 dropless, < 0 capped dropless"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"{name} must be a number ({modes}), got {value!r} of type {type(value).__name__}"
        )
    if not math.isfinite(value) or abs(value) > MAX_CAPACITY_FACTOR:
        raise ValueError(
            f"{name} must be finite with |f| <= {MAX_CAPACITY_FACTOR:g} ({modes}), got "
            f"{value!r}: every |f| >= num_experts / top_k already keeps every slot, a "
            f"larger one is a unit mistake"
        )


def check_activation(activation: object) -> None:
    """Raise ValueError unless ``activation`` is a known name or a callable that leaves
    its input alone (``activation_probe.probe_activation``)."""
    if isinstance(activation, str) or not callable(activation):
        valid = ", ".join(map(repr, ACTIVATIONS))
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {valid} or an elementwise callable, got {activation!r}"
            )
        return
    # Imported here: this module stays torch-free for the calculator, and a callable
    # activation means torch is loaded already.
    from adaptive_moe.core.activation_probe import probe_activation

    probe_activation(activation)


def check_top_k(top_k: object, num_experts: int) -> None:
    """Raise ValueError unless ``1 <= top_k <= num_experts``."""
    int_between("top_k", top_k, 1, num_experts, "num_experts")


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    """Shape of the routed experts (all E share it).

    ``glu=True``: ``gate_up_proj [E, 2h, d]`` (gate rows first) and ``down_proj [E, d, h]``;
    ``glu=False``: ``up_proj [E, h, d]`` and ``down_proj [E, d, h]``.

    ``activation``: ``"silu"``, ``"gelu"``, ``"relu"`` (fused Triton kernels where Triton
    runs), or any parameter-free *elementwise* callable ``Tensor -> Tensor`` (e.g.
    ``torch.tanh``, ``lambda t: t * torch.sigmoid(1.702 * t)``), run in torch on every
    path: the fused activation is replaced by the callable plus, for GLU, one multiply,
    and autograd keeps ``act(gate)`` [M, h] and whatever the callable saves besides the
    pre-activation (the fused kernel keeps the pre-activation only).
    """

    d_model: int
    d_ff: int
    num_experts: int
    glu: bool = True
    activation: Activation | Callable[[Any], Any] = "silu"
    bias: bool = False

    def __post_init__(self) -> None:
        positive_int("d_model", self.d_model)
        positive_int("d_ff", self.d_ff)
        positive_int("num_experts", self.num_experts)
        check_activation(self.activation)


@dataclasses.dataclass(frozen=True)
class SharedExpertConfig:
    """Always-on experts (DeepSeek-MoE, Qwen2-MoE): one dense MLP of hidden size
    ``d_ff * num_shared`` run on every token, optionally scaled by a sigmoid gate
    (``gated=True``, Qwen2-MoE's ``shared_expert_gate``)."""

    d_ff: int
    gated: bool = False

    def __post_init__(self) -> None:
        positive_int("shared d_ff", self.d_ff)

"""Memory per GPU for training and inference under a parallel layout.

Layout: ``world = dp * tp * pp``; the expert group is ``ep`` ranks inside a DP group (this
project's fixed layout: E >= ep whole experts per rank, else each expert split over
ep/E ranks), so every expert shard has ``edp = dp / ep`` replicas. TP splits every matrix
(experts included) ``tp`` ways; norms and the router are replicated. PP cuts the L blocks
into ``pp`` contiguous stages (the first ``L % pp`` stages take one more); stage 0 holds
the embeddings, the last stage the final norm and the LM head (and, when tied and pp > 1,
its own copy of the embeddings). Every figure is for the stage that needs the most.

Training, per GPU (P_d, P_e: non-expert and expert parameters of the stage on this GPU
after TP/EP; ZeRO divides by dp for P_d and by edp for P_e, at the stated stage):

    weights            P * w                 w = 2 (bf16, bf16-mixed) or 4 (fp32)      ZeRO-3
    gradients          P * g                 g = w unless grad_dtype says otherwise     ZeRO-2
    optimizer_states   P * (master + n*o)    master = 4 for bf16-mixed; n = 2 AdamW,     ZeRO-1
                                             1 SGD-momentum, 0 SGD; o = state bytes
                       (w, g, o: any bytes per value with ``*_value_bytes``: 1.5 for a
                       6-bit format, 1 for 8-bit Adam states)
    activations        saved for backward, in-flight micro-batches (pp - stage under
                       1F1B) x T tokens x the bytes per token of each block below
    working            the largest transient of the backward, the larger of
                         the loss: 8*V/tp per token (fp32 gradients of the log-probs and
                           of the logits; the log-probs themselves are activations)
                         one block: T*(2*a*d + max(attention, FFN/MoE bytes per token))
                           (the gradients of its input and output and of its wider half)
                           + its communication (+ its activations again when
                           checkpointed: the block is recomputed first)
    communication      MoE: ``layer_memory`` transient (gathered expert weights and grads
                       for the strategy r, all-to-all buffers) of the largest block;
                       ZeRO-3 adds one block's parameters and gradients gathered (in
                       ``working``); with ``zero3_live_params`` (DeepSpeed's
                       ``stage3_max_live_parameters``) the gathered parameters are that
                       many, clamped to [one block, the whole stage]: DeepSpeed releases
                       them only above the limit
    misc               a fixed allowance (``misc_bytes``: CUDA context, NCCL buffers, the
                       allocator's fragmentation), added to the peak
    optimizer_step     AdamW (foreach): one state-sized temporary over the local optimizer
                       shard (the sqrt of the second moment); SGD: 0

    backward           the most bytes alive at once above the resident ones, the larger of
                         at the loss: every activation + the loss's working memory
                         block i back-propagating: the activations of blocks <= i (the
                           LM head's are freed by then, other micro-batches' are not)
                           + block i's working memory
                           (+ the gradients allocated so far, when they are not kept)

    peak = weights + optimizer_states + gradients (kept)
           + max(backward, optimizer_step (+ gradients, when not kept)) + misc

Gradients are persistent buffers by default (``keep_grads``: DDP's buckets, FSDP's and
Megatron's gradient buffers). With ``keep_grads=False`` (a plain loop calling
``zero_grad(set_to_none=True)``, torch's default) they appear during the backward: when
block i back-propagates, those of the blocks after it, its own, the LM head's and a tied
embedding's exist. The optimizer states are those of a steady-state step (they exist from
the first step on).
Activation bytes per token per block (a = 2 bf16, 4 fp32; TP divides the inner tensors,
the d-wide ones are replicated unless ``sequence_parallel`` -- Megatron's sequence
parallelism, DeepSpeed's "partition activations" -- splits them over TP too: the norms'
tensors, a checkpointed block's input, the d-wide gradients of ``working`` and the final
norm's; an MoE layer's buffers stay as ``layer_memory`` gives them):

    norms         2*a*d per norm                 (its input, as a fused RMSNorm saves it,
                                                  and the normed output its consumer saves)
    attention     a*(H*hd + 2*H_kv*hd)/tp + 2*a*H*hd_v/tp + 4*H/tp
                  (q, k, v after RoPE; SDPA output and the o-projection's contiguous
                  input; the fp32 log-sum-exp of a flash kernel — no S x S matrix)
                  ``attention="math"`` (unfused SDPA, or torch's fallback to it such as
                  fp32 with ``enable_gqa``): 4*(H*S + 2*H*hd + H*hd_v)/tp + a*H*hd_v/tp
                  (fp32 probabilities S wide per head, scaled q, k and v widened to every
                  query head, all upcast to fp32 as torch's math kernel does; the
                  o-projection's input)
                  MLA: + the latent tensors (q and kv latents and their norms), the
                  up-projected kv, and full-width q and k
    dense FFN     a*m'*f/tp                      (m' = 4 GLU: gate, up, act, product; else 2)
    MoE           ``layer_memory`` activations / T (router, k routed rows, by kernel)
                  of the layer's E_i, + shared experts a*m'*n_s,i*h_s/tp (per-layer
                  counts: ``ModelSpec.layer_experts``; ``expert_r`` must suit every E_i)
    checkpointed  a*d per block (its input) + one block recomputed (in ``working``)
    LM head       2*a*d + 4*V/tp                 (final norm, fp32 log-probs)

Inference, per GPU: weights; KV cache = batch*(S + S_out)*L_stage * 2*ceil(H_kv/tp)*hd *
kv bytes, for the prompt's S and the ``output_tokens`` S_out generated tokens, K and V
(MLA: the compressed latent, (r_kv + rope) per token per layer, replicated over TP);
working = one block's activations for the batch*S prefill tokens + batch*V fp32 logits;
+ misc.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from adaptive_moe.calc.flops import CHECKPOINTING, Checkpointing
from adaptive_moe.calc.layer_memory import LayerMemory, layer_memory
from adaptive_moe.calc.model import ModelSpec
from adaptive_moe.calc.params import (
    LayerParams,
    embedding_params,
    head_params,
    layer_params,
    norm_params,
)
from adaptive_moe.core.checks import choice, non_negative_int, positive_int
from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.core.strategy import Kernel, Strategy

Precision = Literal["bf16-mixed", "bf16", "fp32"]
AttentionKernel = Literal["fused", "math"]
Optimizer = Literal["adamw", "sgd-momentum", "sgd"]
Dtype = Literal["fp32", "bf16", "fp8"]

PRECISIONS: tuple[str, ...] = ("bf16-mixed", "bf16", "fp32")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd-momentum", "sgd")
ATTENTION_KERNELS: tuple[str, ...] = ("fused", "math")
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp8": 1}
OPTIMIZER_STATES: dict[str, int] = {"adamw": 2, "sgd-momentum": 1, "sgd": 0}
GIB = 1 << 30


def _value_bytes(name: str, value: object) -> None:
    """A free-form bytes-per-value override: None or a positive finite number."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive number of bytes (e.g. 2, 1.5), got {value!r}")


@dataclasses.dataclass(frozen=True)
class Parallel:
    """How the model is laid out on ``dp * tp * pp`` GPUs (see the module docstring).

    ``expert_r`` and ``expert_kernel`` are this project's strategy for the experts: r = 0
    gathers every expert (DP), 1 is EP, up to the shard count ep/E is EP+MP; the kernel
    decides which row buffers the experts keep (``layer_memory``), "scatter" by default
    as on GPUs. ``sequence_parallel``: the d-wide activations are split over TP too.
    ``zero3_live_params``: ZeRO-3 keeps up to this many parameters gathered (DeepSpeed's
    ``stage3_max_live_parameters``; default: one block at a time, as FSDP). ``for_gpus``
    derives dp from a GPU count.
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    zero_stage: int = 0
    expert_r: int = 1
    expert_kernel: Kernel = "scatter"
    sequence_parallel: bool = False
    zero3_live_params: int | None = None

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "ep"):
            positive_int(name, getattr(self, name))
        if not isinstance(self.sequence_parallel, bool):
            raise ValueError(
                f"sequence_parallel must be True or False, got {self.sequence_parallel!r}"
            )
        if self.zero3_live_params is not None:
            positive_int("zero3_live_params", self.zero3_live_params)
            if self.zero_stage != 3:
                raise ValueError(
                    f"zero3_live_params needs zero_stage=3, got zero_stage={self.zero_stage!r}"
                )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        Strategy(r=self.expert_r, kernel=self.expert_kernel)  # ValueError naming a bad one
        if self.dp % self.ep:
            raise ValueError(f"ep={self.ep} must divide dp={self.dp} (experts split a DP group)")

    @classmethod
    def for_gpus(cls, num_gpus: int, *, tp: int = 1, pp: int = 1, **fields: object) -> Parallel:
        """The layout of ``num_gpus`` GPUs: dp = num_gpus / (tp * pp)."""
        positive_int("num_gpus", num_gpus)
        positive_int("tp", tp)
        positive_int("pp", pp)
        if num_gpus % (tp * pp):
            raise ValueError(
                f"num_gpus={num_gpus} must be a multiple of tp*pp={tp * pp} (dp = num_gpus / "
                f"(tp*pp))"
            )
        return cls(dp=num_gpus // (tp * pp), tp=tp, pp=pp, **fields)  # type: ignore[arg-type]

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def replicated_split(self) -> int:
        """How many ways the d-wide activations are split: tp under sequence parallelism."""
        return self.tp if self.sequence_parallel else 1

    @property
    def strategy(self) -> Strategy:
        """The expert strategy (its a2a algorithm and degree do not change memory)."""
        return Strategy(r=self.expert_r, kernel=self.expert_kernel)

    @property
    def edp(self) -> int:
        """Replicas of each expert shard (the data-parallel group of expert weights)."""
        return self.dp // self.ep

    def check(self, spec: ModelSpec) -> None:
        """Raise ``ValueError`` unless ``spec`` can be laid out this way."""
        if self.pp > spec.layers:
            raise ValueError(f"pp={self.pp} must be <= layers={spec.layers}")
        if spec.heads % self.tp:
            raise ValueError(f"tp={self.tp} must divide heads={spec.heads}")
        widths = {"ffn": spec.ffn, "moe_ffn": spec.moe_ffn if spec.num_experts else self.tp}
        for name, width in widths.items():
            if width % self.tp:
                raise ValueError(f"tp={self.tp} must divide {name}={width}")
        for experts in spec.expert_counts:  # each layer's E_i (one E unless per-layer)
            layout = ShardLayout(
                world=self.ep, rank=0, num_experts=experts, d_ff=spec.moe_ffn // self.tp
            )
            if self.expert_r not in layout.valid_r():
                raise ValueError(
                    f"expert_r={self.expert_r} is not valid for ep={self.ep}, "
                    f"E={experts}; valid: {layout.valid_r()}"
                )
        if not spec.num_experts and self.ep > 1:
            raise ValueError(f"ep={self.ep} needs an MoE model (num_experts > 0)")

    def stage_layers(self, layers: int) -> list[range]:
        """The blocks of each pipeline stage."""
        base, extra = divmod(layers, self.pp)
        bounds = [0]
        for stage in range(self.pp):
            bounds.append(bounds[-1] + base + (stage < extra))
        return [range(bounds[i], bounds[i + 1]) for i in range(self.pp)]


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """One training step: micro-batch, precision, optimizer, recomputation.

    ``optimizer_states`` defaults to fp32, or bf16 when ``precision="bf16"`` (what torch's
    optimizers keep for bf16 parameters); ``grad_dtype`` defaults to the parameter dtype.
    ``capacity_factor``: routed rows on the busiest expert rank relative to balance.
    ``keep_grads``: gradient buffers live through the whole step (DDP, FSDP); False for
    ``zero_grad(set_to_none=True)`` in a plain loop. ``attention``: "fused" (flash or
    memory-efficient SDPA, no S x S matrix) or "math" (the S x S probabilities are kept).
    ``weight_value_bytes``, ``grad_value_bytes``, ``state_value_bytes``: any bytes per
    value instead of the dtype's (the master copy stays fp32 under bf16-mixed; activations
    follow ``precision``). ``misc_bytes``: a fixed allowance added to the peak.
    """

    micro_batch: int = 1
    seq_len: int = 4096
    precision: Precision = "bf16-mixed"
    optimizer: Optimizer = "adamw"
    optimizer_states: Dtype | None = None
    grad_dtype: Dtype | None = None
    checkpointing: Checkpointing = "none"
    capacity_factor: float = 1.0
    keep_grads: bool = True
    attention: AttentionKernel = "fused"
    weight_value_bytes: float | None = None
    grad_value_bytes: float | None = None
    state_value_bytes: float | None = None
    misc_bytes: int = 0

    def __post_init__(self) -> None:
        positive_int("micro_batch", self.micro_batch)
        _value_bytes("weight_value_bytes", self.weight_value_bytes)
        _value_bytes("grad_value_bytes", self.grad_value_bytes)
        _value_bytes("state_value_bytes", self.state_value_bytes)
        for free, dtype in (
            ("grad_value_bytes", "grad_dtype"),
            ("state_value_bytes", "optimizer_states"),
        ):
            if getattr(self, free) is not None and getattr(self, dtype) is not None:
                raise ValueError(f"give {free} or {dtype}, not both")
        non_negative_int("misc_bytes", self.misc_bytes)
        positive_int("seq_len", self.seq_len)
        choice("precision", self.precision, PRECISIONS)
        choice("optimizer", self.optimizer, OPTIMIZERS)
        choice("checkpointing", self.checkpointing, CHECKPOINTING)
        choice("attention", self.attention, ATTENTION_KERNELS)
        if not isinstance(self.keep_grads, bool):
            raise ValueError(f"keep_grads must be True or False, got {self.keep_grads!r}")
        for name in ("optimizer_states", "grad_dtype"):
            if getattr(self, name) is not None:
                choice(name, getattr(self, name), tuple(DTYPE_BYTES))
        if not self.capacity_factor >= 1.0:
            raise ValueError(f"capacity_factor must be >= 1, got {self.capacity_factor!r}")

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def weight_bytes(self) -> float:
        if self.weight_value_bytes is not None:
            return self.weight_value_bytes
        return 4 if self.precision == "fp32" else 2

    @property
    def activation_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def grad_bytes(self) -> float:
        if self.grad_value_bytes is not None:
            return self.grad_value_bytes
        return DTYPE_BYTES[self.grad_dtype] if self.grad_dtype else self.weight_bytes

    @property
    def state_bytes(self) -> float:
        if self.state_value_bytes is not None:
            return self.state_value_bytes
        if self.optimizer_states:
            return DTYPE_BYTES[self.optimizer_states]
        return 2 if self.precision == "bf16" else 4

    @property
    def optimizer_bytes(self) -> float:
        """Optimizer bytes per parameter: fp32 master copy + states."""
        master = 4 if self.precision == "bf16-mixed" else 0
        return master + OPTIMIZER_STATES[self.optimizer] * self.state_bytes


@dataclasses.dataclass(frozen=True)
class InferSetup:
    """Serving: ``batch`` sequences of a ``seq_len``-token prompt and ``output_tokens``
    generated tokens, all held in the KV cache (a prefill of the prompt is the working
    peak). ``weight_value_bytes``/``kv_value_bytes``: any bytes per value instead of the
    dtype's; ``misc_bytes``: a fixed allowance added to the peak."""

    batch: int = 1
    seq_len: int = 4096
    weight_dtype: Dtype = "bf16"
    kv_dtype: Dtype = "bf16"
    output_tokens: int = 0
    weight_value_bytes: float | None = None
    kv_value_bytes: float | None = None
    misc_bytes: int = 0

    def __post_init__(self) -> None:
        positive_int("batch", self.batch)
        positive_int("seq_len", self.seq_len)
        choice("weight_dtype", self.weight_dtype, tuple(DTYPE_BYTES))
        choice("kv_dtype", self.kv_dtype, tuple(DTYPE_BYTES))
        non_negative_int("output_tokens", self.output_tokens)
        _value_bytes("weight_value_bytes", self.weight_value_bytes)
        _value_bytes("kv_value_bytes", self.kv_value_bytes)
        non_negative_int("misc_bytes", self.misc_bytes)

    @property
    def weight_bytes(self) -> float:
        if self.weight_value_bytes is not None:
            return self.weight_value_bytes
        return DTYPE_BYTES[self.weight_dtype]

    @property
    def kv_bytes(self) -> float:
        if self.kv_value_bytes is not None:
            return self.kv_value_bytes
        return DTYPE_BYTES[self.kv_dtype]

    @property
    def cached_tokens(self) -> int:
        """Tokens each sequence holds in the KV cache at the end: prompt + generated."""
        return self.seq_len + self.output_tokens


@dataclasses.dataclass(frozen=True)
class TrainingMemory:
    """Bytes on the GPU of pipeline stage ``stage`` (the one that needs the most)."""

    stage: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    working: int
    communication: int
    optimizer_step: int
    backward: int
    keep_grads: bool = True
    misc: int = 0

    @property
    def peak(self) -> int:
        resident = self.weights + self.optimizer_states + self.misc
        if self.keep_grads:
            return resident + self.gradients + max(self.backward, self.optimizer_step)
        return resident + max(self.backward, self.gradients + self.optimizer_step)

    def fits(self, gib: float) -> bool:
        return self.peak <= gib * GIB

    def to_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "peak": self.peak}


@dataclasses.dataclass(frozen=True)
class InferenceMemory:
    """Bytes on the GPU of pipeline stage ``stage`` (the one that needs the most)."""

    stage: int
    weights: int
    kv_cache: int
    working: int
    misc: int = 0

    @property
    def peak(self) -> int:
        return self.weights + self.kv_cache + self.working + self.misc

    def fits(self, gib: float) -> bool:
        return self.peak <= gib * GIB

    def to_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "peak": self.peak}


@dataclasses.dataclass(frozen=True)
class _StageParams:
    """Parameters on one GPU of a stage, before ZeRO: replicated-over-EP and expert."""

    dense: float
    experts: float

    @property
    def total(self) -> float:
        return self.dense + self.experts


def _tp_split(p: LayerParams, tp: int) -> float:
    """Non-expert parameters of a block on one TP rank (norms and router replicated)."""
    replicated = p.norms + p.router
    return replicated + (p.non_expert - replicated) / tp


def _stage_params(spec: ModelSpec, par: Parallel, stage: int) -> _StageParams:
    blocks = [layer_params(spec, i) for i in par.stage_layers(spec.layers)[stage]]
    dense = sum(_tp_split(p, par.tp) for p in blocks)
    last = stage == par.pp - 1
    if stage == 0:
        dense += embedding_params(spec) / par.tp
    if last:
        # Tied and pipelined: the last stage keeps its own copy of the token embeddings.
        head = head_params(spec) or (spec.vocab * spec.hidden if par.pp > 1 else 0)
        dense += head / par.tp + norm_params(spec, spec.hidden)
    experts = sum(p.experts for p in blocks) / (par.ep * par.tp)
    return _StageParams(dense=dense, experts=experts)


def _block_param_count(spec: ModelSpec, par: Parallel, layer: int) -> float:
    lp = layer_params(spec, layer)
    return _tp_split(lp, par.tp) + lp.experts / (par.ep * par.tp)


def _later_param_fraction(spec: ModelSpec, par: Parallel, stage: int) -> list[float]:
    """For each block of ``stage``: the fraction of the stage's parameters whose gradients
    exist once it has back-propagated (its own, later blocks', the head's; not an untied
    embedding's, computed last)."""
    layers = par.stage_layers(spec.layers)[stage]
    counts = [_block_param_count(spec, par, i) for i in layers]
    total = _stage_params(spec, par, stage).total
    untied_embedding = embedding_params(spec) / par.tp if stage == 0 and head_params(spec) else 0
    return [1.0 - (sum(counts[:i]) + untied_embedding) / total for i in range(len(counts))]


def _sharded(params: _StageParams, par: Parallel, sharded: bool) -> float:
    if not sharded:
        return params.total
    return params.dense / par.dp + params.experts / par.edp


def _moe_layer(
    spec: ModelSpec, par: Parallel, layer: int, tokens: int, act: int, cf: float
) -> LayerMemory:
    return layer_memory(
        d_model=spec.hidden,
        d_ff=spec.moe_ffn // par.tp,
        num_experts=spec.layer_experts(layer),
        top_k=spec.top_k,
        glu=spec.glu,
        dtype_bytes=act,
        tokens=tokens,
        world=par.ep,
        strategy=par.strategy,
        capacity_factor=cf,
    )


def _attention_act(
    spec: ModelSpec, a: int, tp: int, kernel: AttentionKernel = "fused", seq_len: int = 0
) -> float:
    """Bytes per token saved by one attention block (without its input norm)."""
    if kernel == "fused":
        saved = a * (spec.q_width + 2 * spec.v_width) / tp + 4 * spec.heads / tp
    else:
        probs_qkv = spec.heads * seq_len + 2 * spec.q_width + spec.v_width
        saved = (4 * probs_qkv + a * spec.v_width) / tp
    mla = spec.mla
    if mla is None:
        kv = a * 2 * spec.kv_heads * spec.head_dim / tp
        return saved + (kv if kernel == "fused" else 0.0)
    latents = mla.kv_lora_rank + mla.qk_rope_head_dim + mla.kv_lora_rank
    if mla.q_lora_rank is not None:
        latents += 2 * mla.q_lora_rank
    kv_up = spec.heads * (mla.qk_nope_head_dim + mla.v_head_dim) / tp
    return saved + a * (latents + kv_up + spec.q_width / tp)


def _ffn_act(spec: ModelSpec, width: int, a: int, tp: int) -> float:
    return a * (4 if spec.glu else 2) * width / tp


@dataclasses.dataclass(frozen=True)
class _Block:
    """Bytes of one block for T tokens: saved for backward, gradient buffers while it
    back-propagates, and the MoE communication transient."""

    saved: float
    working: float
    comm: float


def _block(
    spec: ModelSpec,
    par: Parallel,
    layer: int,
    tokens: int,
    a: int,
    cf: float,
    attention: tuple[AttentionKernel, int] = ("fused", 0),
) -> _Block:
    """``attention``: the SDPA kernel and the sequence length its probabilities span."""
    split = par.replicated_split  # tp under sequence parallelism, else 1
    norms = 2 * spec.norms_per_layer * a * spec.hidden / split
    attn = _attention_act(spec, a, par.tp, *attention)
    comm = 0.0
    if spec.is_moe(layer):
        moe = _moe_layer(spec, par, layer, tokens, a, cf)
        shared = 0.0
        if spec.layer_shared_experts(layer):
            shared = _ffn_act(spec, spec.layer_shared_width(layer), a, par.tp)
            shared += a * spec.shared_expert_gate
        mlp = shared + moe.activations / tokens
        comm = float(moe.transient)
    else:
        mlp = _ffn_act(spec, spec.ffn, a, par.tp)
    return _Block(
        saved=tokens * (norms + attn + mlp),
        working=tokens * (2 * a * spec.hidden / split + max(attn, mlp)),
        comm=comm,
    )


def _head_act(spec: ModelSpec, a: float, par: Parallel) -> float:
    return 2 * a * spec.hidden / par.replicated_split + 4 * spec.vocab / par.tp


def _loss_working(spec: ModelSpec, tp: int) -> float:
    return 8 * spec.vocab / tp


def _stage_training(
    spec: ModelSpec, par: Parallel, setup: TrainSetup, stage: int
) -> TrainingMemory:
    p = _stage_params(spec, par, stage)
    z, a, tokens = par.zero_stage, setup.activation_bytes, setup.tokens
    weights = _sharded(p, par, z >= 3) * setup.weight_bytes
    grads = _sharded(p, par, z >= 2) * setup.grad_bytes
    optim_params = _sharded(p, par, z >= 1)
    layers = par.stage_layers(spec.layers)[stage]
    attention = (setup.attention, setup.seq_len)
    blocks = [_block(spec, par, i, tokens, a, setup.capacity_factor, attention) for i in layers]
    ckpt = setup.checkpointing == "full"
    saved = [tokens * a * spec.hidden / par.replicated_split if ckpt else b.saved for b in blocks]
    activations = (par.pp - stage) * sum(saved)
    in_flight = activations - sum(saved)  # the other micro-batches' (1F1B)
    # A checkpointed block is recomputed (its activations again) before its backward.
    working = [b.working + b.comm + (b.saved if ckpt else 0.0) for b in blocks]
    if z >= 3:  # one block's parameters gathered from their ZeRO shards (and its grads)
        block = max(_block_param_count(spec, par, i) for i in layers)
        live = block
        if par.zero3_live_params is not None:  # DeepSpeed keeps up to the limit gathered
            live = min(max(par.zero3_live_params, block), p.total)
        gathered = live * setup.weight_bytes + block * setup.grad_bytes
        working = [w + gathered for w in working]
    working_max = max(working)
    backward = 0.0
    if stage == par.pp - 1:
        activations += tokens * _head_act(spec, a, par)
        loss = tokens * _loss_working(spec, par.tp)
        working_max = max(working_max, loss)
        backward = activations + loss
    # Gradients allocated by the time block i back-propagates (when they are not kept).
    later = _later_param_fraction(spec, par, stage)
    for i, (w, late) in enumerate(zip(working, later)):
        alive = in_flight + sum(saved[: i + 1]) + w
        backward = max(backward, alive + (0.0 if setup.keep_grads else grads * late))
    step_temp = setup.optimizer == "adamw"
    return TrainingMemory(
        stage=stage,
        weights=round(weights),
        gradients=round(grads),
        optimizer_states=round(optim_params * setup.optimizer_bytes),
        activations=round(activations),
        working=round(working_max),
        communication=round(max(b.comm for b in blocks)),
        optimizer_step=round(optim_params * setup.state_bytes) if step_temp else 0,
        backward=round(backward),
        keep_grads=setup.keep_grads,
        misc=setup.misc_bytes,
    )


def training_memory(spec: ModelSpec, par: Parallel, setup: TrainSetup) -> TrainingMemory:
    """Memory per GPU of one training step (the stage that needs the most)."""
    par.check(spec)
    stages = [_stage_training(spec, par, setup, s) for s in range(par.pp)]
    return max(stages, key=lambda m: m.peak)


def kv_cache_bytes_per_token(spec: ModelSpec, tp: int, kv_bytes: float) -> float:
    """KV-cache bytes per token per layer on one TP rank: K and V (the 2), each
    ceil(H_kv / tp) heads of hd (a KV head is replicated when tp > H_kv)."""
    if spec.mla is not None:
        return (spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim) * kv_bytes
    return 2 * math.ceil(spec.kv_heads / tp) * spec.head_dim * kv_bytes


def _stage_inference(
    spec: ModelSpec, par: Parallel, setup: InferSetup, stage: int
) -> InferenceMemory:
    p = _stage_params(spec, par, stage)
    layers = par.stage_layers(spec.layers)[stage]
    tokens = setup.batch * setup.seq_len
    a = DTYPE_BYTES[setup.weight_dtype] if setup.weight_dtype != "fp8" else 2
    kv = kv_cache_bytes_per_token(spec, par.tp, setup.kv_bytes)
    blocks = [_block(spec, par, i, tokens, a, 1.0) for i in layers]
    working = max(b.saved + b.comm for b in blocks)
    if stage == par.pp - 1:
        working += setup.batch * spec.vocab * 4 / par.tp
    return InferenceMemory(
        stage=stage,
        weights=round(p.total * setup.weight_bytes),
        kv_cache=round(setup.batch * setup.cached_tokens * len(layers) * kv),
        working=round(working),
        misc=setup.misc_bytes,
    )


def inference_memory(spec: ModelSpec, par: Parallel, setup: InferSetup) -> InferenceMemory:
    """Memory per GPU when serving (the stage that needs the most); ``par.dp`` and
    ``par.zero_stage`` play no part."""
    par.check(spec)
    stages = [_stage_inference(spec, par, setup, s) for s in range(par.pp)]
    return max(stages, key=lambda m: m.peak)

"""Matmul FLOPs per token (forward, training, inference) and run-time estimates.

One multiply-add is 2 FLOPs; only matrix products are counted (norms, softmax, RoPE,
activations and the loss are elementwise and left out, as in every published MFU).
Forward, per token, with S the sequence (context) length (notation in ``calc.model``):

    qkv            2*d*(H*hd + 2*H_kv*hd)           MLA: every down/up projection
    attn_scores    2*S*H*hd_qk                      q . k against all S keys
    attn_values    2*S*H*hd_v                       probabilities @ v
    out_proj       2*H*hd_v*d
    dense_ffn      2*m*d*f                          per dense layer (m = 3 GLU, 2 plain)
    experts        2*k*m*d*h                        per MoE layer
    shared         2*m*d*n_s,i*h_s (+ 2*d gate)     per MoE layer i with shared experts
    router         2*d*E_i                          per MoE layer i
    lm_head        2*d*V

Attention is counted over the **full S x S square**, causal or not: that is what a masked
``scaled_dot_product_attention`` (and ``torch.utils.flop_counter``) computes; a
causal-skipping kernel does about half of ``attn_scores + attn_values``.

Inference (``inference_flops``), P prompt tokens then G generated ones, per sequence, with
W the weight matmuls of one token (all but the attention products and the LM head) and
A = 2*L*(H*hd_qk + H*hd_v) the attention products per token per key:

    prefill    P*W + P*P*A + 2*d*V      the prompt at once (full P x P square); logits
                                        of its last position only (the first new token)
    decode     sum over i = 1 .. G-1 of  W + (P + i)*A + 2*d*V
                                        one token against the P + i cached keys; the
                                        G-th token is sampled from the last logits and
                                        never fed back

which is what transformers' ``generate`` computes (checked with ``FlopCounterMode``).

Training = forward + backward = 3 x forward (the backward computes two products per
forward product: input and weight gradients). With full activation checkpointing every
block's forward runs once more (the LM head is not recomputed); torch's non-reentrant
checkpoint may skip a block's last matmul when nothing saves its output ("early stop"),
which this count ignores.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from adaptive_moe.calc.model import ModelSpec
from adaptive_moe.core.checks import positive_int

Checkpointing = Literal["none", "full"]
CHECKPOINTING: tuple[str, ...] = ("none", "full")

# bf16 dense matmul rate (FLOP/s) measured on this project's machines: an 8192^3 bf16
# torch.matmul, median of repeats. Used when the device is known and no rate is given.
MEASURED_BF16_FLOPS: dict[str, float] = {
    "H100": 798e12,
    "H200": 788e12,
}


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """Forward matmul FLOPs of one token (summed over all layers), by component."""

    qkv: float
    attn_scores: float
    attn_values: float
    out_proj: float
    dense_ffn: float
    experts: float
    shared_experts: float
    router: float
    lm_head: float

    @property
    def total(self) -> float:
        return sum(dataclasses.astuple(self))

    @property
    def blocks(self) -> float:
        """Everything but the LM head: what activation checkpointing recomputes."""
        return self.total - self.lm_head

    def to_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "total": self.total}


def _qkv_macs(spec: ModelSpec) -> int:
    d, heads, mla = spec.hidden, spec.heads, spec.mla
    if mla is None:
        return d * (heads + 2 * spec.kv_heads) * spec.head_dim
    if mla.q_lora_rank is None:
        q = d * heads * mla.qk_head_dim
    else:
        q = d * mla.q_lora_rank + mla.q_lora_rank * heads * mla.qk_head_dim
    kv = d * (mla.kv_lora_rank + mla.qk_rope_head_dim)
    kv += mla.kv_lora_rank * heads * (mla.qk_nope_head_dim + mla.v_head_dim)
    return q + kv


def forward_flops(spec: ModelSpec, seq_len: int) -> FlopCount:
    """Forward FLOPs per token at sequence (context) length ``seq_len``."""
    positive_int("seq_len", seq_len)
    d, L, m = spec.hidden, spec.layers, spec.ffn_matrices
    n_moe = spec.moe_layers
    layers = range(L)
    shared = sum(
        m * d * spec.layer_shared_width(i) + d * spec.shared_expert_gate
        for i in layers
        if spec.layer_shared_experts(i)
    )
    return FlopCount(
        qkv=2.0 * L * _qkv_macs(spec),
        attn_scores=2.0 * L * seq_len * spec.q_width,
        attn_values=2.0 * L * seq_len * spec.v_width,
        out_proj=2.0 * L * spec.v_width * d,
        dense_ffn=2.0 * spec.dense_layers * m * d * spec.ffn,
        experts=2.0 * n_moe * spec.top_k * m * d * spec.moe_ffn,
        shared_experts=2.0 * shared,
        router=2.0 * d * sum(map(spec.layer_experts, layers)),
        lm_head=2.0 * d * spec.vocab,
    )


def training_flops_per_token(
    spec: ModelSpec, seq_len: int, checkpointing: Checkpointing = "none"
) -> float:
    """Forward + backward FLOPs per token: 3 x forward, + the blocks' forward again when
    activations are checkpointed."""
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {checkpointing!r}")
    fwd = forward_flops(spec, seq_len)
    return 3.0 * fwd.total + (fwd.blocks if checkpointing == "full" else 0.0)


@dataclasses.dataclass(frozen=True)
class InferenceFlops:
    """Forward FLOPs of generating ``output_tokens`` tokens after ``prompt_tokens`` for
    ``batch`` sequences (formulas in the module docstring)."""

    prefill: float
    decode: float
    batch: int
    prompt_tokens: int
    output_tokens: int

    @property
    def total(self) -> float:
        return self.prefill + self.decode

    @property
    def per_output_token(self) -> float:
        """Average FLOPs per generated token over the decode steps (0 without any)."""
        steps = self.batch * (self.output_tokens - 1)
        return self.decode / steps if steps > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            **dataclasses.asdict(self),
            "total": self.total,
            "per_output_token": self.per_output_token,
        }


def inference_flops(
    spec: ModelSpec, prompt_tokens: int, output_tokens: int, batch: int = 1
) -> InferenceFlops:
    """Forward FLOPs of a prefill of ``prompt_tokens`` and ``output_tokens`` generated
    tokens with a KV cache, for ``batch`` sequences."""
    for name, value, low in (
        ("prompt_tokens", prompt_tokens, 1),
        ("output_tokens", output_tokens, 0),
        ("batch", batch, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    one = forward_flops(spec, 1)
    head = one.lm_head
    per_key = one.attn_scores + one.attn_values  # A: one token against one key
    weights = one.total - per_key - head  # W
    p, steps = prompt_tokens, max(output_tokens - 1, 0)
    prefill = p * weights + p * p * per_key + head
    # sum_{i=1}^{steps} (p + i) = steps*p + steps*(steps+1)/2
    keys = steps * p + steps * (steps + 1) / 2
    decode = steps * (weights + head) + keys * per_key
    return InferenceFlops(
        prefill=batch * prefill,
        decode=batch * decode,
        batch=batch,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
    )


@dataclasses.dataclass(frozen=True)
class RunEstimate:
    """Time of a run of ``flops`` on ``gpus`` devices of ``device_flops`` FLOP/s at
    model-FLOPs utilisation ``mfu``: ``flops / (gpus * device_flops * mfu)`` seconds."""

    flops: float
    gpus: int
    device_flops: float
    mfu: float

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ValueError(f"gpus must be a positive integer, got {self.gpus!r}")
        if not self.device_flops > 0:
            raise ValueError(f"device_flops must be > 0, got {self.device_flops!r}")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu must be in (0, 1], got {self.mfu!r}")

    @property
    def seconds(self) -> float:
        return self.flops / (self.gpus * self.device_flops * self.mfu)


def mfu(flops_per_token: float, tokens_per_second: float, gpus: int, device_flops: float) -> float:
    """Model-FLOPs utilisation of a measured throughput (tokens/s over all ``gpus``)."""
    if not tokens_per_second > 0:
        raise ValueError(f"tokens_per_second must be > 0, got {tokens_per_second!r}")
    return flops_per_token * tokens_per_second / (gpus * device_flops)


def measured_device_flops(device_name: str) -> float | None:
    """The measured bf16 rate of a device whose name contains a known key, else None."""
    for key, rate in MEASURED_BF16_FLOPS.items():
        if key in device_name:
            return rate
    return None

"""Parameter counts, by component, total and active per token (notation in ``calc.model``).

Per layer:
    attention   q: d*H*hd, k and v: d*H_kv*hd each, o: H*hd*d
                (+ H*hd + 2*H_kv*hd with qkv_bias, + d with out_bias, + q/k norms)
                MLA: [d*r_q + norm(r_q) + r_q*H*(nope+rope)] or d*H*(nope+rope),
                     d*(r_kv+rope) + norm(r_kv) + r_kv*H*(nope+v_hd), H*v_hd*d
    dense FFN   m*d*f, m = 3 with GLU else 2 (+ biases with mlp_bias)
    experts     E_i * m*d*h (+ E_i*((m-1)*h + d) with expert_bias)
    shared      m*d*(n_s,i*h_s) (+ d with the Qwen2-MoE shared-expert gate)
    router      E_i*d (+ E_i with router_bias)
    (E_i, n_s,i: layer i's routed and shared experts, ``ModelSpec.layer_experts``.)
    norms       norms_per_layer * d (doubled for LayerNorm's bias)
Model: embeddings V*d (+ n_pos*d for a learned position table), final norm d, LM head
V*d unless tied.

"Active per token" counts every parameter a token's forward touches as in the published
figures: everything except the E - k routed experts it skips in each MoE layer (the whole
embedding matrix is counted, as everyone does).
"""

from __future__ import annotations

import dataclasses

from adaptive_moe.calc.model import ModelSpec


@dataclasses.dataclass(frozen=True)
class LayerParams:
    """Parameters of one transformer block, split by how they are parallelised."""

    attention: int
    dense_ffn: int
    experts: int
    shared_experts: int
    router: int
    norms: int

    @property
    def non_expert(self) -> int:
        """Parameters replicated over the expert-parallel group (sharded only by TP)."""
        return self.attention + self.dense_ffn + self.shared_experts + self.router + self.norms

    @property
    def total(self) -> int:
        return self.non_expert + self.experts


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Parameters of a whole model by component; ``buffers`` are not parameters."""

    embedding: int
    attention: int
    dense_ffn: int
    experts: int
    shared_experts: int
    router: int
    norms: int
    lm_head: int
    buffers: int
    active_experts: int

    @property
    def total(self) -> int:
        return (
            self.embedding
            + self.attention
            + self.dense_ffn
            + self.experts
            + self.shared_experts
            + self.router
            + self.norms
            + self.lm_head
        )

    @property
    def active(self) -> int:
        return self.total - self.experts + self.active_experts

    def to_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total, "active": self.active}


def norm_params(spec: ModelSpec, width: int) -> int:
    """Parameters of one norm over ``width`` features."""
    return width * (2 if spec.norm == "layernorm" else 1)


def attention_params(spec: ModelSpec) -> int:
    """Parameters of one attention block (projections, biases, q/k norms)."""
    d, hd = spec.hidden, spec.head_dim
    if spec.mla is not None:
        return _mla_params(spec)
    q, kv = spec.heads * hd, spec.kv_heads * hd
    total = d * (q + 2 * kv) + q * d
    total += (q + 2 * kv) * spec.qkv_bias + d * spec.out_bias
    if spec.qk_norm == "per_head":
        total += 2 * norm_params(spec, hd)
    elif spec.qk_norm == "full":
        total += norm_params(spec, q) + norm_params(spec, kv)
    return total


def _mla_params(spec: ModelSpec) -> int:
    mla, d, heads = spec.mla, spec.hidden, spec.heads
    bias = spec.qkv_bias
    if mla.q_lora_rank is None:
        q = d * heads * mla.qk_head_dim
    else:
        r = mla.q_lora_rank
        q = d * r + r * bias + norm_params(spec, r) + r * heads * mla.qk_head_dim
    latent = mla.kv_lora_rank + mla.qk_rope_head_dim
    kv = d * latent + latent * bias + norm_params(spec, mla.kv_lora_rank)
    kv += mla.kv_lora_rank * heads * (mla.qk_nope_head_dim + mla.v_head_dim)
    out = heads * mla.v_head_dim * d + d * spec.out_bias
    return q + kv + out


def ffn_params(spec: ModelSpec, width: int, bias: bool) -> int:
    """Parameters of one FFN of hidden size ``width`` (GLU or not)."""
    weights = spec.ffn_matrices * spec.hidden * width
    biases = (spec.ffn_matrices - 1) * width + spec.hidden
    return weights + biases * bias


def expert_params(spec: ModelSpec) -> int:
    """Parameters of one routed expert."""
    return ffn_params(spec, spec.moe_ffn, spec.expert_bias)


def layer_params(spec: ModelSpec, layer: int) -> LayerParams:
    """Parameters of block ``layer`` (0-based)."""
    moe, experts = spec.is_moe(layer), spec.layer_experts(layer)
    shared = 0
    if spec.layer_shared_experts(layer):
        shared = ffn_params(spec, spec.layer_shared_width(layer), spec.mlp_bias)
        shared += spec.hidden * spec.shared_expert_gate
    return LayerParams(
        attention=attention_params(spec),
        dense_ffn=0 if moe else ffn_params(spec, spec.ffn, spec.mlp_bias),
        experts=experts * expert_params(spec),
        shared_experts=shared,
        router=experts * (spec.hidden + spec.router_bias),
        norms=spec.norms_per_layer * norm_params(spec, spec.hidden),
    )


def embedding_params(spec: ModelSpec) -> int:
    """Token embeddings V*d plus a learned position table (GPT-2) if any."""
    return (spec.vocab + spec.position_embeddings) * spec.hidden


def head_params(spec: ModelSpec) -> int:
    """The LM head (0 when tied to the embeddings)."""
    return 0 if spec.tied_embeddings else spec.vocab * spec.hidden


def count_params(spec: ModelSpec) -> ParamCount:
    """All parameters of ``spec`` by component (MTP modules excluded)."""
    layers = [layer_params(spec, i) for i in range(spec.layers)]
    return ParamCount(
        embedding=embedding_params(spec),
        attention=sum(p.attention for p in layers),
        dense_ffn=sum(p.dense_ffn for p in layers),
        experts=sum(p.experts for p in layers),
        shared_experts=sum(p.shared_experts for p in layers),
        router=sum(p.router for p in layers),
        norms=sum(p.norms for p in layers) + norm_params(spec, spec.hidden),
        lm_head=head_params(spec),
        buffers=sum(map(spec.layer_experts, range(spec.layers))) * spec.score_correction_bias,
        active_experts=spec.top_k * spec.moe_layers * expert_params(spec),
    )

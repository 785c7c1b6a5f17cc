"""The typed description of a decoder-only (MoE) transformer that every calculator reads.

Notation (per layer, per token):
    d   hidden size (``hidden``)           L   layers
    H   query heads                        H_kv key/value heads (GQA/MQA: H_kv < H)
    hd  head size                          V   vocabulary
    f   dense FFN hidden size (``ffn``)    h   routed-expert hidden size (``moe_ffn``)
    E   routed experts                     k   routed experts per token (``top_k``)
    h_s hidden size of one shared expert   n_s shared experts (always on)

Layer ``i`` (0-based) is an MoE layer when ``E > 0``, ``i >= first_dense_layers``,
``(i + 1) % expert_interval == 0`` and ``i`` is not in ``dense_layer_ids`` (the union of
Qwen's ``decoder_sparse_step``/``mlp_only_layers`` and DeepSeek's ``first_k_dense_replace``);
every other layer has a dense FFN of size f.

Per-layer MoE (DeepSpeed-MoE's PR-MoE pyramid and Residual-MoE): ``experts_per_layer``
gives E_i for every layer (0: a dense FFN layer) and replaces the rule above; E is then
max E_i. ``shared_experts_per_layer`` gives n_s,i for every layer (only MoE layers may have
them; Residual-MoE is n_s,i = 1 with k = 1); n_s is then max n_s,i. Every formula written
with E or n_s for "an MoE layer" uses that layer's E_i and n_s,i.

Multi-token-prediction modules (DeepSeek-V3's ``num_nextn_predict_layers``) are recorded in
``mtp_layers`` but excluded from every count, as in the published totals (671B = main model).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from adaptive_moe.core.checks import choice, int_between, non_negative_int, positive_int

NormKind = Literal["rmsnorm", "layernorm"]
QKNorm = Literal["none", "per_head", "full"]

NORM_KINDS: tuple[str, ...] = ("rmsnorm", "layernorm")
QK_NORMS: tuple[str, ...] = ("none", "per_head", "full")


@dataclasses.dataclass(frozen=True)
class MLASpec:
    """DeepSeek multi-head latent attention (per layer).

    ``q_lora_rank=None``: queries come from one ``d -> H*(nope+rope)`` projection; otherwise
    from ``d -> q_lora_rank`` (normed) ``-> H*(nope+rope)``. Keys and values come from the
    compressed latent ``d -> kv_lora_rank + rope`` (the latent normed) ``-> H*(nope+v)``.
    """

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None

    def __post_init__(self) -> None:
        positive_int("kv_lora_rank", self.kv_lora_rank)
        positive_int("qk_nope_head_dim", self.qk_nope_head_dim)
        positive_int("qk_rope_head_dim", self.qk_rope_head_dim)
        positive_int("v_head_dim", self.v_head_dim)
        if self.q_lora_rank is not None:
            positive_int("q_lora_rank", self.q_lora_rank)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer, dense or MoE (see the module docstring for notation).

    Attributes:
        hidden, layers, heads, vocab: d, L, H, V.
        ffn: f, hidden size of the dense FFN layers.
        kv_heads: H_kv (default H); must divide H.
        head_dim: hd (default d / H, which H must then divide); ignored by MLA attention.
        position_embeddings: rows of a learned absolute position table (GPT-2's
            ``n_positions``); 0 for RoPE and other parameter-free positions.
        tied_embeddings: the LM head reuses the embedding matrix.
        glu: gated FFN (three linears: gate, up, down) instead of two (up, down).
        mlp_bias: biases on the dense and shared FFN linears (Llama ``mlp_bias``).
        qkv_bias, out_bias: biases on the q/k/v projections (Qwen2) and on the output
            projection.
        qk_norm: ``"per_head"`` (Qwen3: one norm of size hd each for q and k), ``"full"``
            (OLMoE: norms of size H*hd and H_kv*hd), ``"none"``.
        norm: ``"rmsnorm"`` (a weight) or ``"layernorm"`` (a weight and a bias).
        norms_per_layer: norms of size d in each block (2: before attention and FFN).
        mla: multi-head latent attention instead of q/k/v projections.
        num_experts, top_k: E and k; ``num_experts=0`` is a dense model (``top_k`` 0).
        moe_ffn: h (default f).
        expert_interval, first_dense_layers, dense_layer_ids: which layers are MoE.
        shared_experts, shared_ffn: n_s and h_s (default h); all shared experts form one
            always-on FFN of hidden size ``n_s * h_s``.
        shared_expert_gate: Qwen2-MoE's ``sigmoid(x @ w)`` scale of the shared output.
        router_bias: a bias on the router linear; expert_bias: biases on expert linears.
        score_correction_bias: DeepSeek-V3's per-expert selection bias. transformers keeps
            it as a *buffer*, so it is counted apart from the parameters.
        experts_per_layer: E_i for each of the L layers (0: dense), instead of
            ``expert_interval``/``first_dense_layers``/``dense_layer_ids``; ``num_experts``
            resolves to max E_i (giving another value is an error).
        shared_experts_per_layer: n_s,i for each layer (> 0 only on MoE layers);
            ``shared_experts`` resolves to max n_s,i.
        mtp_layers: multi-token-prediction modules, excluded from every count.
        name: a label for reports (not part of equality).
    """

    hidden: int
    layers: int
    heads: int
    vocab: int
    ffn: int
    kv_heads: int | None = None
    head_dim: int | None = None
    position_embeddings: int = 0
    tied_embeddings: bool = False
    glu: bool = True
    mlp_bias: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: QKNorm = "none"
    norm: NormKind = "rmsnorm"
    norms_per_layer: int = 2
    mla: MLASpec | None = None
    num_experts: int = 0
    top_k: int = 0
    moe_ffn: int | None = None
    expert_interval: int = 1
    first_dense_layers: int = 0
    dense_layer_ids: tuple[int, ...] = ()
    shared_experts: int = 0
    shared_ffn: int | None = None
    shared_expert_gate: bool = False
    router_bias: bool = False
    expert_bias: bool = False
    score_correction_bias: bool = False
    experts_per_layer: tuple[int, ...] | None = None
    shared_experts_per_layer: tuple[int, ...] | None = None
    mtp_layers: int = 0
    name: str = dataclasses.field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for field in ("hidden", "layers", "heads", "vocab", "ffn", "norms_per_layer"):
            positive_int(field, getattr(self, field))
        # Resolve the defaults once so that every reader sees plain integers.
        set_ = object.__setattr__
        set_(self, "kv_heads", self.heads if self.kv_heads is None else self.kv_heads)
        if self.head_dim is None:
            if self.hidden % self.heads and self.mla is None:
                raise ValueError(
                    f"heads={self.heads} does not divide hidden={self.hidden}: give head_dim "
                    f"explicitly (attention width heads*head_dim may then differ from hidden)"
                )
            # MLA ignores head_dim; any positive value keeps the field an integer.
            set_(self, "head_dim", max(1, self.hidden // self.heads))
        non_negative_int("position_embeddings", self.position_embeddings)
        set_(self, "moe_ffn", self.ffn if self.moe_ffn is None else self.moe_ffn)
        set_(self, "shared_ffn", self.moe_ffn if self.shared_ffn is None else self.shared_ffn)
        set_(self, "dense_layer_ids", tuple(sorted(set(self.dense_layer_ids))))
        self._resolve_per_layer()
        positive_int("kv_heads", self.kv_heads)
        positive_int("head_dim", self.head_dim)
        positive_int("moe_ffn", self.moe_ffn)
        positive_int("shared_ffn", self.shared_ffn)
        if self.heads % self.kv_heads:
            raise ValueError(
                f"kv_heads={self.kv_heads} must divide heads={self.heads} (GQA groups)"
            )
        choice("qk_norm", self.qk_norm, QK_NORMS)
        choice("norm", self.norm, NORM_KINDS)
        if self.mla is not None and self.qk_norm != "none":
            raise ValueError(f"qk_norm={self.qk_norm!r} is not defined for MLA attention")
        self._check_moe()

    def _per_layer(self, name: str) -> tuple[int, ...] | None:
        """The per-layer tuple ``name`` as a tuple of L non-negative ints (or None)."""
        value = getattr(self, name)
        if value is None:
            return None
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise ValueError(f"{name} must be a sequence of {self.layers} integers, got {value!r}")
        value = tuple(value)
        if len(value) != self.layers:
            raise ValueError(
                f"{name} must have one entry per layer ({self.layers}), got {len(value)}"
            )
        for i, n in enumerate(value):
            non_negative_int(f"{name}[{i}]", n)
        return value

    def _resolve_per_layer(self) -> None:
        set_ = object.__setattr__
        experts = self._per_layer("experts_per_layer")
        if experts is not None:
            rule = dict(
                expert_interval=(self.expert_interval, 1),
                first_dense_layers=(self.first_dense_layers, 0),
                dense_layer_ids=(self.dense_layer_ids, ()),
            )
            for name, (value, default) in rule.items():
                if value != default:
                    raise ValueError(
                        f"experts_per_layer decides which layers are MoE; leave {name} at "
                        f"{default!r}, got {value!r}"
                    )
            if self.num_experts not in (0, max(experts)):
                raise ValueError(
                    f"num_experts={self.num_experts!r} disagrees with experts_per_layer "
                    f"(max {max(experts)}); leave it 0 or give the maximum"
                )
            set_(self, "experts_per_layer", experts)
            set_(self, "num_experts", max(experts))
            fewest = min((n for n in experts if n), default=0)
            if fewest and isinstance(self.top_k, int) and self.top_k > fewest:
                raise ValueError(
                    f"top_k={self.top_k} exceeds the fewest experts of an MoE layer in "
                    f"experts_per_layer ({fewest}); valid: 1..{fewest}"
                )
        shared = self._per_layer("shared_experts_per_layer")
        if shared is not None:
            if self.shared_experts not in (0, max(shared)):
                raise ValueError(
                    f"shared_experts={self.shared_experts!r} disagrees with "
                    f"shared_experts_per_layer (max {max(shared)}); leave it 0 or give the maximum"
                )
            set_(self, "shared_experts_per_layer", shared)
            set_(self, "shared_experts", max(shared))

    def _check_moe(self) -> None:
        non_negative_int("num_experts", self.num_experts)
        non_negative_int("shared_experts", self.shared_experts)
        non_negative_int("mtp_layers", self.mtp_layers)
        positive_int("expert_interval", self.expert_interval)
        if self.num_experts == 0:
            if self.top_k != 0 or self.shared_experts != 0:
                raise ValueError(
                    f"a dense model (num_experts=0) needs top_k=0 and shared_experts=0, "
                    f"got top_k={self.top_k!r}, shared_experts={self.shared_experts!r}"
                )
        else:
            int_between("top_k", self.top_k, 1, self.num_experts, "num_experts")
        if not 0 <= self.first_dense_layers <= self.layers:
            raise ValueError(
                f"first_dense_layers must be in [0, layers={self.layers}], "
                f"got {self.first_dense_layers!r}"
            )
        bad = [i for i in self.dense_layer_ids if not 0 <= i < self.layers]
        if bad:
            raise ValueError(f"dense_layer_ids must be in [0, layers={self.layers}), got {bad}")
        if self.shared_experts_per_layer is not None:
            bad = [
                i for i, n in enumerate(self.shared_experts_per_layer) if n and not self.is_moe(i)
            ]
            if bad:
                raise ValueError(
                    f"shared_experts_per_layer gives shared experts to dense layers {bad}; "
                    f"only MoE layers may have them"
                )

    def is_moe(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) has routed experts."""
        if self.experts_per_layer is not None:
            return self.experts_per_layer[layer] > 0
        return (
            self.num_experts > 0
            and layer >= self.first_dense_layers
            and (layer + 1) % self.expert_interval == 0
            and layer not in self.dense_layer_ids
        )

    def layer_experts(self, layer: int) -> int:
        """E_i: routed experts of layer ``layer`` (0 for a dense layer)."""
        if self.experts_per_layer is not None:
            return self.experts_per_layer[layer]
        return self.num_experts if self.is_moe(layer) else 0

    def layer_shared_experts(self, layer: int) -> int:
        """n_s,i: shared experts of layer ``layer`` (0 for a dense layer)."""
        if self.shared_experts_per_layer is not None:
            return self.shared_experts_per_layer[layer]
        return self.shared_experts if self.is_moe(layer) else 0

    def layer_shared_width(self, layer: int) -> int:
        """Hidden size of layer ``layer``'s always-on shared FFN: n_s,i * h_s."""
        return self.layer_shared_experts(layer) * self.shared_ffn

    @property
    def expert_counts(self) -> tuple[int, ...]:
        """The distinct E_i of the MoE layers, ascending (empty for a dense model)."""
        return tuple(sorted({self.layer_experts(i) for i in range(self.layers)} - {0}))

    @property
    def moe_layers(self) -> int:
        return sum(self.is_moe(i) for i in range(self.layers))

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    @property
    def q_width(self) -> int:
        """Width of all query heads (the attention-score contraction): H * hd."""
        head = self.mla.qk_head_dim if self.mla else self.head_dim
        return self.heads * head

    @property
    def v_width(self) -> int:
        """Width of all value heads (the output projection's input): H * hd_v."""
        head = self.mla.v_head_dim if self.mla else self.head_dim
        return self.heads * head

    @property
    def shared_width(self) -> int:
        """Hidden size of the always-on FFN formed by all shared experts: n_s * h_s (the
        widest layer's with ``shared_experts_per_layer``; see ``layer_shared_width``)."""
        return self.shared_experts * self.shared_ffn

    @property
    def ffn_matrices(self) -> int:
        """Weight matrices per FFN (3 with GLU: gate, up, down; else 2)."""
        return 3 if self.glu else 2

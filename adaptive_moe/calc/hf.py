"""``from_hf_config``: a ``ModelSpec`` from a transformers ``config.json`` (as a dict).

The field names, their aliases and the defaults of absent fields are those of the
transformers 5 configuration classes, so that the counts equal a model built with
``AutoModelForCausalLM.from_config`` (checked in the tests for every supported type, on
configs written by the configuration classes themselves).

transformers spells the same MoE field several ways (its ``attribute_map`` aliases, and
newer versions *write* the alias: ``Qwen3MoeConfig`` saves ``num_local_experts``, not
``num_experts``), so each field is read under every spelling; two spellings with
different values are an error. An MoE ``model_type`` whose expert count (or top-k, expert
size) cannot be read is an error naming the missing key, and so is a config that carries
MoE-looking fields its ``model_type`` does not use: a silent dense count is never the
answer.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from adaptive_moe.calc.model import MLASpec, ModelSpec
from adaptive_moe.core.config_values import config_bool, config_int
from adaptive_moe.core.fileio import read_json

Config = Mapping[str, Any]

# Every spelling of each MoE field found in transformers 5's configuration classes.
EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "moe_top_k")
MOE_FFN = ("moe_intermediate_size", "expert_ffn_hidden_size")
SHARED = ("n_shared_experts", "num_shared_experts")
MTP = ("num_nextn_predict_layers", "num_mtp_layers")

# Fields that decide which layers are MoE or how big they are without "expert"/"moe" in
# their name; read by the types that use them, an error on any other type.
_MOE_LAYOUT = ("first_k_dense_replace", "decoder_sparse_step", "mlp_only_layers")
_MOE_NAME = re.compile(r"expert|moe", re.IGNORECASE)

# The kind of each field read (``core.config_values`` checks a present value: an invalid
# one is reported as such, not as missing); lists such as mlp_only_layers are not here.
_INT_FIELDS = frozenset(
    {
        *("hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads"),
        *("n_head", "num_key_value_heads", "head_dim", "vocab_size", "intermediate_size"),
        *("n_inner", "n_positions", "max_position_embeddings", "kv_lora_rank"),
        *("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "decoder_sparse_step"),
        *("shared_expert_intermediate_size", "first_k_dense_replace", "moe_layer_freq"),
        *EXPERTS, *TOP_K, *MOE_FFN, *SHARED, *MTP,
    }
)  # fmt: skip
_BOOL_FIELDS = frozenset(
    {"attention_bias", "mlp_bias", "qkv_bias", "tie_word_embeddings", "use_qk_norm"}
)

_REQUIRED = object()


class _Reader:
    """Reads fields under all their spellings and remembers which keys it looked at."""

    def __init__(self, model_type: str, config: Config):
        self.model_type = model_type
        self.config = config
        self.read: set[str] = set()

    def __call__(self, keys: str | tuple[str, ...], default: Any = _REQUIRED) -> Any:
        keys = (keys,) if isinstance(keys, str) else keys
        self.read.update(keys)
        # None is how transformers writes "unset" (head_dim, num_experts_per_tok, ...).
        found = {k: self.config[k] for k in keys if self.config.get(k) is not None}
        if len({json.dumps(v, sort_keys=True) for v in found.values()}) > 1:
            raise ValueError(
                f"{self.model_type} config gives one field conflicting values under "
                f"different names: {found}"
            )
        if found:
            key, value = next(iter(found.items()))
            where = f"{self.model_type} config"
            if key in _INT_FIELDS:
                return config_int(where, key, value)
            return config_bool(where, key, value) if key in _BOOL_FIELDS else value
        if default is _REQUIRED:
            also = f" (or {', '.join(keys[1:])})" if len(keys) > 1 else ""
            raise ValueError(f"{self.model_type} config lacks the field {keys[0]!r}{also}")
        return default

    def raw(self, key: str, default: Any = None) -> Any:
        """A field where None is a value (DeepSeek's ``q_lora_rank=None``: no q LoRA)."""
        self.read.add(key)
        return self.config.get(key, default)

    def unread_moe_fields(self) -> list[str]:
        """MoE-looking fields with a value that no reader of this type looked at."""
        return sorted(
            k
            for k, v in self.config.items()
            if not k.startswith("_")
            and (_MOE_NAME.search(k) or k in _MOE_LAYOUT)
            and k not in self.read
            and v not in (None, 0, False, [], {})
        )


def _attention(
    r: _Reader,
    *,
    qkv_bias: bool,
    out_bias: bool,
    head_dim: int | None = None,
    tied: bool = False,
) -> dict[str, Any]:
    """The attention and embedding fields; ``head_dim``: the class default when absent
    (Qwen3: 128), else transformers' own ``hidden_size // num_attention_heads`` -- what
    the model builds, even where the heads do not divide the hidden size (GLM-4-MoE's
    defaults: 96 heads of 42 over 4096)."""
    heads, hidden = r("num_attention_heads"), r("hidden_size")
    return dict(
        hidden=hidden,
        layers=r("num_hidden_layers"),
        heads=heads,
        kv_heads=r("num_key_value_heads", heads),
        head_dim=r("head_dim", head_dim or _floor_div(hidden, heads)),
        vocab=r("vocab_size"),
        tied_embeddings=bool(r("tie_word_embeddings", tied)),
        qkv_bias=qkv_bias,
        out_bias=out_bias,
    )


def _floor_div(hidden: Any, heads: Any) -> int | None:
    """transformers' default head size; None (ModelSpec then names the bad field) when
    either is not a positive integer."""
    valid = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (hidden, heads))
    return hidden // heads if valid else None


def _routed(r: _Reader, moe_ffn_key: tuple[str, ...] | None = MOE_FFN) -> dict[str, Any]:
    """Expert count, top-k and expert hidden size (all required: the type is MoE)."""
    experts = r(EXPERTS)
    fields: dict[str, Any] = dict(num_experts=experts, top_k=r(TOP_K) if experts else 0)
    if moe_ffn_key is not None:
        fields["moe_ffn"] = r(moe_ffn_key)
    return fields


def _gpt2(r: _Reader) -> ModelSpec:
    hidden = r(("n_embd", "hidden_size"))
    return ModelSpec(
        hidden=hidden,
        layers=r(("n_layer", "num_hidden_layers")),
        heads=r(("n_head", "num_attention_heads")),
        vocab=r("vocab_size"),
        ffn=r("n_inner", 4 * hidden),
        position_embeddings=r(("n_positions", "max_position_embeddings")),
        tied_embeddings=bool(r("tie_word_embeddings", True)),
        glu=False,
        mlp_bias=True,
        qkv_bias=True,
        out_bias=True,
        norm="layernorm",
    )


def _llama(r: _Reader) -> ModelSpec:
    bias = bool(r("attention_bias", False))
    return ModelSpec(
        **_attention(r, qkv_bias=bias, out_bias=bias),
        ffn=r("intermediate_size"),
        mlp_bias=bool(r("mlp_bias", False)),
    )


def _mistral(r: _Reader) -> ModelSpec:
    return ModelSpec(**_attention(r, qkv_bias=False, out_bias=False), ffn=r("intermediate_size"))


def _qwen2(r: _Reader) -> ModelSpec:
    return ModelSpec(**_attention(r, qkv_bias=True, out_bias=False), ffn=r("intermediate_size"))


def _qwen3(r: _Reader) -> ModelSpec:
    bias = bool(r("attention_bias", False))
    return ModelSpec(
        **_attention(r, qkv_bias=bias, out_bias=bias, head_dim=128),
        ffn=r("intermediate_size"),
        qk_norm="per_head",
    )


def _mixtral(r: _Reader) -> ModelSpec:
    # Mixtral's experts are intermediate_size wide (no moe_intermediate_size).
    return ModelSpec(
        **_attention(r, qkv_bias=False, out_bias=False),
        ffn=r("intermediate_size"),
        **_routed(r, moe_ffn_key=None),
    )


def _qwen_moe_layers(r: _Reader) -> dict[str, Any]:
    return dict(
        ffn=r("intermediate_size"),
        **_routed(r),
        expert_interval=r("decoder_sparse_step", 1),
        dense_layer_ids=tuple(r("mlp_only_layers", ())),
    )


def _qwen2_moe(r: _Reader) -> ModelSpec:
    layers = _qwen_moe_layers(r)
    shared = bool(layers["num_experts"])
    return ModelSpec(
        **_attention(r, qkv_bias=bool(r("qkv_bias", True)), out_bias=False),
        **layers,
        shared_experts=int(shared),
        shared_ffn=r("shared_expert_intermediate_size"),
        shared_expert_gate=shared,
    )


def _qwen3_moe(r: _Reader) -> ModelSpec:
    bias = bool(r("attention_bias", False))
    return ModelSpec(
        **_attention(r, qkv_bias=bias, out_bias=bias), **_qwen_moe_layers(r), qk_norm="per_head"
    )


def _olmoe(r: _Reader) -> ModelSpec:
    bias = bool(r("attention_bias", False))
    return ModelSpec(
        **_attention(r, qkv_bias=bias, out_bias=bias),
        ffn=r("intermediate_size"),
        **_routed(r, moe_ffn_key=None),
        qk_norm="full",
    )


def _deepseek(r: _Reader, *, first_dense: int, correction_bias: bool) -> ModelSpec:
    """DeepSeek-V2/V3: MLA attention, routed + shared experts after the first dense
    layers (transformers reads no ``moe_layer_freq``, so only 1 is exact)."""
    if r("moe_layer_freq", 1) != 1:
        raise ValueError(
            f"moe_layer_freq={r.config['moe_layer_freq']!r} is not supported (transformers "
            f"ignores it; only 1 is exact)"
        )
    bias = bool(r("attention_bias", False))
    mla = MLASpec(
        kv_lora_rank=r("kv_lora_rank"),
        qk_nope_head_dim=r("qk_nope_head_dim"),
        qk_rope_head_dim=r("qk_rope_head_dim"),
        v_head_dim=r("v_head_dim"),
        q_lora_rank=r.raw("q_lora_rank"),
    )
    attention = _attention(r, qkv_bias=bias, out_bias=bias)
    # transformers writes head_dim = qk_rope_head_dim for MLA, and MLA keys and values
    # have one head per query head whatever num_key_value_heads says: both are unused.
    attention.update(head_dim=None, kv_heads=attention["heads"])
    return ModelSpec(
        **attention,
        ffn=r("intermediate_size"),
        mlp_bias=bool(r("mlp_bias", False)),
        mla=mla,
        **_routed(r),
        first_dense_layers=r("first_k_dense_replace", first_dense),
        shared_experts=r(SHARED, 0),
        score_correction_bias=correction_bias,
        mtp_layers=r(MTP, 0),
    )


def _deepseek_v2(r: _Reader) -> ModelSpec:
    return _deepseek(r, first_dense=0, correction_bias=False)


def _deepseek_v3(r: _Reader) -> ModelSpec:
    return _deepseek(r, first_dense=3, correction_bias=True)


def _glm4_moe(r: _Reader) -> ModelSpec:
    return ModelSpec(
        **_attention(r, qkv_bias=bool(r("attention_bias", False)), out_bias=False),
        ffn=r("intermediate_size"),
        qk_norm="per_head" if r("use_qk_norm", False) else "none",
        **_routed(r),
        first_dense_layers=r("first_k_dense_replace", 1),
        shared_experts=r(SHARED, 0),
        score_correction_bias=True,
        mtp_layers=r(MTP, 0),
    )


_BUILDERS: dict[str, Callable[[_Reader], ModelSpec]] = {
    "gpt2": _gpt2,
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    "glm4_moe": _glm4_moe,
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_BUILDERS)


def from_hf_config(config: Config, name: str | None = None) -> ModelSpec:
    """Map a transformers ``config.json`` dict to a ``ModelSpec``.

    Raises ``ValueError`` for an unknown ``model_type`` (naming it and the supported
    ones), a missing required field (naming it), conflicting spellings of one field, and
    MoE-looking fields the ``model_type`` does not read.
    """
    model_type = config.get("model_type")
    if model_type not in _BUILDERS:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    reader = _Reader(model_type, config)
    spec = _BUILDERS[model_type](reader)
    unread = reader.unread_moe_fields()
    if unread:
        raise ValueError(
            f"{model_type} config has MoE fields that a {model_type} model does not read: "
            f"{', '.join(unread)}; its count would silently leave them out (wrong "
            f"model_type?)"
        )
    return dataclasses.replace(spec, name=name or model_type)


def load_hf_config(path: str | Path, flag: str = "config") -> ModelSpec:
    """``from_hf_config`` of a ``config.json`` file or of the directory holding one (what
    ``save_pretrained`` writes), named after its directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    config = read_json(path, flag)
    if not isinstance(config, dict):
        raise ValueError(f"config {str(path)!r} must hold a JSON object")
    try:
        return from_hf_config(
            config, name=path.stem if path.stem != "config" else path.parent.resolve().name
        )
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None

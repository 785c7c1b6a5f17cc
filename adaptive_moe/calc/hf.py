"""``from_hf_config``: a ``ModelSpec`` from a transformers ``config.json`` (as a dict).

The field names and the defaults of absent fields are those of the transformers 5
configuration classes, so that the counts equal a model built with
``AutoModelForCausalLM.from_config`` (checked in the tests for every supported type).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from adaptive_moe.calc.model import MLASpec, ModelSpec

Config = Mapping[str, Any]


def _attention(cfg: Config, *, qkv_bias: bool, out_bias: bool) -> dict[str, Any]:
    heads = cfg["num_attention_heads"]
    return dict(
        hidden=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab=cfg["vocab_size"],
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        out_bias=out_bias,
    )


def _llama(cfg: Config) -> ModelSpec:
    bias = bool(cfg.get("attention_bias", False))
    return ModelSpec(
        **_attention(cfg, qkv_bias=bias, out_bias=bias),
        ffn=cfg["intermediate_size"],
        mlp_bias=bool(cfg.get("mlp_bias", False)),
    )


def _qwen2(cfg: Config) -> ModelSpec:
    return ModelSpec(**_attention(cfg, qkv_bias=True, out_bias=False), ffn=cfg["intermediate_size"])


def _mixtral(cfg: Config) -> ModelSpec:
    return ModelSpec(
        **_attention(cfg, qkv_bias=False, out_bias=False),
        ffn=cfg["intermediate_size"],
        num_experts=cfg.get("num_local_experts", 8),
        top_k=cfg.get("num_experts_per_tok", 2),
    )


def _qwen_moe_layers(cfg: Config) -> dict[str, Any]:
    experts = cfg.get("num_experts", 0)
    return dict(
        ffn=cfg["intermediate_size"],
        num_experts=experts,
        top_k=cfg["num_experts_per_tok"] if experts else 0,
        moe_ffn=cfg["moe_intermediate_size"],
        expert_interval=cfg.get("decoder_sparse_step", 1),
        dense_layer_ids=tuple(cfg.get("mlp_only_layers") or ()),
    )


def _qwen2_moe(cfg: Config) -> ModelSpec:
    layers = _qwen_moe_layers(cfg)
    shared = bool(layers["num_experts"])
    return ModelSpec(
        **_attention(cfg, qkv_bias=bool(cfg.get("qkv_bias", True)), out_bias=False),
        **layers,
        shared_experts=int(shared),
        shared_ffn=cfg["shared_expert_intermediate_size"],
        shared_expert_gate=shared,
    )


def _qwen3_moe(cfg: Config) -> ModelSpec:
    bias = bool(cfg.get("attention_bias", False))
    return ModelSpec(
        **_attention(cfg, qkv_bias=bias, out_bias=bias), **_qwen_moe_layers(cfg), qk_norm="per_head"
    )


def _olmoe(cfg: Config) -> ModelSpec:
    bias = bool(cfg.get("attention_bias", False))
    return ModelSpec(
        **_attention(cfg, qkv_bias=bias, out_bias=bias),
        ffn=cfg["intermediate_size"],
        num_experts=cfg.get("num_experts", 64),
        top_k=cfg.get("num_experts_per_tok", 8),
        qk_norm="full",
    )


def _deepseek_v3(cfg: Config) -> ModelSpec:
    if cfg.get("moe_layer_freq", 1) != 1:
        raise ValueError(
            f"moe_layer_freq={cfg['moe_layer_freq']!r} is not supported (transformers "
            f"ignores it; only 1 is exact)"
        )
    bias = bool(cfg.get("attention_bias", False))
    mla = MLASpec(
        kv_lora_rank=cfg["kv_lora_rank"],
        qk_nope_head_dim=cfg["qk_nope_head_dim"],
        qk_rope_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"],
        q_lora_rank=cfg.get("q_lora_rank"),
    )
    return ModelSpec(
        **_attention(cfg, qkv_bias=bias, out_bias=bias),
        ffn=cfg["intermediate_size"],
        mla=mla,
        num_experts=cfg["n_routed_experts"],
        top_k=cfg["num_experts_per_tok"],
        moe_ffn=cfg["moe_intermediate_size"],
        first_dense_layers=cfg.get("first_k_dense_replace", 3),
        shared_experts=cfg.get("n_shared_experts") or 0,
        score_correction_bias=True,
        mtp_layers=cfg.get("num_nextn_predict_layers", 0),
    )


_BUILDERS: dict[str, Callable[[Config], ModelSpec]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_BUILDERS)


def from_hf_config(config: Config, name: str | None = None) -> ModelSpec:
    """Map a transformers ``config.json`` dict to a ``ModelSpec``.

    Raises ``ValueError`` for an unknown ``model_type`` (naming it and the supported
    ones) or a missing required field.
    """
    model_type = config.get("model_type")
    if model_type not in _BUILDERS:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        spec = _BUILDERS[model_type](config)
    except KeyError as missing:
        raise ValueError(f"{model_type} config lacks the field {missing}") from None
    return dataclasses.replace(spec, name=name or model_type)


def load_hf_config(path: str | Path) -> ModelSpec:
    """``from_hf_config`` of a ``config.json`` file, named after its directory."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read config {str(path)!r}: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"config {str(path)!r} must hold a JSON object")
    return from_hf_config(config, name=path.stem if path.stem != "config" else path.parent.name)

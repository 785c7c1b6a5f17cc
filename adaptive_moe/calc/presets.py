"""Named model presets: the public ``config.json`` of each model, as a ``ModelSpec``.

Written out field by field (not loaded from the configs) so that the tests can check
them against ``from_hf_config`` of the published configs.
"""

from __future__ import annotations

from adaptive_moe.calc.model import MLASpec, ModelSpec

_QWEN3 = dict(vocab=151936, kv_heads=4, head_dim=128, qk_norm="per_head", top_k=8)

PRESETS: dict[str, ModelSpec] = {
    "mixtral-8x7b": ModelSpec(
        name="mixtral-8x7b",
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=8,
        vocab=32000,
        ffn=14336,
        num_experts=8,
        top_k=2,
    ),
    "mixtral-8x22b": ModelSpec(
        name="mixtral-8x22b",
        hidden=6144,
        layers=56,
        heads=48,
        kv_heads=8,
        vocab=32000,
        ffn=16384,
        num_experts=8,
        top_k=2,
    ),
    "qwen3-30b-a3b": ModelSpec(
        name="qwen3-30b-a3b",
        hidden=2048,
        layers=48,
        heads=32,
        ffn=6144,
        num_experts=128,
        moe_ffn=768,
        **_QWEN3,
    ),
    "qwen3-235b-a22b": ModelSpec(
        name="qwen3-235b-a22b",
        hidden=4096,
        layers=94,
        heads=64,
        ffn=12288,
        num_experts=128,
        moe_ffn=1536,
        **_QWEN3,
    ),
    "olmoe-1b-7b": ModelSpec(
        name="olmoe-1b-7b",
        hidden=2048,
        layers=16,
        heads=16,
        vocab=50304,
        ffn=1024,
        num_experts=64,
        top_k=8,
        qk_norm="full",
    ),
    "deepseek-v3": ModelSpec(
        name="deepseek-v3",
        hidden=7168,
        layers=61,
        heads=128,
        vocab=129280,
        ffn=18432,
        mla=MLASpec(
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
        ),
        num_experts=256,
        top_k=8,
        moe_ffn=2048,
        first_dense_layers=3,
        shared_experts=1,
        score_correction_bias=True,
        mtp_layers=1,
    ),
}


def preset(name: str) -> ModelSpec:
    """The preset called ``name``; ``ValueError`` listing the known ones otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]

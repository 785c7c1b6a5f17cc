"""``calc.from_hf_config`` against transformers itself, for every supported ``model_type``.

Independent reference: the configuration classes of the installed transformers write the
configs (their defaults and small variants, through ``save_pretrained`` or ``to_dict``),
and the model those configs build on the meta device is counted parameter by parameter.
FLOPs of the types added here are checked against ``FlopCounterMode`` over a forward of
the tiny model on CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from adaptive_moe import calc
from adaptive_moe.calc import ModelSpec, count_params, forward_flops
from adaptive_moe.calc.hf import EXPERTS, TOP_K
from adaptive_moe.cli import main
from adaptive_moe.profiling.shape_args import shape_from_config
from tests.test_calc import counted_flops

transformers = pytest.importorskip("transformers")

# model_type -> configuration class of transformers 5.
CLASSES = {
    "gpt2": "GPT2Config",
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "mixtral": "MixtralConfig",
    "qwen2_moe": "Qwen2MoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
    "olmoe": "OlmoeConfig",
    "deepseek_v2": "DeepseekV2Config",
    "deepseek_v3": "DeepseekV3Config",
    "glm4_moe": "Glm4MoeConfig",
}

_SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=100)
_MLA = dict(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)
_MOE = dict(moe_intermediate_size=24, num_experts_per_tok=2)

# (model_type, constructor keywords): each variant changes what its type's count depends on.
VARIANTS = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=100),
    "gpt2-untied-inner": dict(
        n_embd=48,
        n_layer=3,
        n_head=3,
        n_inner=80,
        n_positions=16,
        vocab_size=90,
        tie_word_embeddings=False,
    ),
    "llama-gqa": dict(**_SMALL, intermediate_size=96, num_key_value_heads=2),
    "llama-bias-tied": dict(
        **_SMALL,
        intermediate_size=96,
        head_dim=24,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
    ),
    "mistral": dict(**_SMALL, intermediate_size=80, num_key_value_heads=1, head_dim=20),
    "qwen2": dict(**_SMALL, intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3-default-head": dict(**_SMALL, intermediate_size=96, num_key_value_heads=2),
    "qwen3-bias": dict(
        **_SMALL, intermediate_size=96, num_key_value_heads=4, head_dim=12, attention_bias=True
    ),
    "mixtral": dict(
        **_SMALL,
        intermediate_size=48,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "qwen2_moe": dict(
        **{**_SMALL, "num_hidden_layers": 4},
        **_MOE,
        intermediate_size=96,
        num_experts=4,
        num_key_value_heads=4,
        shared_expert_intermediate_size=40,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
        qkv_bias=False,
    ),
    "qwen3_moe": dict(
        **{**_SMALL, "num_hidden_layers": 4},
        **_MOE,
        intermediate_size=96,
        num_experts=6,
        head_dim=20,
        mlp_only_layers=[0],
        decoder_sparse_step=1,
        attention_bias=True,
    ),
    "qwen3_moe-sparse-step": dict(
        **{**_SMALL, "num_hidden_layers": 4},
        **_MOE,
        intermediate_size=96,
        num_experts=4,
        decoder_sparse_step=2,
    ),
    "olmoe": dict(
        **_SMALL, intermediate_size=32, num_experts=4, num_experts_per_tok=2, attention_bias=True
    ),
    "deepseek_v2": dict(
        **_SMALL,
        **_MLA,
        **_MOE,
        intermediate_size=96,
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=None,
        attention_bias=True,
        mlp_bias=True,
    ),
    "deepseek_v2-qlora": dict(
        **_SMALL,
        **_MLA,
        **_MOE,
        intermediate_size=96,
        n_routed_experts=8,
        n_shared_experts=2,
        q_lora_rank=20,
    ),
    "deepseek_v3": dict(
        **_SMALL,
        **_MLA,
        **_MOE,
        intermediate_size=96,
        n_routed_experts=8,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=2,
        q_lora_rank=None,
    ),
    "glm4_moe": dict(
        **_SMALL,
        **_MOE,
        intermediate_size=96,
        num_key_value_heads=2,
        n_routed_experts=4,
        n_shared_experts=2,
        first_k_dense_replace=1,
        use_qk_norm=True,
        attention_bias=True,
        head_dim=20,
    ),
    "glm4_moe-no-shared": dict(
        **{**_SMALL, "num_attention_heads": 6},
        **_MOE,
        intermediate_size=96,
        num_key_value_heads=2,
        n_routed_experts=4,
        n_shared_experts=0,
        n_group=1,
        topk_group=1,
    ),
}


def _class(variant: str):
    return getattr(transformers, CLASSES[variant.split("-")[0]])


def _meta_model(cfg):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


def _check_counts(spec: ModelSpec, model) -> None:
    count = count_params(spec)
    assert count.total == sum(p.numel() for p in model.parameters())
    corrections = sum(b.numel() for n, b in model.named_buffers() if "correction_bias" in n)
    assert count.buffers == corrections


def test_every_supported_type_is_tested():
    assert set(CLASSES) == set(calc.SUPPORTED_MODEL_TYPES)
    assert {v.split("-")[0] for v in VARIANTS} == set(CLASSES)


@pytest.mark.parametrize("model_type", sorted(CLASSES))
def test_default_configs_saved_by_transformers(model_type, tmp_path):
    """The configuration class's defaults, written by ``save_pretrained`` and read back
    from the directory: the count of the model they build."""
    # DeepSeek-V2's class leaves top-k unset (None); its released models use 6.
    extra = {"num_experts_per_tok": 6} if model_type == "deepseek_v2" else {}
    cfg = getattr(transformers, CLASSES[model_type])(**extra)
    cfg.save_pretrained(tmp_path)
    spec = calc.load_hf_config(tmp_path)
    assert spec.name == tmp_path.name
    _check_counts(spec, _meta_model(cfg))


def test_default_qwen3_moe_is_counted_as_moe():
    """The issue's case: newer transformers write ``num_local_experts`` for Qwen3-MoE."""
    saved = transformers.Qwen3MoeConfig().to_dict()
    assert "num_local_experts" in saved and "num_experts" not in saved
    count = count_params(calc.from_hf_config(saved))
    assert count.total == 15_350_731_776  # not the 1.75 B of a dense reading


def test_deepseek_v2_default_top_k_is_named():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        calc.from_hf_config(transformers.DeepseekV2Config().to_dict())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_small_variants(variant):
    cfg = _class(variant)(**VARIANTS[variant])
    spec = calc.from_hf_config(cfg.to_dict())
    _check_counts(spec, _meta_model(cfg))


@pytest.mark.parametrize(
    "variant", ["gpt2-untied-inner", "mistral", "qwen3-bias", "deepseek_v2", "glm4_moe"]
)
def test_forward_flops_of_added_types(variant):
    """The types added beside the original ones: counted matmuls of a CPU forward."""
    cfg = _class(variant)(**VARIANTS[variant])
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "eager"  # the per-expert loop: matmuls the counter sees
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    t = 10
    tokens = torch.randint(0, cfg.vocab_size, (1, t))
    with torch.no_grad():
        counted = counted_flops(lambda: model(tokens, use_cache=False))
    spec = calc.from_hf_config(cfg.to_dict())
    assert forward_flops(spec, t).total * t == pytest.approx(counted, rel=1e-12)


def _qwen3_moe_small() -> dict:
    return transformers.Qwen3MoeConfig(**VARIANTS["qwen3_moe"]).to_dict()


@pytest.mark.parametrize("key", EXPERTS)
def test_every_spelling_of_the_expert_count(key):
    config = _qwen3_moe_small()
    for alias in EXPERTS:
        config.pop(alias, None)
    config[key] = 6
    assert calc.from_hf_config(config) == calc.from_hf_config(_qwen3_moe_small())


@pytest.mark.parametrize("key", TOP_K)
def test_every_spelling_of_top_k(key):
    config = _qwen3_moe_small()
    config[key] = config.pop("num_experts_per_tok")
    assert calc.from_hf_config(config).top_k == 2


@pytest.mark.parametrize("key", ["hidden_size", "num_experts_per_tok", "moe_intermediate_size"])
@pytest.mark.parametrize("value", [float("nan"), 64.5, "64", True, -1, [64]])
def test_invalid_values_are_named_as_invalid_not_missing(key, value, tmp_path):
    """One validator for every config reader: the calculator's, and profile/plan's."""
    config = {**_qwen3_moe_small(), key: value}
    with pytest.raises(ValueError, match=rf"{key}=.* is invalid: it must be an integer") as info:
        calc.from_hf_config(config)
    assert "lacks" not in str(info.value)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))  # NaN as JSON's NaN literal, as Python writes it
    with pytest.raises(ValueError, match=rf"{key}=.* is invalid"):
        calc.load_hf_config(path)
    with pytest.raises(ValueError, match=rf"--config {path}: {key}=.* is invalid: it must be"):
        shape_from_config(path)
    if value == "64":
        with pytest.raises(ValueError, match="write the value without quotes"):
            calc.from_hf_config(config)


def test_invalid_boolean_is_named():
    config = {**_qwen3_moe_small(), "attention_bias": "false"}
    with pytest.raises(ValueError, match="attention_bias='false' is invalid: it must be true or"):
        calc.from_hf_config(config)


def test_conflicting_spellings_are_an_error():
    config = {**_qwen3_moe_small(), "num_experts": 6, "num_local_experts": 8}
    with pytest.raises(ValueError, match=r"conflicting.*num_experts.*num_local_experts"):
        calc.from_hf_config(config)


@pytest.mark.parametrize(
    ("model_type", "drop", "named"),
    [
        ("qwen3_moe", EXPERTS, "'num_experts'"),
        ("qwen3_moe", ("num_experts_per_tok",), "'num_experts_per_tok'"),
        ("qwen3_moe", ("moe_intermediate_size",), "'moe_intermediate_size'"),
        ("mixtral", EXPERTS, "'num_experts'"),
        ("deepseek_v3", EXPERTS, "'num_experts'"),
        ("glm4_moe", EXPERTS, "'num_experts'"),
        ("qwen2_moe", ("shared_expert_intermediate_size",), "shared_expert_intermediate_size"),
    ],
)
def test_moe_type_with_unreadable_moe_fields_is_an_error(model_type, drop, named):
    """Never a silent dense count: the missing key is named."""
    variant = next(v for v in VARIANTS if v.split("-")[0] == model_type)
    config = _class(variant)(**VARIANTS[variant]).to_dict()
    for key in drop:
        config.pop(key, None)
    with pytest.raises(ValueError, match=named):
        calc.from_hf_config(config)


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("llama", {"num_local_experts": 8, "num_experts_per_tok": 2}),
        ("qwen2", {"moe_intermediate_size": 64}),
        ("mistral", {"first_k_dense_replace": 1}),
        ("mixtral", {"n_shared_experts": 1}),
    ],
)
def test_moe_fields_the_type_does_not_read_are_an_error(model_type, extra):
    variant = next(v for v in VARIANTS if v.split("-")[0] == model_type)
    config = {**_class(variant)(**VARIANTS[variant]).to_dict(), **extra}
    with pytest.raises(
        ValueError, match=f"{model_type} model does not read: .*{next(iter(extra))}"
    ):
        calc.from_hf_config(config)


def test_config_path_file_or_directory(tmp_path, capsys):
    cfg = transformers.MixtralConfig(**VARIANTS["mixtral"])
    cfg.save_pretrained(tmp_path / "tiny-mixtral")
    by_dir = calc.load_hf_config(tmp_path / "tiny-mixtral")
    by_file = calc.load_hf_config(tmp_path / "tiny-mixtral" / "config.json")
    assert by_dir == by_file and by_dir.name == by_file.name == "tiny-mixtral"
    assert main(["calc", "params", "--config", str(tmp_path / "tiny-mixtral"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"]["total"] == count_params(by_dir).total
    assert main(["calc", "params", "--config", str(tmp_path / "missing")]) == 2
    assert "--config " in (err := capsys.readouterr().err) and "no such file" in err


# ---- head sizes the heads do not divide ----------------------------------------------------


def test_hidden_not_divisible_by_heads_needs_head_dim():
    with pytest.raises(ValueError, match=r"heads=3 does not divide hidden=100.*head_dim"):
        ModelSpec(hidden=100, layers=1, heads=3, vocab=10, ffn=64)
    spec = ModelSpec(hidden=100, layers=1, heads=3, vocab=10, ffn=64, head_dim=32)
    # q, k, v: 100 -> 96 each; o: 96 -> 100.
    assert count_params(spec).attention == 4 * 100 * 96


def test_cli_refuses_undivided_hidden_without_head_dim(capsys):
    flags = ["calc", "params", "--layers", "1", "--hidden", "100", "--heads", "3"]
    flags += ["--vocab", "10", "--ffn", "64"]
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert "does not divide hidden=100" in err and err.count("\n") == 1
    assert main([*flags, "--head-dim", "33", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["head_dim"] == 33


def test_cli_override_of_heads_rederives_a_derived_head_dim(capsys):
    """Mixtral's head size is d/H (128): --heads 16 makes it 256; Qwen3's explicit 128
    (not d/H = 64) stays."""
    assert main(["calc", "params", "--preset", "mixtral-8x7b", "--heads", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["head_dim"] == 256
    assert main(["calc", "params", "--preset", "qwen3-30b-a3b", "--heads", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["head_dim"] == 128

"""Tests of ``adaptive_moe.calc`` and ``adaptive-moe calc``.

Independent references:
- parameters: transformers models built on the meta device from the published configs
  (tests/fixtures, written from the models' public config.json; ``auto_map`` and
  ``quantization_config`` left out: they describe code and storage, not the architecture)
  and the published totals;
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over a forward (and backward) of a
  plain-torch reference transformer written here, of tiny transformers models, and of the
  package's own model when it exists; attention runs on the math SDPA backend so that the
  counter sees its matmuls (the full S x S square, the convention of ``calc.flops``);
- memory: real tensors (parameters, gradients, torch optimizer states, KV caches of
  transformers models), the tensors autograd saves (``saved_tensors_hooks``) and the CPU
  allocator's trace of a whole training step (``torch.profiler`` memory events).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode

from adaptive_moe import calc
from adaptive_moe.calc import (
    InferSetup,
    ModelSpec,
    Parallel,
    TrainSetup,
    count_params,
    forward_flops,
    inference_memory,
    layer_memory,
    training_flops_per_token,
    training_memory,
)
from adaptive_moe.calc.memory import GIB
from adaptive_moe.cli import main
from adaptive_moe.core.strategy import Strategy
from benchmarks.calc_memory_check import cpu_step_peak, saved_bytes

FIXTURES = Path(__file__).parent / "fixtures"
# Published (total, active) parameters; DeepSeek-V3's 671B excludes its 14B MTP module.
PUBLISHED = {
    "mixtral-8x7b": (46.7e9, 12.9e9),
    "mixtral-8x22b": (141e9, 39e9),
    "qwen3-30b-a3b": (30.5e9, 3.3e9),
    "qwen3-235b-a22b": (235e9, 22e9),
    "olmoe-1b-7b": (6.9e9, 1.3e9),
    "deepseek-v3": (671e9, 37e9),
}


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


# ---- a plain-torch reference transformer ----------------------------------------------


class _FusedRMSNorm(torch.autograd.Function):
    """RMSNorm saving what a fused kernel saves: its input and the fp32 1/rms."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        ctx.save_for_backward(x, weight, rstd)
        return (x.float() * rstd).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        g = grad.float() * weight.float()
        dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        dw = (grad.float() * xhat).flatten(0, -2).sum(0)
        return dx.to(x.dtype), dw.to(weight.dtype), None


class RefNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return _FusedRMSNorm.apply(x, self.weight, 1e-6)


class RefAttention(nn.Module):
    def __init__(self, s: ModelSpec):
        super().__init__()
        self.s = s
        hd = s.head_dim
        self.q = nn.Linear(s.hidden, s.heads * hd, bias=s.qkv_bias)
        self.k = nn.Linear(s.hidden, s.kv_heads * hd, bias=s.qkv_bias)
        self.v = nn.Linear(s.hidden, s.kv_heads * hd, bias=s.qkv_bias)
        self.o = nn.Linear(s.heads * hd, s.hidden, bias=s.out_bias)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        s = self.s

        def heads(y, n):  # [b, t, n*hd] -> [b, n, t, hd]
            return y.view(b, t, n, s.head_dim).transpose(1, 2)

        def rope(y):
            y1, y2 = y.chunk(2, dim=-1)
            return y * cos + torch.cat((-y2, y1), dim=-1) * sin

        q, k = rope(heads(self.q(x), s.heads)), rope(heads(self.k(x), s.kv_heads))
        v = heads(self.v(x), s.kv_heads)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class RefFFN(nn.Module):
    def __init__(self, d: int, width: int, glu: bool):
        super().__init__()
        self.gate = nn.Linear(d, width, bias=False) if glu else None
        self.up = nn.Linear(d, width, bias=False)
        self.down = nn.Linear(width, d, bias=False)

    def forward(self, x):
        if self.gate is None:
            return self.down(F.silu(self.up(x)))
        return self.down(F.silu(self.gate(x)) * self.up(x))


class RefMoE(nn.Module):
    """fp32 softmax router, top-k, a per-expert loop over gathered rows, optional shared
    expert with a sigmoid gate; ``num_experts`` and ``shared`` (n_s) of this layer."""

    def __init__(self, s: ModelSpec, num_experts: int, shared: int):
        super().__init__()
        self.k = s.top_k
        self.router = nn.Linear(s.hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(RefFFN(s.hidden, s.moe_ffn, s.glu) for _ in range(num_experts))
        self.shared = RefFFN(s.hidden, shared * s.shared_ffn, s.glu) if shared else None
        gate = shared and s.shared_expert_gate
        self.shared_gate = nn.Linear(s.hidden, 1, bias=False) if gate else None

    def forward(self, x):
        shape = x.shape
        x = x.flatten(0, -2)  # [T, d]
        logits = F.linear(x.float(), self.router.weight.float())  # [T, E]
        weights, ids = torch.topk(logits.softmax(-1), self.k, dim=-1)  # [T, k]
        weights = weights / weights.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            out = expert(x[token]) * weights[token, slot, None].to(x.dtype)
            y = y.index_add(0, token, out)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            y = y + shared
        return y.view(shape)


class RefBlock(nn.Module):
    def __init__(self, s: ModelSpec, layer: int):
        super().__init__()
        self.norm1, self.norm2 = RefNorm(s.hidden), RefNorm(s.hidden)
        self.attn = RefAttention(s)
        # Per-layer counts read from the spec's tuples directly (PR-MoE pyramids),
        # else the uniform rule.
        if s.experts_per_layer is not None:
            experts = s.experts_per_layer[layer]
        else:
            experts = s.num_experts if s.is_moe(layer) else 0
        if s.shared_experts_per_layer is not None:
            shared = s.shared_experts_per_layer[layer]
        else:
            shared = s.shared_experts if experts else 0
        self.mlp = RefMoE(s, experts, shared) if experts else RefFFN(s.hidden, s.ffn, s.glu)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class RefLM(nn.Module):
    def __init__(self, s: ModelSpec, checkpointed: bool = False):
        super().__init__()
        self.embed = nn.Embedding(s.vocab, s.hidden)
        self.blocks = nn.ModuleList(RefBlock(s, i) for i in range(s.layers))
        self.norm = RefNorm(s.hidden)
        self.head = None if s.tied_embeddings else nn.Linear(s.hidden, s.vocab, bias=False)
        self.checkpointed = checkpointed
        self.head_dim = s.head_dim

    def rope(self, t: int, dtype: torch.dtype):
        inv = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2) / self.head_dim)
        angles = torch.outer(torch.arange(t).float(), inv).repeat(1, 2)  # [t, hd]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, tokens):
        x = self.embed(tokens)
        cos, sin = self.rope(tokens.shape[1], x.dtype)
        for block in self.blocks:
            if self.checkpointed:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(self.norm(x), weight)  # [b, t, V]


def ref_loss(model: RefLM, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    return F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())


# RefMoE's experts are the package's "loop" kernel in effect: rows gathered per expert,
# torch's (unfused) activation.
REF_PARALLEL = Parallel(expert_kernel="loop")

REF_SPECS = {
    "moe-gqa": ModelSpec(
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        vocab=96,
        ffn=128,
        num_experts=4,
        top_k=2,
        moe_ffn=48,
    ),
    "moe-mixed": ModelSpec(
        hidden=64,
        layers=4,
        heads=4,
        vocab=80,
        ffn=96,
        glu=False,
        tied_embeddings=True,
        num_experts=6,
        top_k=3,
        moe_ffn=32,
        expert_interval=2,
        first_dense_layers=1,
        shared_experts=2,
        shared_ffn=24,
        shared_expert_gate=True,
        qkv_bias=True,
    ),
    "dense": ModelSpec(hidden=48, layers=2, heads=6, kv_heads=1, vocab=64, ffn=80),
    # PR-MoE: a pyramid of expert counts, a dense first layer, residual (shared) experts
    # on some MoE layers only.
    "pyramid": ModelSpec(
        hidden=32,
        layers=4,
        heads=4,
        vocab=64,
        ffn=64,
        moe_ffn=24,
        top_k=2,
        experts_per_layer=(0, 2, 4, 8),
        shared_experts_per_layer=(0, 1, 0, 2),
        shared_ffn=16,
        shared_expert_gate=True,
    ),
}


def counted_flops(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---- ModelSpec ---------------------------------------------------------------------------


def test_spec_resolves_defaults():
    s = ModelSpec(hidden=64, layers=2, heads=4, vocab=10, ffn=96, num_experts=4, top_k=1)
    assert (s.kv_heads, s.head_dim, s.moe_ffn, s.shared_ffn) == (4, 16, 96, 96)
    assert s == dataclasses.replace(s)  # a resolved spec survives replace unchanged


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(hidden=0), "hidden"),
        (dict(layers=True), "layers"),
        (dict(kv_heads=3), "kv_heads"),
        (dict(num_experts=4, top_k=5), "top_k"),
        (dict(num_experts=4, top_k=0), "top_k"),
        (dict(top_k=2), "top_k"),
        (dict(shared_experts=1), "shared_experts"),
        (dict(num_experts=4, top_k=1, first_dense_layers=3), "first_dense_layers"),
        (dict(num_experts=4, top_k=1, dense_layer_ids=(2,)), "dense_layer_ids"),
        (dict(num_experts=4, top_k=1, expert_interval=0), "expert_interval"),
        (dict(qk_norm="rms"), "qk_norm"),
        (dict(norm="batchnorm"), "norm"),
        (dict(mla=calc.MLASpec(16, 8, 8, 8), qk_norm="full"), "qk_norm"),
    ],
)
def test_spec_rejects_bad_values(kwargs, field):
    base = dict(hidden=64, layers=2, heads=4, vocab=10, ffn=96)
    with pytest.raises(ValueError, match=field):
        ModelSpec(**{**base, **kwargs})


def test_moe_layer_rule():
    s = ModelSpec(
        hidden=8,
        layers=8,
        heads=2,
        vocab=4,
        ffn=8,
        num_experts=4,
        top_k=1,
        expert_interval=2,
        first_dense_layers=2,
        dense_layer_ids=(5,),
    )
    assert [i for i in range(8) if s.is_moe(i)] == [3, 7]
    assert (s.moe_layers, s.dense_layers) == (2, 6)


def test_per_layer_experts():
    s = REF_SPECS["pyramid"]
    assert (s.num_experts, s.shared_experts, s.expert_counts) == (8, 2, (2, 4, 8))
    assert [s.layer_experts(i) for i in range(4)] == [0, 2, 4, 8]
    assert [s.layer_shared_width(i) for i in range(4)] == [0, 16, 0, 32]
    assert (s.moe_layers, s.dense_layers) == (3, 1)
    assert s == dataclasses.replace(s)  # resolved num_experts agrees with the tuple
    assert ModelSpec(**{**_PYRAMID_BASE, "experts_per_layer": [0, 2, 4, 8]}).experts_per_layer == (
        0,
        2,
        4,
        8,
    )


_PYRAMID_BASE = dict(hidden=32, layers=4, heads=4, vocab=64, ffn=64, top_k=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(experts_per_layer=(2, 4)), "one entry per layer"),
        (dict(experts_per_layer=(0, 2, -1, 4)), r"experts_per_layer\[2\]"),
        (dict(experts_per_layer=(0, 2, 4, 1.5)), r"experts_per_layer\[3\]"),
        (dict(experts_per_layer="0248"), "sequence"),
        (dict(experts_per_layer=(0, 1, 4, 8)), "fewest experts"),
        (dict(experts_per_layer=(0, 2, 4, 8), num_experts=4), "disagrees"),
        (dict(experts_per_layer=(0, 2, 4, 8), expert_interval=2), "expert_interval"),
        (dict(experts_per_layer=(0, 2, 4, 8), first_dense_layers=1), "first_dense_layers"),
        (dict(experts_per_layer=(0, 0, 0, 0)), "top_k"),
        (dict(experts_per_layer=(0, 2, 2, 2), shared_experts_per_layer=(1, 0, 0, 0)), "dense"),
        (
            dict(
                experts_per_layer=(0, 2, 2, 2),
                shared_experts_per_layer=(0, 1, 1, 1),
                shared_experts=2,
            ),
            "disagrees",
        ),
    ],
)
def test_per_layer_experts_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelSpec(**{**_PYRAMID_BASE, **kwargs})


def test_per_layer_shared_experts_with_the_uniform_rule():
    """Residual-MoE on every other MoE layer of a uniform model (expert_interval 2)."""
    s = ModelSpec(
        **_PYRAMID_BASE, num_experts=4, expert_interval=2, shared_experts_per_layer=(0, 1, 0, 0)
    )
    assert [s.layer_experts(i) for i in range(4)] == [0, 4, 0, 4]
    assert [s.layer_shared_experts(i) for i in range(4)] == [0, 1, 0, 0]
    with pytest.raises(ValueError, match=r"dense layers \[2\]"):
        dataclasses.replace(s, shared_experts_per_layer=(0, 1, 1, 0))


def test_per_layer_params_equal_reference_model():
    spec = REF_SPECS["pyramid"]
    model = RefLM(spec)
    count = count_params(spec)
    assert count.total == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    shared = sum(p.numel() for n, p in model.named_parameters() if ".shared" in n)
    router = sum(p.numel() for n, p in model.named_parameters() if ".router." in n)
    assert (count.experts, count.shared_experts, count.router) == (experts, shared, router)
    # Active: every layer's k experts, whatever its E_i.
    one_expert = 3 * 32 * 24
    assert count.active == count.total - (2 + 4 + 8 - 3 * 2) * one_expert


def test_per_layer_memory_lays_out_each_layer():
    spec = REF_SPECS["pyramid"]
    # ep=4: the 2-expert layer is split over 2 ranks each (EP+MP r in {1, 2}); r=2 is
    # not valid for the 4- and 8-expert layers (whole experts per rank).
    Parallel(dp=4, ep=4, expert_r=1).check(spec)
    with pytest.raises(ValueError, match="E=4"):
        Parallel(dp=4, ep=4, expert_r=2).check(spec)
    one = training_memory(spec, Parallel(), TrainSetup(micro_batch=1, seq_len=16))
    four = training_memory(spec, Parallel(dp=4, ep=4), TrainSetup(micro_batch=1, seq_len=16))
    count = count_params(spec)
    assert one.weights == 2 * count.total
    assert four.weights == 2 * (count.total - count.experts + count.experts / 4)


# ---- transformers configs: exact parameter counts ----------------------------------------

TINY_CONFIGS = {
    "mixtral": dict(
        model_type="mixtral",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=100,
    ),
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
        vocab_size=100,
        tie_word_embeddings=True,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        head_dim=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[0],
        attention_bias=True,
        vocab_size=100,
    ),
    "olmoe": dict(
        model_type="olmoe",
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        attention_bias=True,
        vocab_size=100,
    ),
    "deepseek_v3": dict(
        model_type="deepseek_v3",
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        n_shared_experts=2,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        attention_bias=True,
        vocab_size=100,
    ),
    "deepseek_v3_qlora": dict(
        model_type="deepseek_v3",
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        n_shared_experts=1,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        vocab_size=100,
    ),
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=96,
        head_dim=20,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        vocab_size=100,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    ),
}


def _hf_model(config: dict, device: str = "meta"):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(**config)
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "eager"  # the per-expert loop: matmuls the counter sees
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(cfg)


def _hf_components(model) -> dict[str, int]:
    """Parameters of a transformers causal LM grouped by the module that holds them."""
    groups = dict.fromkeys(
        (
            "embedding",
            "attention",
            "dense_ffn",
            "experts",
            "shared_experts",
            "router",
            "norms",
            "lm_head",
        ),
        0,
    )
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            key = "embedding"
        elif "lm_head" in name:
            key = "lm_head"
        elif ".self_attn." in name:
            key = "attention"
        elif ".mlp.experts." in name:
            key = "experts"
        elif ".mlp.shared_expert" in name:
            key = "shared_experts"
        elif ".mlp.gate." in name:
            key = "router"
        elif ".mlp." in name:
            key = "dense_ffn"
        else:
            assert "norm" in name, name
            key = "norms"
        groups[key] += p.numel()
    return groups


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_params_equal_transformers_published_configs(name):
    config = fixture(name)
    spec = calc.from_hf_config(config)
    model = _hf_model(config)
    count = count_params(spec)
    assert count.total == sum(p.numel() for p in model.parameters())
    got = {k: v for k, v in count.to_dict().items() if k in _hf_components(model)}
    assert got == _hf_components(model)
    corrections = sum(b.numel() for n, b in model.named_buffers() if "correction_bias" in n)
    assert count.buffers == corrections


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_params_equal_transformers_tiny_variants(name):
    config = TINY_CONFIGS[name]
    model = _hf_model(config)
    count = count_params(calc.from_hf_config(config))
    assert count.total == sum(p.numel() for p in model.parameters())
    got = {k: v for k, v in count.to_dict().items() if k in _hf_components(model)}
    assert got == _hf_components(model)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_params_agree_with_published_totals(name):
    total, active = PUBLISHED[name]
    count = count_params(calc.preset(name))
    assert count.total == pytest.approx(total, rel=0.01)
    # Active counts are published to two digits ("37B", "3.3B"): 2 %.
    assert count.active == pytest.approx(active, rel=0.02)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_are_the_published_configs(name):
    assert calc.preset(name) == calc.from_hf_config(fixture(name))


def test_from_hf_config_errors():
    with pytest.raises(ValueError, match=r"'bert'.*mixtral.*deepseek_v3"):
        calc.from_hf_config({"model_type": "bert"})
    broken = {k: v for k, v in fixture("mixtral-8x7b").items() if k != "hidden_size"}
    with pytest.raises(ValueError, match="hidden_size"):
        calc.from_hf_config(broken)
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        calc.preset("gpt5")


# ---- FLOPs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REF_SPECS))
def test_forward_flops_match_counted_matmuls_of_reference(name):
    spec, b, t = REF_SPECS[name], 1, 16
    torch.manual_seed(0)
    model = RefLM(spec)
    tokens = torch.randint(0, spec.vocab, (b, t))
    with torch.no_grad():
        counted = counted_flops(lambda: model(tokens))
    # The reference's gate weighting and index_add are not matmuls, so the count is exact.
    assert forward_flops(spec, t).total * b * t == pytest.approx(counted, rel=1e-12)


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_training_flops_match_counted_forward_and_backward(checkpointing):
    spec, b, t = REF_SPECS["moe-mixed"], 1, 8
    torch.manual_seed(0)
    model = RefLM(spec, checkpointed=checkpointing == "full")
    tokens = torch.randint(0, spec.vocab, (b, t))
    # calc counts a full recomputation; torch's early stop would skip a block's last matmul
    # when nothing saves its output.
    with set_checkpoint_early_stop(False):
        counted = counted_flops(lambda: ref_loss(model, tokens).backward())
    expected = training_flops_per_token(spec, t, checkpointing) * b * t
    assert expected == pytest.approx(counted, rel=1e-12)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_forward_flops_match_counted_matmuls_of_transformers(name):
    config, t = TINY_CONFIGS[name], 12
    torch.manual_seed(0)
    model = _hf_model(config, device="cpu").eval()
    tokens = torch.randint(0, config["vocab_size"], (1, t))
    with torch.no_grad():
        counted = counted_flops(lambda: model(tokens, use_cache=False))
    spec = calc.from_hf_config(config)
    assert forward_flops(spec, t).total * t == pytest.approx(counted, rel=1e-12)


def test_flop_components_by_hand():
    s = calc.preset("mixtral-8x7b")
    f = forward_flops(s, 4096)
    d, L = 4096, 32
    assert f.qkv == 2 * L * d * (4096 + 2 * 1024)
    assert f.attn_scores == f.attn_values == 2 * L * 4096 * 4096
    assert f.experts == 2 * L * 2 * 3 * d * 14336
    assert f.router == 2 * L * d * 8 and f.lm_head == 2 * d * 32000
    assert training_flops_per_token(s, 4096) == 3 * f.total
    assert training_flops_per_token(s, 4096, "full") == 4 * f.total - f.lm_head
    # Forward FLOPs of the matmuls with weights are 2 x the active parameters they touch.
    count = count_params(s)
    weight_flops = f.total - f.attn_scores - f.attn_values
    assert weight_flops == 2 * (count.active - count.embedding - count.norms)


def test_run_estimate_and_mfu():
    run = calc.RunEstimate(flops=8e21, gpus=1000, device_flops=800e12, mfu=0.5)
    assert run.seconds == pytest.approx(20_000)
    assert calc.mfu(6e9, 1e6, 8, 1e15) == pytest.approx(0.75)
    assert calc.measured_device_flops("NVIDIA H100 80GB HBM3") == 798e12
    assert calc.measured_device_flops("NVIDIA A100") is None
    with pytest.raises(ValueError, match="mfu"):
        calc.RunEstimate(flops=1.0, gpus=1, device_flops=1.0, mfu=1.5)
    with pytest.raises(ValueError, match="seq_len"):
        forward_flops(REF_SPECS["dense"], 0)


# ---- memory: every term -------------------------------------------------------------------


def _adam_state_bytes(opt: torch.optim.Optimizer) -> int:
    # AdamW's per-parameter "step" is a 0-d counter, not a state the size of the parameter.
    return sum(v.nbytes for st in opt.state.values() for v in st.values() if v.dim())


@pytest.mark.parametrize(
    ("precision", "optimizer"),
    [("fp32", "adamw"), ("bf16", "adamw"), ("bf16-mixed", "adamw"), ("fp32", "sgd-momentum")],
)
def test_static_terms_match_real_tensors(precision, optimizer):
    spec, b, t = REF_SPECS["moe-mixed"], 2, 8  # tied embeddings: counted once
    torch.manual_seed(0)
    model = RefLM(spec).to(torch.float32 if precision == "fp32" else torch.bfloat16)
    params = list(model.parameters())
    # bf16-mixed: the optimizer steps an fp32 master copy; the model holds bf16.
    stepped = (
        [p.detach().float().requires_grad_() for p in params]
        if precision == "bf16-mixed"
        else params
    )
    opt = (
        torch.optim.AdamW(stepped)
        if optimizer == "adamw"
        else torch.optim.SGD(stepped, lr=0.1, momentum=0.9)
    )
    ref_loss(model, torch.randint(0, spec.vocab, (b, t))).backward()
    for master, p in zip(stepped, params):
        master.grad = p.grad.float() if master is not p else p.grad
    opt.step()
    mem = training_memory(
        spec,
        Parallel(),
        TrainSetup(micro_batch=b, seq_len=t, precision=precision, optimizer=optimizer),
    )
    assert mem.weights == sum(p.nbytes for p in params)
    assert mem.gradients == sum(p.grad.nbytes for p in params)
    master_bytes = sum(p.nbytes for p in stepped) if precision == "bf16-mixed" else 0
    assert mem.optimizer_states == _adam_state_bytes(opt) + master_bytes
    expected_temp = sum(p.nbytes for p in stepped) if optimizer == "adamw" else 0
    assert mem.optimizer_step == expected_temp


@pytest.mark.parametrize("name", sorted(REF_SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_match_saved_tensors(name, dtype):
    spec, b, t = REF_SPECS[name], 2, 64
    torch.manual_seed(0)
    model = RefLM(spec).to(dtype)
    tokens = torch.randint(0, spec.vocab, (b, t))
    saved = saved_bytes(model, lambda: ref_loss(model, tokens))
    precision = "fp32" if dtype == torch.float32 else "bf16"
    mem = training_memory(
        spec, REF_PARALLEL, TrainSetup(micro_batch=b, seq_len=t, precision=precision)
    )
    # What is left out: RoPE tables, top-k indices, fp32 1/rms per token, and the
    # router's fp32 input copy is counted even where the input already is fp32.
    assert mem.activations == pytest.approx(saved, rel=0.10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_math_attention_keeps_the_probabilities(dtype):
    """Under torch's math SDPA kernel the S x S probabilities (fp32) are saved; the
    "fused" estimate must then be far off and the "math" one close."""
    spec, b, t = REF_SPECS["moe-gqa"], 2, 256
    torch.manual_seed(0)
    model = RefLM(spec).to(dtype)
    tokens = torch.randint(0, spec.vocab, (b, t))
    with sdpa_kernel(SDPBackend.MATH):
        saved = saved_bytes(model, lambda: ref_loss(model, tokens))
    precision = "fp32" if dtype == torch.float32 else "bf16"
    est = {
        kernel: training_memory(
            spec,
            REF_PARALLEL,
            TrainSetup(micro_batch=b, seq_len=t, precision=precision, attention=kernel),
        ).activations
        for kernel in ("fused", "math")
    }
    assert est["math"] == pytest.approx(saved, rel=0.10)
    assert est["fused"] < 0.7 * saved


@pytest.mark.parametrize("keep_grads", [True, False])
@pytest.mark.parametrize("name", ["moe-gqa", "dense"])
def test_training_peak_matches_cpu_allocator(name, keep_grads):
    """The whole estimate against the CPU allocator's trace of a steady-state step
    (second step: optimizer states exist), gradients kept as DDP keeps them or set to
    None between steps."""
    spec, b, t = REF_SPECS[name], 2, 128
    torch.manual_seed(0)
    model = RefLM(spec).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), foreach=True)  # the CUDA default
    tokens = torch.randint(0, spec.vocab, (b, t))

    def step():
        opt.zero_grad(set_to_none=not keep_grads)
        ref_loss(model, tokens).backward()
        opt.step()

    step()
    grads = sum(p.grad.nbytes for p in model.parameters())
    resident = sum(p.nbytes for p in model.parameters()) + _adam_state_bytes(opt)
    resident += grads if keep_grads else 0
    peak = cpu_step_peak(step)
    setup = TrainSetup(micro_batch=b, seq_len=t, precision="bf16", keep_grads=keep_grads)
    mem = training_memory(spec, REF_PARALLEL, setup)
    assert mem.weights + mem.gradients * keep_grads + mem.optimizer_states == resident
    assert mem.gradients == grads
    assert mem.peak == pytest.approx(resident + peak, rel=0.15)


MOE = ModelSpec(
    hidden=64,
    layers=4,
    heads=4,
    vocab=100,
    ffn=96,
    num_experts=8,
    top_k=2,
    moe_ffn=32,
    first_dense_layers=1,
)


def _split(spec: ModelSpec) -> tuple[int, int]:
    count = count_params(spec)
    return count.total - count.experts, count.experts


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_shards_each_term_over_its_replicas(zero):
    """dp=8, ep=4: every expert shard has 2 replicas; ZeRO stage z shards the
    optimizer (z>=1), gradients (z>=2) and weights (z=3) of every parameter over its
    replicas, so the shards of all 8 ranks hold each element exactly once."""
    par = Parallel(dp=8, ep=4, zero_stage=zero)
    setup = TrainSetup(seq_len=16)
    mem = training_memory(MOE, par, setup)
    dense, experts = _split(MOE)
    replicated = dense + experts / 4  # per GPU without ZeRO
    total = dense + experts
    assert mem.weights == round((total / 8 if zero == 3 else replicated) * 2)
    assert mem.gradients == round((total / 8 if zero >= 2 else replicated) * 2)
    assert mem.optimizer_states == round((total / 8 if zero >= 1 else replicated) * 12)


def test_tensor_parallel_splits_matrices_not_norms_or_router():
    dense, experts = _split(MOE)
    count = count_params(MOE)
    replicated = count.norms + count.router
    mem = training_memory(MOE, Parallel(tp=2), TrainSetup(precision="fp32", seq_len=16))
    assert mem.weights == round(((dense - replicated) / 2 + replicated + experts / 2) * 4)


def test_pipeline_stages_partition_the_model():
    par = Parallel(pp=3)
    assert [list(r) for r in par.stage_layers(4)] == [[0, 1], [2], [3]]
    from adaptive_moe.calc.memory import _stage_params

    for spec in (MOE, dataclasses.replace(MOE, tied_embeddings=True)):
        stages = sum(_stage_params(spec, par, s).total for s in range(3))
        copy = count_params(spec).embedding if spec.tied_embeddings else 0  # last stage's
        assert stages == count_params(spec).total + copy


def test_pipeline_first_stage_holds_pp_micro_batches():
    spec = REF_SPECS["dense"]
    setup = TrainSetup(seq_len=64)
    one = training_memory(spec, Parallel(), setup)
    two = training_memory(spec, Parallel(pp=2), setup)
    assert two.stage == 0
    head = 64 * (2 * 2 * spec.hidden + 4 * spec.vocab)  # final norm + fp32 log-probs
    assert two.activations == one.activations - head  # 2 in flight x half the blocks


def test_checkpointing_keeps_block_inputs_and_recomputes_one_block():
    spec, t = REF_SPECS["dense"], 64
    plain = training_memory(spec, Parallel(), TrainSetup(seq_len=t))
    ckpt = training_memory(spec, Parallel(), TrainSetup(seq_len=t, checkpointing="full"))
    head = t * (2 * 2 * spec.hidden + 4 * spec.vocab)
    assert ckpt.activations == spec.layers * t * 2 * spec.hidden + head
    block = (plain.activations - head) / spec.layers
    assert ckpt.working == round(plain.working + block)


def test_expert_strategy_communication():
    """ep=8 over E=8... 4 experts: s = 2, r in {0, 1, 2}."""
    spec = dataclasses.replace(MOE, num_experts=4)
    t, d, k, b = 16, spec.hidden, spec.top_k, 2
    expert = 3 * d * spec.moe_ffn
    comm = {
        r: training_memory(
            spec, Parallel(dp=8, ep=8, expert_r=r), TrainSetup(seq_len=t)
        ).communication
        for r in (0, 1, 2)
    }
    assert comm[0] == 2 * 4 * expert * b  # every expert gathered, and its gradient
    assert comm[1] == 2 * expert * b + 2 * k * t * d * b  # whole local expert + a2a
    assert comm[2] == 2 * 2 * k * t * d * b  # no gather; tokens sent to both slices
    with pytest.raises(ValueError, match="expert_r=3"):
        training_memory(spec, Parallel(dp=8, ep=8, expert_r=3), TrainSetup())


@pytest.mark.parametrize(
    ("par", "match"),
    [
        (dict(dp=4, ep=3), "ep=3 must divide dp=4"),
        (dict(dp=6, ep=6), "num_experts=8"),
        (dict(tp=3), "tp=3 must divide heads=4"),
        (dict(pp=5), "pp=5"),
        (dict(zero_stage=4), "zero_stage"),
        (dict(dp=0), "dp"),
    ],
)
def test_parallel_rejects_bad_layouts(par, match):
    with pytest.raises(ValueError, match=match):
        training_memory(MOE, Parallel(**par), TrainSetup())


def test_tensor_parallel_must_split_ffn_widths():
    with pytest.raises(ValueError, match="tp=2 must divide ffn=95"):
        training_memory(dataclasses.replace(MOE, ffn=95), Parallel(tp=2), TrainSetup())
    with pytest.raises(ValueError, match="tp=4 must divide moe_ffn=34"):
        training_memory(dataclasses.replace(MOE, moe_ffn=34), Parallel(tp=4), TrainSetup())


def test_train_setup_rejects_bad_values():
    for kwargs, field in (
        (dict(precision="fp16"), "precision"),
        (dict(optimizer="adam"), "optimizer"),
        (dict(micro_batch=0), "micro_batch"),
        (dict(capacity_factor=0.5), "capacity_factor"),
        (dict(checkpointing="some"), "checkpointing"),
        (dict(attention="flash"), "attention"),
        (dict(keep_grads=0), "keep_grads"),
    ):
        with pytest.raises(ValueError, match=field):
            TrainSetup(**kwargs)
    with pytest.raises(ValueError, match="ep=2 needs an MoE model"):
        training_memory(REF_SPECS["dense"], Parallel(dp=2, ep=2), TrainSetup())


def test_fits_boundary():
    mem = training_memory(MOE, Parallel(), TrainSetup(seq_len=16))
    assert mem.fits(mem.peak / GIB) and not mem.fits(mem.peak / GIB * (1 - 1e-9))


# ---- layer_memory (the profiler's question) ----------------------------------------------


def _layer(**kw):
    base = dict(
        d_model=64,
        d_ff=96,
        num_experts=2,
        top_k=2,
        glu=True,
        dtype_bytes=2,
        tokens=100,
        world=8,
        strategy=Strategy(r=1),
    )
    return layer_memory(**{**base, **kw})


def test_layer_memory_terms():
    d, h, k, t, b = 64, 96, 2, 100, 2
    expert = 3 * d * h
    # E=2 over W=8: s = 4 ranks per expert, each storing h/4.
    assert _layer().weights == 2 * expert // 8 * b
    dp = _layer(strategy=Strategy(r=0))
    assert (dp.gathered_weights, dp.gathered_grads, dp.a2a_buffers) == (2 * expert * b,) * 2 + (0,)
    for r in (1, 2, 4):
        m = _layer(strategy=Strategy(r=r))
        assert m.gathered_weights == m.gathered_grads == (expert // r * b if r < 4 else 0)
        assert m.a2a_buffers == 2 * r * k * t * d * b
        rows = r * k * t
        assert m.activations == t * (d + 2) * 4 + rows * (3 * d + 4 * h // r) * b  # loop
        assert m.peak == m.activations + m.transient
    assert _layer(strategy=Strategy(r=1, a2a="2dh")).a2a_buffers == 3 * k * t * d * b
    act = {
        kernel: _layer(strategy=Strategy(r=0, kernel=kernel)).activations
        for kernel in ("scatter", "grouped_mm", "loop", "bmm")
    }
    rows, act_gate = k * t * d * b, k * t * h * b
    # n_in d-wide row copies 0 / 1 / 2 / 3; "loop" runs torch's activation (+ act(gate));
    # scatter and grouped_mm rebuild the product in backward, loop and bmm keep it
    assert [act[n] - act["scatter"] for n in ("grouped_mm", "loop", "bmm")] == [
        rows,
        2 * rows + 2 * act_gate,
        3 * rows + act_gate,
    ]
    unfused = _layer(strategy=Strategy(r=0, kernel="bmm"), fused_activation=False)
    assert unfused.activations - act["bmm"] == act_gate
    plain = _layer(strategy=Strategy(r=0, kernel="bmm"), glu=False)
    assert (
        plain.activations
        == _layer(
            strategy=Strategy(r=0, kernel="bmm"), glu=False, fused_activation=False
        ).activations
    )  # without GLU both keep the linear's output and the activation's
    # The local path (one rank) reads token rows in place; an exchange receives a copy.
    one = dict(world=1, num_experts=2, strategy=Strategy(r=1, kernel="scatter"))
    assert (
        _layer(**one).activations + rows
        == _layer(**{**one, "strategy": Strategy(r=1, kernel="grouped_mm")}).activations
    )
    alone = _layer(world=1, num_experts=4)
    assert alone.transient == 0 and alone.weights == 4 * expert * b


def test_layer_memory_rejects_bad_input():
    with pytest.raises(ValueError, match="r=3"):
        _layer(strategy=Strategy(r=3))
    with pytest.raises(ValueError, match="num_experts=3"):
        _layer(num_experts=3)
    with pytest.raises(ValueError, match="tokens"):
        _layer(tokens=-1)
    with pytest.raises(ValueError, match="capacity_factor"):
        _layer(capacity_factor=0.9)


@pytest.mark.parametrize("kernel", ["loop", "bmm"])
@pytest.mark.parametrize("glu", [True, False])
def test_layer_memory_activations_match_package_layer(kernel, glu):
    """The package's MoELayer (one process, fp32) against ``layer_memory``; bmm pads every
    expert to the busiest, which the capacity factor (busiest / mean rows) describes."""
    import warnings

    from adaptive_moe.runtime.layer import MoELayer

    d, h, e, k, t = 64, 96, 8, 2, 256
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = MoELayer(d, h, e, top_k=k, glu=glu, dtype=torch.float32)
    x = torch.randn(t, d, requires_grad=True)
    strategy = Strategy(kernel=kernel)
    saved = saved_bytes(layer, lambda: layer(x, strategy=strategy))
    counts = torch.bincount(layer.router(x).topk_ids.flatten(), minlength=e)
    busiest = counts.max().item() / counts.float().mean().item() if kernel == "bmm" else 1.0
    est = layer_memory(
        d_model=d,
        d_ff=h,
        num_experts=e,
        top_k=k,
        glu=glu,
        dtype_bytes=4,
        tokens=t,
        world=1,
        strategy=strategy,
        capacity_factor=busiest,
        fused_activation=False,  # torch's activation on CPU
    )
    # Here the router's fp32 input copy is x itself (fp32), which the count includes.
    assert est.activations == pytest.approx(saved, rel=0.10)


# ---- inference ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_kv_cache_matches_transformers_cache(name):
    config, b, t = TINY_CONFIGS[name], 2, 10
    torch.manual_seed(0)
    model = _hf_model(config, device="cpu").eval()
    with torch.no_grad():
        out = model(torch.randint(0, config["vocab_size"], (b, t)), use_cache=True)
    cache = out.past_key_values
    cached = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    spec = calc.from_hf_config(config)
    mem = inference_memory(spec, Parallel(), InferSetup(batch=b, seq_len=t, kv_dtype="fp32"))
    assert mem.kv_cache == cached


def test_inference_weights_and_tp_kv_split():
    spec = calc.preset("mixtral-8x7b")
    one = inference_memory(spec, Parallel(), InferSetup(batch=1, seq_len=4096))
    assert one.weights == count_params(spec).total * 2
    assert one.kv_cache == 4096 * 32 * 2 * 8 * 128 * 2
    eight = inference_memory(spec, Parallel(tp=8), InferSetup(batch=1, seq_len=4096))
    assert eight.kv_cache == one.kv_cache // 8  # 8 kv heads, one per rank
    sixteen = inference_memory(spec, Parallel(tp=16), InferSetup(batch=1, seq_len=4096))
    assert sixteen.kv_cache == eight.kv_cache  # a kv head cannot be split: replicated
    ds = calc.preset("deepseek-v3")
    mla = inference_memory(ds, Parallel(tp=8, ep=1), InferSetup(seq_len=1000, kv_dtype="fp8"))
    assert mla.kv_cache == 1000 * 61 * (512 + 64)  # the compressed latent, on every rank


# ---- the command line ---------------------------------------------------------------------


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["calc", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_params_table_and_json(capsys):
    rc, out, _ = _cli(capsys, "params", "--preset", "mixtral-8x7b")
    assert rc == 0 and "46.70 B" in out and "46,702,792,704" in out and "12.88 B" in out
    rc, out, _ = _cli(capsys, "params", "--config", str(FIXTURES / "deepseek-v3.json"), "--json")
    data = json.loads(out)
    assert data["params"] == count_params(calc.preset("deepseek-v3")).to_dict()
    assert data["model"]["mla"]["kv_lora_rank"] == 512


def test_cli_model_from_flags_and_overrides(capsys):
    rc, out, _ = _cli(
        capsys,
        "params",
        "--layers",
        "2",
        "--hidden",
        "64",
        "--heads",
        "4",
        "--vocab",
        "100",
        "--ffn-mult",
        "2.5",
        "--mlp-linears",
        "2",
        "--experts",
        "4",
        "--top-k",
        "1",
        "--json",
    )
    spec = ModelSpec(
        hidden=64, layers=2, heads=4, vocab=100, ffn=160, glu=False, num_experts=4, top_k=1
    )
    assert rc == 0 and json.loads(out)["params"]["total"] == count_params(spec).total
    rc, out, _ = _cli(capsys, "params", "--preset", "mixtral-8x7b", "--layers", "16", "--json")
    half = dataclasses.replace(calc.preset("mixtral-8x7b"), layers=16)
    assert json.loads(out)["params"]["total"] == count_params(half).total


def test_cli_per_layer_experts(capsys):
    flags = "--layers 4 --hidden 32 --heads 4 --vocab 64 --ffn 64 --moe-ffn 24 --top-k 2"
    rc, out, _ = _cli(
        capsys,
        "params",
        *flags.split(),
        "--experts-per-layer",
        "0,2,4,8",
        "--shared-experts-per-layer",
        "0,1,0,2",
        "--shared-ffn",
        "16",
        "--json",
    )
    spec = dataclasses.replace(REF_SPECS["pyramid"], shared_expert_gate=False)
    assert rc == 0 and json.loads(out)["params"] == count_params(spec).to_dict()
    # On a preset the tuple replaces its MoE-layer rule (DeepSeek-V3: 3 dense first).
    per_layer = ",".join(["0"] * 30 + ["256"] * 31)
    rc, out, _ = _cli(
        capsys, "params", "--preset", "deepseek-v3", "--experts-per-layer", per_layer, "--json"
    )
    assert rc == 0 and json.loads(out)["model"]["first_dense_layers"] == 0
    rc, _, err = _cli(capsys, "params", *flags.split(), "--experts-per-layer", "0,2")
    assert rc == 2 and "one entry per layer" in err


def test_cli_flops(capsys):
    rc, out, _ = _cli(
        capsys,
        "flops",
        "--preset",
        "olmoe-1b-7b",
        "--seq-len",
        "2048",
        "--tokens",
        "1e12",
        "--device-tflops",
        "800",
        "--gpus",
        "64",
        "--tokens-per-second",
        "2e6",
        "--json",
    )
    data = json.loads(out)["flops"]
    train = training_flops_per_token(calc.preset("olmoe-1b-7b"), 2048)
    assert rc == 0 and data["training_per_token"] == train
    assert data["seconds"] == pytest.approx(train * 1e12 / (64 * 800e12 * 0.4))
    assert data["mfu"] == pytest.approx(train * 2e6 / (64 * 800e12))
    rc, out, _ = _cli(
        capsys, "flops", "--preset", "olmoe-1b-7b", "--tokens", "1e9", "--device-tflops", "800"
    )
    assert rc == 0 and "GFLOP" in out and "estimated time" in out and "full S x S" in out


def test_cli_mem(capsys):
    rc, out, _ = _cli(
        capsys,
        "mem",
        "--preset",
        "deepseek-v3",
        "--dp",
        "8",
        "--ep",
        "8",
        "--zero",
        "1",
        "--gpu-mem-gib",
        "80",
    )
    assert rc == 0 and "does NOT fit on 80 GiB" in out and "GiB" in out
    rc, out, _ = _cli(
        capsys,
        "mem",
        "--preset",
        "olmoe-1b-7b",
        "--seq-len",
        "1024",
        "--checkpointing",
        "full",
        "--json",
    )
    data = json.loads(out)["mem"]
    mem = training_memory(
        calc.preset("olmoe-1b-7b"), Parallel(), TrainSetup(seq_len=1024, checkpointing="full")
    )
    assert data["peak"] == mem.peak and data["fits"] is mem.fits(80)
    flags = ("--preset", "olmoe-1b-7b", "--no-keep-grads", "--attention", "math", "--json")
    rc, out, _ = _cli(capsys, "mem", *flags)
    data = json.loads(out)["mem"]
    setup = TrainSetup(keep_grads=False, attention="math")
    assert data["setup"]["keep_grads"] is False and data["setup"]["attention"] == "math"
    assert data["peak"] == training_memory(calc.preset("olmoe-1b-7b"), Parallel(), setup).peak
    rc, out, _ = _cli(
        capsys,
        "mem",
        "--preset",
        "olmoe-1b-7b",
        "--mode",
        "infer",
        "--batch",
        "4",
        "--seq-len",
        "1024",
    )
    assert rc == 0 and "KV cache" in out and "fits on 80 GiB: yes" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["mem", "--preset", "mixtral-8x7b", "--dp", "0"],
        ["mem", "--preset", "mixtral-8x7b", "--zero", "4"],
        ["params", "--preset", "gpt-5"],
        ["params", "--preset", "mixtral-8x7b", "--ffn", "10", "--ffn-mult", "2"],
        ["params", "--preset", "mixtral-8x7b", "--config", "x.json"],
        ["flops", "--preset", "mixtral-8x7b", "--seq-len", "1.5"],
        [],
    ],
)
def test_cli_rejects_bad_flags(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(["calc", *argv])
    assert exc.value.code == 2


def test_cli_reports_inconsistent_models(capsys, tmp_path):
    rc, _, err = _cli(capsys, "params", "--hidden", "64")
    assert rc == 2 and "--layers" in err and "--vocab" in err
    rc, _, err = _cli(capsys, "mem", "--preset", "mixtral-8x7b", "--tp", "3")
    assert rc == 2 and "tp=3 must divide heads=32" in err
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "bert"}))
    rc, _, err = _cli(capsys, "params", "--config", str(path))
    assert rc == 2 and "'bert' is not supported" in err


# ---- the package's own model --------------------------------------------------------------


@pytest.mark.parametrize("moe_every", [1, 2])
def test_flops_within_2pct_of_package_model(moe_every):
    model_mod = pytest.importorskip("adaptive_moe.training.model")
    import warnings

    cfg = model_mod.ModelConfig(
        vocab_size=128,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=96,
        num_experts=4,
        top_k=2,
        moe_d_ff=48,
        moe_every=moe_every,
        max_seq_len=32,
        tie_embeddings=False,
    )
    b, t = 2, 32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no strategy table: the default strategy runs
        model = model_mod.MoETransformer(cfg)
        tokens = torch.randint(0, cfg.vocab_size, (b, t))
        with torch.no_grad():
            counted = counted_flops(lambda: model(tokens))
    spec = cfg.calc_spec()
    assert count_params(spec).total == sum(p.numel() for p in model.parameters())
    # The counter also sees the gated combine (a [1, k] x [k, d] product per token).
    assert forward_flops(spec, t).total * b * t == pytest.approx(counted, rel=0.02)


@pytest.mark.gpu
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "flags", [[], ["--set-to-none"], ["--dtype", "fp32"]], ids=["bf16", "set-to-none", "fp32"]
)
def test_training_memory_within_15pct_on_gpu(flags):
    """benchmarks/calc_memory_check.py's measurement of the package's model on CUDA."""
    from benchmarks import calc_memory_check as check

    assert check.main(["--only", "mixtral-like", "--only", "fine", *flags]) == 0

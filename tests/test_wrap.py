"""adaptive_moe.wrap / unwrap against the original transformers-5 models.

Reference: the same transformers model, unwrapped (its own per-expert loop), with the
same weights and input. fp32 tolerance: logits and every gradient (input embeddings,
every expert weight, router, shared expert and every dense parameter) within 1e-5 of the
largest magnitude of the reference tensor. The distributed runs (2 and 4 gloo ranks, each
rank running its slice of the global batch) are compared with one single-process run of
the whole global batch: logits and input-embedding gradients concatenated over ranks,
expert gradients reassembled from the ranks' shards into NaN-poisoned full tensors (a
missing or misplaced shard fails), replicated gradients summed over ranks. bf16 models:
logits within 3e-2 (the MoELayer's router runs in fp32, Mixtral's and Qwen's in bf16).
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import adaptive_moe as am  # noqa: E402
from adaptive_moe import unwrap, wrap  # noqa: E402
from adaptive_moe.integrations.transformers import (  # noqa: E402
    EXPERT_TENSORS,
    WrappedMoEBlock,
    export_state_dict,
)
from adaptive_moe.tuning.table import StrategyTable  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:MoELayer has no strategy table")

TOL = 1e-5  # fp32
VOCAB, BATCH, SEQ = 96, 2, 8
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    attn_implementation="eager",
)
_DEEPSEEK_ATTN = dict(
    num_key_value_heads=4,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
)
# family -> (config class, config fields, MoE layers, records router logits for aux loss)
FAMILIES = {
    "mixtral": (
        "MixtralConfig",
        dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
        2,
        True,
    ),
    "mixtral_gelu": (
        "MixtralConfig",
        dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, hidden_act="gelu"),
        2,
        True,
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
        2,
        True,
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            intermediate_size=64,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            norm_topk_prob=True,
        ),
        2,
        True,
    ),
    "qwen3_moe_unnormalised": (
        "Qwen3MoeConfig",
        dict(
            intermediate_size=64,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            norm_topk_prob=False,
        ),
        2,
        True,
    ),
    "olmoe": (
        "OlmoeConfig",
        dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
        2,
        True,
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            _DEEPSEEK_ATTN,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            intermediate_size=64,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
        ),
        2,
        False,
    ),
    # Not named by wrap anywhere: the generic path (sigmoid, groups, shared experts).
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(
            intermediate_size=64,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=0,
            routed_scaling_factor=1.5,
            norm_topk_prob=True,
            head_dim=8,
        ),
        2,
        False,
    ),
}


def build_model(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random fp32 model; DeepSeek-style routers get a nonzero score bias."""
    cls_name, fields, _, _ = FAMILIES[family]
    config = getattr(transformers, cls_name)(**{**_COMMON, **fields, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.05 * torch.randn(bias.shape, generator=gen))
    return model.eval()


def batch(rows: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [rows, SEQ] and a fixed random probe of the logits [rows, SEQ, V]."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
    return ids, torch.randn(rows, SEQ, VOCAB, generator=gen)


def forward_backward(model, ids, probe, with_aux):
    """loss = <logits, probe> (+ the model's aux loss); returns (output, d loss / d embeds)."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    kw = {"output_router_logits": True} if with_aux else {}
    out = model(inputs_embeds=embeds, **kw)
    loss = (out.logits * probe).sum()
    if with_aux:
        loss = loss + out.aux_loss
    loss.backward()
    return out, embeds.grad


def wrapped_blocks(model) -> dict[str, WrappedMoEBlock]:
    return {n: m for n, m in model.named_modules() if isinstance(m, WrappedMoEBlock)}


def grads_by_original_name(model) -> dict[str, torch.Tensor]:
    """Every parameter gradient of a wrapped model, under the original model's names."""
    blocks = wrapped_blocks(model)
    grads = {
        name: p.grad
        for name, p in model.named_parameters()
        if not any(name.startswith(path + ".") for path in blocks)
    }
    for path, block in blocks.items():
        params = dict(block.moe.named_parameters())
        for theirs, ours in block.spec.names:
            if ours in params:
                grads[f"{path}.{theirs}"] = params[ours].grad
    return grads


def assert_close(got, want, what, tol=TOL):
    assert got is not None, f"{what}: no value"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=tol * scale, msg=lambda m: f"{what}: {m}")


# ---- single process ------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_wrapped_model_matches_original(family):
    _, _, moe_layers, with_aux = FAMILIES[family]
    ref = build_model(family)
    model = copy.deepcopy(ref)
    wrap(model)
    assert len(wrapped_blocks(model)) == moe_layers
    ids, probe = batch(BATCH)
    want, want_embed_grad = forward_backward(ref, ids, probe, with_aux)
    got, got_embed_grad = forward_backward(model, ids, probe, with_aux)

    assert_close(got.logits, want.logits, "logits")
    assert_close(got_embed_grad, want_embed_grad, "input-embedding grad")
    if with_aux:  # router logits reach transformers' recorder through the wrapper
        assert len(got.router_logits) == moe_layers
        for g, w in zip(got.router_logits, want.router_logits):
            assert_close(g, w.float(), "router logits")
        assert_close(got.aux_loss, want.aux_loss, "aux loss")
    grads = grads_by_original_name(model)
    ref_params = dict(ref.named_parameters())
    assert grads.keys() == ref_params.keys()
    for name, p in ref_params.items():
        if p.grad is None:  # the embedding table: the test feeds embeddings directly
            assert grads[name] is None, name
            continue
        assert_close(grads[name], p.grad, f"grad of {name}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_unwrap_round_trip_restores_the_original_modules_and_state(family):
    model = build_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = {n: m for n, m in model.named_modules() if hasattr(m, "experts")}
    wrap(model)
    # A wrapped model presents the original names and layout (save_pretrained, DCP).
    wrapped = model.state_dict()
    assert wrapped.keys() == before.keys()
    assert all(torch.equal(wrapped[k], v) for k, v in before.items())
    unwrap(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    for path, block in blocks.items():
        assert model.get_submodule(path) is block  # the same module object, hooks and all
    assert not any(t.is_meta for t in after.values())


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_trained_wrapped_model_exports_to_plain_transformers(family, tmp_path):
    model = build_model(family)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids, _ = batch(BATCH)
    model.train()
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    live = export_state_dict(model)  # while still wrapped
    model.save_pretrained(tmp_path / "live", state_dict=live)
    unwrap(model)
    exported = model.state_dict()
    assert live.keys() == exported.keys()
    assert all(torch.equal(live[k], v) for k, v in exported.items())
    changed = [k for k, v in exported.items() if "experts" in k and not torch.equal(v, initial[k])]
    assert changed, "training did not move the expert weights: the export check would be vacuous"
    with torch.no_grad():
        assert_close(model(ids).logits, trained, "logits after unwrap")
    model.save_pretrained(tmp_path / "unwrapped")
    for saved in ("live", "unwrapped"):
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / saved, attn_implementation="eager"
        )
        assert type(reloaded) is type(model)
        state = reloaded.state_dict()
        assert state.keys() == exported.keys()
        for key, value in exported.items():
            assert torch.equal(state[key], value), f"{saved}: {key}"
        with torch.no_grad():
            assert_close(reloaded.eval()(ids).logits, trained, f"logits after {saved} save/load")


def test_wrap_drops_the_original_block_tensors():
    model = build_model("qwen2_moe")
    originals = {n: weakref.ref(p) for n, p in model.named_parameters() if ".mlp." in n}
    assert any(".experts." in n for n in originals)
    wrap(model)
    gc.collect()
    assert [n for n, ref in originals.items() if ref() is not None] == []
    assert not any(p.is_meta for p in model.parameters())


def test_router_logits_recorded_once_when_recording_began_before_wrap():
    ref = build_model("mixtral")
    model = copy.deepcopy(ref)
    ids, _ = batch(BATCH)
    model(ids, output_router_logits=True)  # transformers installs its hooks on the routers now
    wrap(model)
    with torch.no_grad():
        got, want = model(ids, output_router_logits=True), ref(ids, output_router_logits=True)
    assert len(got.router_logits) == len(want.router_logits) == 2
    assert_close(got.aux_loss, want.aux_loss, "aux loss")


def test_model_without_moe_block_raises():
    config = transformers.LlamaConfig(**{**_COMMON, "intermediate_size": 64})
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="LlamaForCausalLM has no MoE block"):
        wrap(model)


class ListOfExpertsMoE(nn.Module):
    """An MoE block of a kind wrap does not know: experts as a ModuleList of MLPs."""

    def __init__(self, d: int, num_experts: int):
        super().__init__()
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(num_experts))

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        top = self.gate(tokens).argmax(-1)
        return torch.stack([self.experts[int(e)](t) for t, e in zip(tokens, top)]).view_as(x)


def _list_of_experts(model):
    model.model.layers[1].mlp = ListOfExpertsMoE(32, 4)
    return "model.layers.1.mlp (ListOfExpertsMoE)", "no stacked 3-D gate_up_proj"


def _router_without_renormalisation(model):
    gate = model.model.layers[0].mlp.gate

    class SkipsRenormalisation(type(gate)):
        def forward(self, hidden_states):
            logits = nn.functional.linear(hidden_states, self.weight)
            top, ids = logits.softmax(-1).topk(self.top_k, dim=-1)
            return logits, top, ids

    gate.__class__ = SkipsRenormalisation
    return "model.layers.0.mlp (MixtralSparseMoeBlock)", "does not route like the rule"


@pytest.mark.parametrize(
    "case,overrides",
    [
        (_list_of_experts, {}),
        (_router_without_renormalisation, {}),
        (None, {"hidden_act": "gelu_pytorch_tanh"}),
        (None, {"router_jitter_noise": 0.1}),
    ],
)
def test_blocks_that_cannot_be_wrapped_exactly_are_reported(case, overrides):
    model = build_model("mixtral", **overrides)
    where, why = case(model) if case else ("model.layers.0.mlp (MixtralSparseMoeBlock)", None)
    why = why or ("is none of the supported" if "hidden_act" in overrides else "jitter noise")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        wrap(model)
    assert where in str(info.value) and why in str(info.value), str(info.value)
    assert not wrapped_blocks(model), "a failed wrap must leave the model unchanged"
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "attr,value,valid",
    [
        ("norm_topk_prob", "false", "true or false"),
        ("norm_topk_prob", 1, "true or false"),
        ("n_group", 2.5, "an integer >= 1"),
        ("routed_scaling_factor", float("nan"), "a finite number"),
    ],
)
def test_router_attributes_with_invalid_values_are_named(attr, value, valid):
    model = build_model("qwen2_moe")
    setattr(model.model.layers[0].mlp.gate, attr, value)
    with pytest.raises(ValueError, match=rf"{attr}={value!r} is invalid: it must be {valid}"):
        wrap(model)
    assert not wrapped_blocks(model)


def test_failed_wrap_puts_the_blocks_already_replaced_back():
    model = build_model("mixtral")
    other = build_model("mixtral", num_local_experts=8)
    model.model.layers[1].mlp = other.model.layers[1].mlp  # a second, different layer shape
    blocks = [layer.mlp for layer in model.model.layers]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = am.MoELayer(32, 64, 4, top_k=2)  # the shape of layer 0 only
    table = StrategyTable(probe.fingerprint(), probe.layer_shape())
    with pytest.raises(ValueError, match=r"cannot wrap model\.layers\.1\.mlp .*does not match"):
        wrap(model, table=table)
    assert [layer.mlp for layer in model.model.layers] == blocks  # layer 0 was put back
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_bf16_model_agrees_to_rounding(family):
    # Mixtral's and Qwen's routers compute logits in bf16, the MoELayer's in fp32: the
    # outputs agree to bf16 rounding (and to routing ties within it).
    ref = build_model(family).to(torch.bfloat16)
    model = wrap(copy.deepcopy(ref))
    ids, _ = batch(BATCH)
    with torch.no_grad():
        want, got = ref(ids).logits.float(), model(ids).logits.float()
    assert got.dtype == want.dtype
    assert_close(got, want, "bf16 logits", tol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_wrapped_model_matches_original_on_gpu(family, dtype, tol):
    # fp32: the GPU expert kernels may accumulate in another order, hence 1e-4; bf16: the
    # original routers (Mixtral, Qwen) compute their logits in bf16, the MoELayer in fp32.
    ref = build_model(family).to("cuda", dtype)
    model = wrap(copy.deepcopy(ref))
    ids, probe = (t.cuda() for t in batch(BATCH))
    want, want_embed_grad = forward_backward(ref, ids, probe.to(dtype), with_aux=False)
    got, got_embed_grad = forward_backward(model, ids, probe.to(dtype), with_aux=False)
    assert_close(got.logits.float(), want.logits.float(), "logits", tol=tol)
    assert_close(got_embed_grad.float(), want_embed_grad.float(), "input-embedding grad", tol=tol)
    grads = grads_by_original_name(model)
    for name, p in ref.named_parameters():
        if ".experts." in name:
            assert_close(grads[name].float(), p.grad.float(), f"grad of {name}", tol=tol)
    state = unwrap(model).state_dict()
    assert all(torch.equal(state[k], v) for k, v in ref.state_dict().items())


def _greedy(model, ids, n=6):
    return model.generate(ids, do_sample=False, min_new_tokens=n, max_new_tokens=n,
                          pad_token_id=0)  # fmt: skip


def test_wrap_passes_the_inference_config_to_every_layer():
    ref = build_model("qwen2_moe")
    model = wrap(copy.deepcopy(ref), inference=am.InferenceConfig(cuda_graph_tokens=2))
    layers = [b.moe for b in wrapped_blocks(model).values()]
    assert layers and all(m.inference.cuda_graph_tokens == 2 for m in layers)
    ids, _ = batch(1)
    with torch.no_grad():  # no GPU here: the graphs stay off, the answer the same
        assert torch.equal(_greedy(model, ids), _greedy(ref, ids))
    with pytest.raises(ValueError, match="cuda_graph_tokens"):
        wrap(build_model("qwen2_moe"), inference=am.InferenceConfig(cuda_graph_tokens=-1))


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_greedy_generate_with_cuda_graphs_matches_plain_on_gpu(family):
    """Batch-1 decode replays each layer's captured graph; greedy tokens as the original
    (fp32, so no tie flips under rounding)."""
    ref = build_model(family).to("cuda")
    model = wrap(copy.deepcopy(ref), inference=am.InferenceConfig(cuda_graph_tokens=1))
    ids = batch(1)[0].cuda()
    with torch.no_grad():
        want = _greedy(ref, ids, 8)
        assert torch.equal(_greedy(model, ids, 8), want)
        assert torch.equal(_greedy(model, ids, 8), want)  # replays, not only captures


def test_finetune_example_exports_a_model_plain_transformers_reloads(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "examples" / "finetune_transformers.py"
    spec = importlib.util.spec_from_file_location("finetune_transformers", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = [
        "--steps",
        "3",
        "--batch",
        "2",
        "--seq",
        "8",
        "--buckets",
        "1",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert example.main(argv) == 0  # 0 only when the reloaded logits match
    assert "(ok, tolerance" in capsys.readouterr().out
    assert (tmp_path / "config.json").is_file()


def test_core_package_does_not_import_transformers():
    root = Path(__file__).resolve().parents[1]
    code = (
        "import importlib, pkgutil, sys, adaptive_moe\n"
        "for m in pkgutil.walk_packages(adaptive_moe.__path__, 'adaptive_moe.'):\n"
        "    if not m.name.endswith(('__main__', 'integrations.transformers')):\n"
        "        importlib.import_module(m.name)\n"
        "assert 'transformers' not in sys.modules, 'the core package imported transformers'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=root, env=env)


def test_user_moe_layers_are_left_alone():
    model = build_model("olmoe")
    model.model.layers[0].mlp = am.MoELayer(32, 32, 8, top_k=2)
    wrap(model)
    assert list(wrapped_blocks(model)) == ["model.layers.1.mlp"]
    assert isinstance(model.model.layers[0].mlp, am.MoELayer)


# ---- distributed ---------------------------------------------------------------------------

# (family, config overrides): E >= W and E < W (Mixtral E=2 and Qwen2-MoE E=2 on 4 ranks).
DIST_CASES = {
    2: [("mixtral", {}), ("qwen2_moe", {}), ("qwen3_moe", {}), ("olmoe", {}), ("deepseek_v3", {})],
    4: [
        ("mixtral", {"num_local_experts": 2}),
        ("qwen2_moe", {"num_experts": 2}),
        ("qwen3_moe_unnormalised", {}),
        ("olmoe", {"num_experts": 4}),
        ("deepseek_v3", {}),
    ],
}


def _expert_param_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.endswith(EXPERT_TENSORS)]


def _portable(obj):
    """Tensors as numpy arrays: torch ships tensors between processes through shared
    memory handles, which die with the worker that made them."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().numpy()
    if isinstance(obj, dict):
        return {k: _portable(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_portable(v) for v in obj)
    return obj


def _tensor(value):
    return None if value is None else torch.from_numpy(value)


def _dist_worker(rank: int, world: int, cases):
    out = []
    for family, overrides in cases:
        model = build_model(family, **overrides)
        original = {k: v.clone() for k, v in model.state_dict().items()}
        params = dict(model.named_parameters())
        full_refs = [weakref.ref(params[n]) for n in _expert_param_names(model)]
        del params
        wrap(model)
        gc.collect()
        ids, probe = batch(BATCH * world)
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        res, embed_grad = forward_backward(model, ids[rows], probe[rows], with_aux=False)
        blocks = wrapped_blocks(model)
        grads = grads_by_original_name(model)
        shards = {
            f"{path}.{name}": (m.moe.local_experts, m.moe.local_hidden, grads.pop(f"{path}.{name}"))
            for path, m in blocks.items()
            for name in EXPERT_TENSORS
        }
        numel = sum(p.numel() for p in model.parameters())
        exported = export_state_dict(model)
        unwrap(model)
        restored = model.state_dict()
        same = all(
            state.keys() == original.keys()
            and all(torch.equal(state[k], v) for k, v in original.items())
            for state in (exported, restored)
        )
        out.append(
            _portable(
                {
                    "logits": res.logits,
                    "embed_grad": embed_grad,
                    "shards": shards,
                    "replicated": grads,
                    "numel": numel,
                    "freed": all(r() is None for r in full_refs),
                    "round_trip": same,
                }
            )
        )
    return out


def _assemble(name: str, full_shape, shards) -> torch.Tensor:
    """Full tensor from (local_experts, local_hidden, shard) of every rank; NaN where no
    rank wrote."""
    full = torch.full(full_shape, float("nan"))
    for experts, hidden, shard in shards:
        shard = _tensor(shard)
        e = slice(experts.start, experts.stop)
        if name.endswith("gate_up_proj"):
            h, n = full_shape[1] // 2, hidden.stop - hidden.start
            full[e, hidden] = shard[:, :n]
            full[e, h + hidden.start : h + hidden.stop] = shard[:, n:]
        else:
            full[e, :, hidden] = shard
    return full


@pytest.mark.dist
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
def test_distributed_wrap_matches_single_process_global_batch(world):
    cases = DIST_CASES[world]
    per_rank = run_distributed(_dist_worker, world, args=(cases,), timeout=200)
    ids, probe = batch(BATCH * world)
    for i, (family, overrides) in enumerate(cases):
        what = f"{family} {overrides} on {world} ranks"
        ranks = [r[i] for r in per_rank]
        ref = build_model(family, **overrides)
        want, want_embed_grad = forward_backward(ref, ids, probe, with_aux=False)
        logits = torch.cat([_tensor(r["logits"]) for r in ranks])
        assert_close(logits, want.logits, f"{what}: logits")
        assert_close(
            torch.cat([_tensor(r["embed_grad"]) for r in ranks]),
            want_embed_grad,
            f"{what}: input-embedding grad",
        )
        params = dict(ref.named_parameters())
        experts = _expert_param_names(ref)
        assert sorted(ranks[0]["shards"]) == sorted(experts)
        for name in experts:
            got = _assemble(name, params[name].shape, [r["shards"][name] for r in ranks])
            assert_close(got, params[name].grad, f"{what}: grad of {name}")
        assert ranks[0]["replicated"].keys() == params.keys() - set(experts)
        for name in ranks[0]["replicated"]:
            if params[name].grad is None:
                assert all(r["replicated"][name] is None for r in ranks), name
                continue
            total = sum(_tensor(r["replicated"][name]) for r in ranks)
            assert_close(total, params[name].grad, f"{what}: summed grad of {name}")
        full = sum(p.numel() for p in params.values())
        expert_full = sum(params[n].numel() for n in experts)
        for rank, r in enumerate(ranks):
            assert r["numel"] == full - expert_full + expert_full // world, f"{what}: rank {rank}"
            assert r["freed"], f"{what}: rank {rank} still references a full expert tensor"
            assert r["round_trip"], f"{what}: rank {rank} unwrap did not restore the state"

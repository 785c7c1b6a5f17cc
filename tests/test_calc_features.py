"""The calculator's layout, precision and generation options, and the command line's
behaviour in a pipe.

References: transformers' ``generate`` (its matmuls under ``FlopCounterMode``, its KV
cache tensors), real tensors of the byte sizes asked for, and the formulas of
``calc.memory`` written out term by term where no single-process reference exists
(tensor/sequence parallelism, ZeRO-3's gathered parameters).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from adaptive_moe import calc
from adaptive_moe.calc import (
    InferSetup,
    ModelSpec,
    Parallel,
    TrainSetup,
    count_params,
    inference_flops,
    inference_memory,
    training_memory,
)
from adaptive_moe.calc.memory import GIB
from adaptive_moe.cli import main

ROOT = Path(__file__).resolve().parent.parent

DENSE = ModelSpec(hidden=64, layers=4, heads=4, kv_heads=2, vocab=32, ffn=128)
MOE = ModelSpec(hidden=64, layers=4, heads=4, vocab=32, ffn=128, num_experts=4, top_k=2, moe_ffn=32)


def _cli(capsys, *argv: str) -> tuple[int, dict | str, str]:
    rc = main(["calc", *argv])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if "--json" in argv and rc == 0 else out), err


# ---- inference FLOPs against transformers' generate ---------------------------------------


def _tiny(model_type: str):
    transformers = pytest.importorskip("transformers")
    small = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=100,
    )
    if model_type == "mixtral":
        cfg = transformers.MixtralConfig(**small, num_local_experts=4, num_experts_per_tok=2)
    else:
        cfg = transformers.LlamaConfig(**small)
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "eager"  # per-expert loop: only routed rows multiplied
    torch.manual_seed(0)
    return cfg, transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
@pytest.mark.parametrize(("batch", "prompt", "output"), [(1, 9, 1), (2, 7, 5)])
def test_inference_flops_match_generate(model_type, batch, prompt, output):
    cfg, model = _tiny(model_type)
    tokens = torch.randint(1, cfg.vocab_size, (batch, prompt))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as c:
        out = model.generate(
            tokens, max_new_tokens=output, min_new_tokens=output, do_sample=False, pad_token_id=0
        )
    assert out.shape == (batch, prompt + output)
    got = inference_flops(calc.from_hf_config(cfg.to_dict()), prompt, output, batch)
    assert got.total == pytest.approx(c.get_total_flops(), rel=1e-12)


def test_inference_flops_by_hand_and_errors():
    s = DENSE
    one = calc.forward_flops(s, 1)
    per_key = 2 * s.layers * (s.q_width + s.v_width)
    weights = one.total - per_key - 2 * s.hidden * s.vocab
    inf = inference_flops(s, 10, 4, batch=3)
    assert inf.prefill == 3 * (10 * weights + 100 * per_key + 2 * s.hidden * s.vocab)
    decode = sum(weights + (10 + i) * per_key + 2 * s.hidden * s.vocab for i in (1, 2, 3))
    assert inf.decode == pytest.approx(3 * decode, rel=1e-15)
    assert inf.per_output_token == pytest.approx(decode / 3, rel=1e-15)
    assert inference_flops(s, 10, 0).decode == 0
    for kwargs, name in (
        (dict(prompt_tokens=0, output_tokens=1), "prompt_tokens"),
        (dict(prompt_tokens=1, output_tokens=-1), "output_tokens"),
        (dict(prompt_tokens=1, output_tokens=1, batch=0), "batch"),
    ):
        with pytest.raises(ValueError, match=name):
            inference_flops(s, **kwargs)


def test_cli_flops_infer(capsys):
    argv = "flops --preset mixtral-8x7b --mode infer --seq-len 1000 --output-tokens 100 --batch 4"
    rc, out, _ = _cli(capsys, *argv.split(), "--json")
    assert rc == 0
    assert out["flops"] == inference_flops(calc.preset("mixtral-8x7b"), 1000, 100, 4).to_dict()
    rc, text, _ = _cli(capsys, "flops", "--preset", "mixtral-8x7b", "--mode", "infer")
    assert rc == 0 and "prefill" in text and "decode" in text


# ---- KV cache for prompt + output --------------------------------------------------------


def test_kv_cache_of_prompt_and_output_matches_generate():
    """generate(G) feeds P + G - 1 tokens (the last is never fed back): the cache holds
    them all, K and V."""
    cfg, model = _tiny("llama")
    batch, prompt, output = 2, 6, 5
    tokens = torch.randint(1, cfg.vocab_size, (batch, prompt))
    with torch.no_grad():
        out = model.generate(
            tokens,
            max_new_tokens=output,
            min_new_tokens=output,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
        )
    cached = sum(lay.keys.nbytes + lay.values.nbytes for lay in out.past_key_values.layers)
    spec = calc.from_hf_config(cfg.to_dict())
    setup = InferSetup(batch=batch, seq_len=prompt, output_tokens=output - 1, kv_dtype="fp32")
    assert inference_memory(spec, Parallel(), setup).kv_cache == cached


def test_kv_cache_counts_k_and_v_for_prompt_and_output():
    spec = calc.preset("mixtral-8x7b")
    mem = inference_memory(spec, Parallel(), InferSetup(batch=2, seq_len=1000, output_tokens=24))
    assert mem.kv_cache == 2 * 1024 * 32 * (2 * 8 * 128) * 2  # batch, tokens, L, K+V, bf16
    argv = "mem --preset mixtral-8x7b --mode infer --batch 2 --seq-len 1000 --output-tokens 24"
    rc, out, _ = main_json(argv.split())
    assert rc == 0 and out["mem"]["kv_cache"] == mem.kv_cache


def main_json(argv: list[str]) -> tuple[int, dict, str]:
    """The CLI's exit code, parsed JSON output and error text."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["calc", *argv, "--json"])
    return rc, json.loads(out.getvalue()) if rc == 0 else {}, err.getvalue()


# ---- layout: --num-gpus, sequence parallelism, ZeRO-3 live parameters -------------------------


def test_num_gpus_derives_dp():
    par = Parallel.for_gpus(32, tp=2, pp=2, ep=4)
    assert (par.dp, par.world) == (8, 32)
    with pytest.raises(ValueError, match="num_gpus=30 must be a multiple of tp\\*pp=4"):
        Parallel.for_gpus(30, tp=2, pp=2)
    argv = "mem --preset mixtral-8x7b --num-gpus 32 --tp 2 --pp 2 --ep 8"
    rc, out, _ = main_json(argv.split())
    assert rc == 0 and out["mem"]["layout"]["dp"] == 8
    rc, _, err = main_json(["mem", "--preset", "mixtral-8x7b", "--num-gpus", "16", "--dp", "4"])
    assert rc == 2 and "--dp 4 disagrees with --num-gpus 16" in err and err.count("\n") == 1


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_sequence_parallel_splits_the_d_wide_activations(checkpointing):
    """Written out: under TP the norms' 2*a*d per norm, the final norm's 2*a*d (and,
    checkpointed, each block's saved input a*d) are replicated; sequence parallelism
    divides exactly those by tp."""
    spec, tp, b, t, a = DENSE, 2, 2, 64, 2
    setup = TrainSetup(micro_batch=b, seq_len=t, checkpointing=checkpointing)
    plain = training_memory(spec, Parallel(tp=tp), setup)
    split = training_memory(spec, Parallel(tp=tp, sequence_parallel=True), setup)
    tokens, d = b * t, spec.hidden
    per_block = a * d if checkpointing == "full" else 2 * spec.norms_per_layer * a * d
    replicated = tokens * (spec.layers * per_block + 2 * a * d)
    assert plain.activations - split.activations == pytest.approx(replicated * (1 - 1 / tp))
    # Nothing else moves.
    assert (split.weights, split.gradients, split.optimizer_states) == (
        plain.weights,
        plain.gradients,
        plain.optimizer_states,
    )
    one = training_memory(spec, Parallel(tp=1, sequence_parallel=True), setup)
    assert one == training_memory(spec, Parallel(tp=1), setup)  # tp = 1: no split


def test_zero3_live_parameters():
    spec, b, t = MOE, 1, 16
    setup = TrainSetup(micro_batch=b, seq_len=t)
    base = training_memory(spec, Parallel(dp=4, zero_stage=3), setup)
    stage_params = count_params(spec).total  # one stage, no TP/EP: every parameter
    block = max(calc.params.layer_params(spec, i).total for i in range(spec.layers))
    w = setup.weight_bytes
    for limit, live in ((1, block), (3 * block, 3 * block), (10**12, stage_params)):
        par = Parallel(dp=4, zero_stage=3, zero3_live_params=limit)
        mem = training_memory(spec, par, setup)
        assert mem.working - base.working == pytest.approx((live - block) * w, abs=1)
    with pytest.raises(ValueError, match="zero3_live_params needs zero_stage=3"):
        Parallel(dp=4, zero_stage=2, zero3_live_params=10)
    with pytest.raises(ValueError, match="zero3_live_params"):
        Parallel(dp=4, zero_stage=3, zero3_live_params=0)


# ---- bytes per value, miscellaneous memory --------------------------------------------------


def test_free_form_bytes_per_value():
    spec = MOE
    n = count_params(spec).total
    setup = TrainSetup(
        micro_batch=1,
        seq_len=16,
        weight_value_bytes=1.5,
        grad_value_bytes=4,
        state_value_bytes=1,
        precision="bf16-mixed",
    )
    mem = training_memory(spec, Parallel(), setup)
    assert mem.weights == round(1.5 * n) and mem.gradients == 4 * n
    assert mem.optimizer_states == (4 + 2 * 1) * n  # fp32 master + two 1-byte Adam states
    # The bytes of real tensors of those dtypes agree with the dtype names.
    by_dtype = training_memory(
        spec, Parallel(), TrainSetup(micro_batch=1, seq_len=16, grad_dtype="fp32")
    )
    by_bytes = training_memory(
        spec, Parallel(), TrainSetup(micro_batch=1, seq_len=16, grad_value_bytes=4)
    )
    assert by_bytes == by_dtype
    assert by_dtype.gradients == torch.empty(n, dtype=torch.float32).nbytes
    infer = inference_memory(
        spec, Parallel(), InferSetup(seq_len=8, weight_value_bytes=0.5, kv_value_bytes=1)
    )
    assert infer.weights == n // 2
    assert infer.kv_cache == inference_memory(spec, Parallel(), InferSetup(seq_len=8)).kv_cache / 2
    for kwargs, name in (
        (dict(weight_value_bytes=0), "weight_value_bytes"),
        (dict(grad_value_bytes=float("nan")), "grad_value_bytes"),
        (dict(state_value_bytes="1"), "state_value_bytes"),
        (dict(grad_value_bytes=2, grad_dtype="fp32"), "grad_value_bytes or grad_dtype"),
        (dict(misc_bytes=-1), "misc_bytes"),
    ):
        with pytest.raises(ValueError, match=name):
            TrainSetup(**kwargs)


def test_misc_memory_adds_to_the_peak(capsys):
    spec = MOE
    for setup_cls, fn in ((TrainSetup, training_memory), (InferSetup, inference_memory)):
        plain = fn(spec, Parallel(), setup_cls(seq_len=16))
        extra = fn(spec, Parallel(), setup_cls(seq_len=16, misc_bytes=5 * GIB))
        assert extra.peak - plain.peak == 5 * GIB
    rc, out, _ = main_json(["mem", "--preset", "mixtral-8x7b", "--misc-mem-gib", "2.5"])
    rc0, out0, _ = main_json(["mem", "--preset", "mixtral-8x7b"])
    assert rc == rc0 == 0 and out["mem"]["peak"] - out0["mem"]["peak"] == 2.5 * GIB
    rc, text, _ = _cli(capsys, "mem", "--preset", "mixtral-8x7b", "--misc-mem-gib", "2.5")
    assert "miscellaneous" in text


def test_cli_memory_flags_reach_the_setup():
    argv = ["mem", "--preset", "mixtral-8x7b", "--num-gpus", "16", "--tp", "2", "--ep", "8"]
    argv += ["--zero", "3", "--zero3-live-params", "1e9", "--partition-activations"]
    argv += ["--weight-bytes", "2", "--grad-bytes", "4", "--state-bytes", "1"]
    rc, out, err = main_json(argv)
    assert rc == 0, err
    layout, setup = out["mem"]["layout"], out["mem"]["setup"]
    assert layout["dp"] == 8 and layout["sequence_parallel"] is True
    assert layout["zero3_live_params"] == 10**9
    assert (setup["grad_value_bytes"], setup["state_value_bytes"]) == (4, 1)
    expected = training_memory(
        calc.preset("mixtral-8x7b"),
        Parallel(dp=8, tp=2, ep=8, zero_stage=3, zero3_live_params=10**9, sequence_parallel=True),
        TrainSetup(weight_value_bytes=2, grad_value_bytes=4, state_value_bytes=1),
    )
    assert out["mem"]["peak"] == expected.peak


def test_cli_norm_and_position_embeddings(capsys):
    """GPT-2 small from flags: LayerNorms, biases absent from the flags, learned positions."""
    flags = "--layers 12 --hidden 768 --heads 12 --vocab 50257 --ffn-mult 4 --mlp-linears 2"
    flags += " --norm layernorm --position-embeddings 1024 --tied-embeddings --json"
    rc, out, _ = _cli(capsys, "params", *flags.split())
    assert rc == 0
    d, L = 768, 12
    weights = 50257 * d + 1024 * d + L * (4 * d * d + 2 * d * 4 * d)
    norms = (2 * L + 1) * 2 * d
    assert out["params"]["total"] == weights + norms


# ---- a pipe closed early ---------------------------------------------------------------------


def _calc_cmd(*argv: str) -> list[str]:
    return [sys.executable, "-m", "adaptive_moe", "calc", *argv]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.timeout(60)
def test_json_into_head_exits_cleanly():
    cmd = " ".join(_calc_cmd("mem", "--preset", "deepseek-v3", "--json")) + " | head -c 10"
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert done.stdout == '{\n  "model'
    assert done.stderr == "" and done.returncode == 0


@pytest.mark.timeout(60)
def test_reader_gone_before_the_first_write_exits_cleanly():
    """Deterministic version: the read end is closed before the calculator prints."""
    proc = subprocess.Popen(
        _calc_cmd("params", "--preset", "mixtral-8x7b", "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        cwd=ROOT,
    )
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert err.decode() == "" and proc.returncode == 0


# ---- the cookbook comparison stays runnable ----------------------------------------------------


def test_cookbook_comparison_commands_run():
    """Every command of ``benchmarks/calc_vs_cookbook.py`` (quoted in RESULTS.md) runs, and
    the rows documented as agreeing do agree to the cookbook's printed precision."""
    from benchmarks.calc_vs_cookbook import EXAMPLES, ours

    values = {ex.name: ours(ex) for ex in EXAMPLES}
    assert values["Fairseq-MoE 15B, params"] == "29.10 B"
    assert values["Fairseq-MoE 15B, params, expert every 2nd layer"] == "14.63 B"
    # The KV cache's K and V: exactly twice the cookbook's d*L*tokens*bytes.
    kv = next(ex for ex in EXAMPLES if ex.value == "kv_cache")
    rc, out, _ = main_json(kv.ours.split())
    assert rc == 0 and out["mem"]["kv_cache"] == 2 * (2 * 4096 * 32 * (4096 + 512))


@pytest.mark.timeout(60)
def test_calculator_imports_no_torch():
    """Every calc command runs without importing torch (the calculator is pure)."""
    code = (
        "import sys\n"
        "from adaptive_moe.cli import main\n"
        "for argv in ('params --preset deepseek-v3',\n"
        "             'flops --preset mixtral-8x7b --tokens 1e12 --device H200',\n"
        "             'flops --preset mixtral-8x7b --mode infer',\n"
        "             'mem --preset mixtral-8x7b --num-gpus 8 --ep 8'):\n"
        "    assert main(['calc', *argv.split(), '--json']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_cli_device_rate(capsys):
    argv = "flops --preset mixtral-8x7b --tokens 1e12 --device H200 --json"
    rc, out, _ = _cli(capsys, *argv.split())
    train = calc.training_flops_per_token(calc.preset("mixtral-8x7b"), 4096)
    assert rc == 0 and out["flops"]["seconds"] == pytest.approx(train * 1e12 / (788e12 * 0.4))

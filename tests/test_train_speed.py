"""``adaptive-moe train``'s speed settings (issue 28): the dense part under
``adaptive_moe.parallelize`` (DDP, FSDP2) on 2 and 4 gloo ranks, gradient accumulation
and activation checkpointing against one process on the global batch; bf16 autocast
(fp32 masters, exact resume, resuming across precisions); a compiled step against an
eager one, strategy switching included; resume rules; the MoE layer under autocast.

The router's balance loss is off here (``--aux-loss-weight 0``): it is not linear in
the batch, so N micro-batches would not equal one batch of N times the size; the
z-loss is a mean over tokens and stays on. ``tests/test_train.py`` covers the balance
loss on 2 ranks against one process.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from adaptive_moe.cli import build_parser, main
from adaptive_moe.core.launch import launch
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.runtime.layer import MoELayer
from adaptive_moe.training.checkpoint import _SafeReader, latest_checkpoint
from adaptive_moe.training.cli import config_from_args, train
from adaptive_moe.training.config import TrainConfig, resolve_precision
from adaptive_moe.training.model import ModelConfig
from adaptive_moe.training.trainer import Trainer
from adaptive_moe.tuning.table import Fingerprint, Measurement, StrategyTable
from adaptive_moe.tuning.workload import Buckets
from tests.test_train import SMALL

FLAGS = [*SMALL, "--aux-loss-weight", "0", "--eval-batches", "1"]
TABLE_FLAGS = [f for f in FLAGS if f != "--no-table"]  # runs that find or profile a table
STEPS = 4
GLOBAL_BATCH = 8  # sequences per optimizer step in every run here
# fp32 runs that differ only in how the sum over the batch is split (ranks, micro-
# batches, reduction order): rounding only.
FP32 = {"rtol": 1e-5, "atol": 1e-6}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _config(out: Path, *extra: str, flags: list[str] = FLAGS, **fields: object) -> TrainConfig:
    argv = ["train", *flags, "--out", str(out), *extra]
    parser, _ = build_parser(argv)
    return dataclasses.replace(config_from_args(parser.parse_args(argv)), **fields)


def _train(
    out: Path, world: int, *extra: str, flags: list[str] = FLAGS, **fields: object
) -> list[dict]:
    """Run on ``world`` spawned gloo ranks until ``--steps``; returns metrics.jsonl."""
    results = train(_config(out, *extra, flags=flags, **fields), world)
    assert [r["status"] for r in results] == ["ok"] * world, results
    return _metrics(out)


def _close(ours: list[dict], theirs: list[dict], keys=("loss", "router_loss", "grad_norm"), **tol):
    for key in keys:
        torch.testing.assert_close(
            torch.tensor([r[key] for r in ours]), torch.tensor([r[key] for r in theirs]), **tol
        )


def _rewind(src: Path, dst: Path, step: int) -> Path:
    """A copy of run ``src`` whose latest checkpoint is that of ``step`` (to resume)."""
    shutil.copytree(src, dst)
    ckpts = dst / "checkpoints"
    name = f"step_{step:08d}"
    assert (ckpts / name).is_dir()
    for other in ckpts.glob("step_*"):
        if other.name > name:
            shutil.rmtree(other)
    (ckpts / "latest").write_text(name)
    return dst


@pytest.fixture(scope="module")
def fp32_reference(tmp_path_factory):
    """One process, the whole global batch, fp32, a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("fp32") / "run"
    steps = ("--steps", str(STEPS), "--ckpt-every", "2")
    return out, _train(out, 1, *steps, "--batch-size", str(GLOBAL_BATCH), "--precision", "fp32")


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "run"
    steps = ("--steps", str(STEPS), "--ckpt-every", "2")
    return out, _train(out, 1, *steps, "--batch-size", str(GLOBAL_BATCH), "--precision", "bf16")


# ---- the dense part through parallelize, accumulation, checkpointing ---------------------


@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("world", "accum", "extra"),
    [
        (2, 1, ("--dense-parallel", "fsdp2", "--activation-checkpointing")),
        (4, 1, ("--dense-parallel", "ddp")),
        (2, 2, ("--dense-parallel", "ddp")),  # no_sync on the first micro-batch
        (4, 2, ("--dense-parallel", "fsdp2")),  # set_requires_gradient_sync(False)
    ],
)
def test_ranks_and_micro_batches_equal_one_process_on_the_global_batch(
    fp32_reference, tmp_path, world, accum, extra
):
    _, reference = fp32_reference
    out = tmp_path / "run"
    batch = GLOBAL_BATCH // (world * accum)
    ours = _train(
        out, world, "--steps", str(STEPS), "--batch-size", str(batch),
        "--grad-accum", str(accum), "--precision", "fp32", *extra,
    )  # fmt: skip
    _close(ours, reference, **FP32)
    mode = extra[1]
    for r in ours:
        assert (r["dense_parallel"], r["grad_accum"], r["precision"]) == (mode, accum, "fp32")
        assert r["activation_checkpointing"] == ("--activation-checkpointing" in extra)
    # Layer statistics: one count per micro-batch forward, recomputations not counted.
    summary = json.loads((out / "summary.json").read_text())
    assert [
        sum(v["count"] for v in layer["strategies"].values()) for layer in summary["layers"]
    ] == [STEPS * accum] * 2
    assert (summary["dense_parallel"], summary["grad_accum"]) == (mode, accum)


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_resume_may_change_dense_parallel_and_grad_accum_at_the_same_global_batch(
    fp32_reference, tmp_path, capsys
):
    ref, reference = fp32_reference
    out = _rewind(ref, tmp_path / "run", 2)
    resume = ["train", *FLAGS, "--out", str(out), "--resume", "--steps", str(STEPS), "--nproc", "2"]
    # 2 ranks x 4 x 2 = 16 sequences per step, the checkpoint's 8: refused.
    assert main([*resume, "--batch-size", "4", "--grad-accum", "2"]) == 2
    err = capsys.readouterr().err
    assert "is a global batch of 16 sequences per step" in err
    assert "trained with 8 (" in err
    # 2 x 2 x 2 = 8, under FSDP2 where the checkpoint was written under DDP: continues
    # exactly (same tensors in DCP either way).
    assert (
        main([*resume, "--batch-size", "2", "--grad-accum", "2", "--dense-parallel", "fsdp2"]) == 0
    )
    ours = _metrics(out)
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))
    assert [r["dense_parallel"] for r in ours] == ["ddp", "ddp", "fsdp2", "fsdp2"]
    _close(ours, reference, **FP32)


# ---- bf16 ------------------------------------------------------------------------------------


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_bf16_keeps_fp32_masters_and_resumes_exactly_and_across_precisions(
    fp32_reference, bf16_run, tmp_path
):
    (fp32_out, fp32), (bf16_out, bf16) = fp32_reference, bf16_run
    # bf16 computes differently (not a silent fp32 run) but within bf16's rounding.
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(bf16, fp32))
    assert 1e-5 < diff < 2e-2, diff
    assert {r["precision"] for r in bf16} == {"bf16"}
    # Checkpoints hold fp32 masters and fp32 AdamW moments.
    index = _SafeReader(latest_checkpoint(bf16_out / "checkpoints")).read_metadata()
    dtypes = {
        key: meta.properties.dtype
        for key, meta in index.state_dict_metadata.items()
        if key.startswith(("model/", "optim/")) and not key.endswith("/step")
    }
    assert dtypes and set(dtypes.values()) == {torch.float32}, dtypes
    per_rank = ("--steps", str(STEPS), "--batch-size", str(GLOBAL_BATCH), "--nproc", "1")
    # bf16 -> bf16: exact.
    again = _train(_rewind(bf16_out, tmp_path / "again", 2), 1, *per_rank, "--resume",
                   "--precision", "bf16")  # fmt: skip
    _close(again, bf16, rtol=0, atol=1e-6)
    # fp32 checkpoint -> bf16: the same weights, computed in bf16.
    up = _train(_rewind(fp32_out, tmp_path / "to_bf16", 2), 1, *per_rank, "--resume",
                "--precision", "bf16")  # fmt: skip
    _close(up[:2], fp32[:2], rtol=0, atol=1e-6)  # the fp32 records kept
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(up[2:], fp32[2:]))
    assert 1e-5 < diff < 2e-2, diff
    # bf16 checkpoint -> fp32.
    down = _train(_rewind(bf16_out, tmp_path / "to_fp32", 2), 1, *per_rank, "--resume",
                  "--precision", "fp32")  # fmt: skip
    assert [r["precision"] for r in down] == ["bf16", "bf16", "fp32", "fp32"]
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(down[2:], bf16[2:]))
    assert 1e-5 < diff < 2e-2, diff


def test_precision_defaults_and_refusals():
    cpu = torch.device("cpu")
    assert resolve_precision(None, cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    model = ModelConfig()
    with pytest.raises(ValueError, match=r"precision \(--precision\) must be one of"):
        TrainConfig(model=model, out="x", precision="fp16")
    with pytest.raises(ValueError, match=r"dense_parallel \(--dense-parallel\) must be one of"):
        TrainConfig(model=model, out="x", dense_parallel="fsdp")
    with pytest.raises(ValueError, match="grad_accum must be"):
        TrainConfig(model=model, out="x", grad_accum=0)
    with pytest.raises(ValueError, match="compile must be a bool"):
        TrainConfig(model=model, out="x", compile=1)


@pytest.mark.gpu
def test_bf16_on_a_gpu_without_bf16_is_refused_naming_the_flag():
    device = torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.get_device_capability(device) >= (8, 0):
        assert resolve_precision(None, device) == "bf16"
        pytest.skip("this GPU computes in bf16")
    with pytest.raises(ValueError, match=r"--precision bf16: .* pass --precision fp32"):
        resolve_precision("bf16", device)
    assert resolve_precision(None, device) == "fp32"


@pytest.mark.parametrize("flags", [["--precision", "fp16"], ["--dense-parallel", "zero"],
                                   ["--grad-accum", "0"]])  # fmt: skip
def test_bad_speed_flags_are_argparse_errors(tmp_path, flags, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(tmp_path / "run"), *flags])
    assert info.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:MoELayer has no strategy table")
def test_moe_layer_under_autocast_routes_in_fp32_and_computes_experts_in_bf16():
    torch.manual_seed(0)
    layer = MoELayer(32, 64, 4, 2)
    x = torch.randn(24, 32)
    with torch.no_grad():
        fp32 = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = layer(x)
            assert layer.layer_shape().dtype == "bfloat16"  # tables per compute dtype
        # The router's logits are the fp32 matmul's, bit for bit.
        assert layer.last_router_logits.dtype == torch.float32
        torch.testing.assert_close(layer.last_router_logits, x @ layer.router.weight.T,
                                   rtol=0, atol=0)  # fmt: skip
        # The experts: as a bf16 copy of the layer on bf16 inputs (its router stays fp32).
        twin = copy.deepcopy(layer).to(torch.bfloat16)
        assert twin.router.weight.dtype == torch.float32
        bf16 = twin(x.to(torch.bfloat16)).float()
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, bf16, rtol=1e-2, atol=1e-3)
    assert (mixed - fp32).abs().amax() > 1e-4  # not an fp32 computation


# ---- compile ---------------------------------------------------------------------------------


def _switching_table(out: Path, window: int) -> Path:
    """A table whose best kernel changes at ``window`` tokens on the busiest expert: the
    layers switch between loop and bmm as the routing changes."""
    cfg = _config(out)
    m = cfg.model
    from adaptive_moe.tuning.table import LayerShape

    shape = LayerShape(d_model=m.d_model, d_ff=m.moe_d_ff, num_experts=m.num_experts,
                       top_k=m.top_k, glu=True, dtype="float32", shards=1)  # fmt: skip
    table = StrategyTable(Fingerprint.current(1, 1, "gloo", "cpu"), shape,
                          buckets=Buckets(mode="linear", window=window))  # fmt: skip
    how = Measurement(repeats=1, warmup=0, timer="perf_counter", tokens_per_rank=256,
                      max_tokens=256, skew=1.0, date="2026-01-01T00:00:00")  # fmt: skip
    loop, bmm = Strategy(1, "linear", 1, "loop"), Strategy(1, "linear", 1, "bmm")
    table.add_bucket(0, {loop: 1.0, bmm: 2.0}, how)
    table.add_bucket(1, {loop: 2.0, bmm: 1.0}, how)
    path = out.parent / "switching.msgpack"
    table.save(path)
    return path


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_step_equals_eager_and_still_switches(tmp_path):
    """aot_eager: dynamo's graphs and the AOT autograd split, run without generated
    kernels (inductor's C++ build takes minutes on 2 CPU cores). Tolerance: fp32
    rounding (the traced graphs may reorder no reduction here; 1e-5 leaves room)."""
    table = _switching_table(tmp_path / "eager", 200)
    common = ("--steps", "3", "--batch-size", str(GLOBAL_BATCH), "--table", str(table))

    def run(name: str, **fields: object) -> list[dict]:
        return _train(tmp_path / name, 1, *common, flags=TABLE_FLAGS, **fields)

    eager = run("eager")
    strategies = [r["strategies"] for r in eager]
    assert len({s for step in strategies for s in step}) == 2, strategies  # it switches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = run("compiled", compile=True, compile_backend="aot_eager")
    _close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert [r["strategies"] for r in compiled] == strategies
    assert [r["max_tokens"] for r in compiled] == [r["max_tokens"] for r in eager]
    summary = json.loads((tmp_path / "compiled" / "summary.json").read_text())
    assert summary["compile"] is True
    counts = [
        {k: v["count"] for k, v in layer["strategies"].items()} for layer in summary["layers"]
    ]
    eager_counts = [
        {k: v["count"] for k, v in layer["strategies"].items()}
        for layer in json.loads((tmp_path / "eager" / "summary.json").read_text())["layers"]
    ]
    assert counts == eager_counts


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_bf16_step_compiles_the_experts(tmp_path):
    """bf16 on one process: with --compile the MoE layers' experts run as their own
    graph (``compile_experts``; aot_eager here), and without a table the layers move to
    grouped_mm from their second forward; the losses equal the eager run's (the loop
    kernel) to bf16 rounding."""
    common = ("--steps", "3", "--batch-size", str(GLOBAL_BATCH), "--precision", "bf16")

    def run(name: str, **fields: object) -> list[dict]:
        return _train(tmp_path / name, 1, *common, **fields)

    eager = run("eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = run("compiled", compile=True, compile_backend="aot_eager")
    _close(compiled, eager, keys=("loss",), rtol=2e-2, atol=1e-3)
    assert all("grouped_mm" not in s for r in eager for s in r["strategies"])
    assert all(any("grouped_mm" in s for s in r["strategies"]) for r in compiled[1:])


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_torchrun_on_gpus_trains_in_bf16_compiled_and_resumes_in_fp32(tmp_path):
    """NCCL: bf16 + compile (inductor) + FSDP2 where there are 2 GPUs, fused AdamW; the
    MoE layers pick bf16 kernels; the checkpoint resumes in fp32 eagerly."""
    from adaptive_moe.runtime.experts.kernels import available_kernels
    from tests.test_train import ROOT

    n = min(2, torch.cuda.device_count())
    out = tmp_path / "run"

    def torchrun(*extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={n}", "-m", "adaptive_moe", "train", *TABLE_FLAGS,
               "--out", str(out), "--batch-size", "4", *extra]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280)
        assert done.returncode == 0, done.stderr[-3000:]

    mode = "fsdp2" if n == 2 else "ddp"
    torchrun("--steps", "6", "--ckpt-every", "3", "--compile", "--dense-parallel", mode)
    records = _metrics(out)
    assert {r["precision"] for r in records} == {"bf16"}  # the CUDA default
    kernels = set(available_kernels(torch.device("cuda"), torch.bfloat16))
    for r in records:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert {s.rsplit(",", 1)[1] for s in r["strategies"]} <= kernels
    torchrun("--steps", "8", "--resume", "--precision", "fp32")
    records = _metrics(out)
    assert [r["precision"] for r in records] == ["bf16"] * 6 + ["fp32"] * 2
    assert all(math.isfinite(r["loss"]) for r in records)


def _graphs_after_setup(rank: int, world: int, cfg: TrainConfig) -> int:
    """Dynamo's graphs once ``Trainer.setup`` (its quick profile included) has run."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(rank, world, cfg).setup()
    return counters["stats"]["unique_graphs"]


@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("compile_on", [False, True])
def test_quick_profile_measures_the_experts_as_they_run(tmp_path, compile_on):
    """With --compile the quick profile's layer compiles its grouped_mm experts, as the
    model's layers do (before, it measured them eagerly and its table then kept the
    compiled graph from running); without --compile nothing compiles during setup."""
    # Its own folder: the trainer reuses a matching table of a sibling run's folder.
    cfg = _config(tmp_path / "run", "--precision", "bf16", flags=TABLE_FLAGS, compile=compile_on,
                  compile_backend="aot_eager")  # fmt: skip
    (graphs,) = launch(_graphs_after_setup, 1, (cfg,), timeout_s=240)
    assert (graphs >= 1) == compile_on, graphs

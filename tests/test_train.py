"""``adaptive-moe train`` and its pieces: the byte corpus and its batches, the model
(against plain-torch references), the CLI end to end on 2 CPU ranks, exact resume, the
single-process equivalence of the data-parallel step, a killed rank, non-finite losses
and bad flags."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adaptive_moe.cli import build_parser, main
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.training.cli import config_from_args, train
from adaptive_moe.training.config import lr_at, short
from adaptive_moe.training.data import WindowSampler, load_corpus, split, stdlib_dir, stdlib_sources
from adaptive_moe.training.model import ModelConfig, MoETransformer
from adaptive_moe.training.plot import plot_training, strategy_switches, world_changes
from adaptive_moe.training.trainer import find_table
from adaptive_moe.tuning.table import Fingerprint, LayerShape, Measurement, StrategyTable

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--d-model",
    "32",
    "--layers",
    "2",
    "--heads",
    "2",
    "--kv-heads",
    "1",
    "--d-ff",
    "64",
    "--moe-d-ff",
    "32",
    "--seq-len",
    "32",
    "--data-max-bytes",
    "200000",
    "--no-table",
    "--no-progress",
    "--timeout",
    "60",
    "--warmup",
    "2",
    "--lr",
    "1e-2",
]
STEPS = 6


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in _metrics(out)]


def _argv(out: Path, *extra: str) -> list[str]:
    return ["train", *SMALL, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The CLI as a user runs it (in this process, to spare an interpreter start):
    2 spawned gloo ranks, 6 steps, a checkpoint every 3. Returns (out dir, exit code)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return out, main(
        _argv(out, "--steps", str(STEPS), "--ckpt-every", "3", "--nproc", "2", "--batch-size", "4")
    )


# ---- the CLI end to end ----------------------------------------------------------------------


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_cli_end_to_end_writes_metrics_plot_summary_and_checkpoints(reference_run):
    out, code = reference_run
    assert code == 0
    records = _metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["step_ms"] > 0
        assert r["strategies"] == ["r=1,linear,d=1,loop"] * 2 and not r["skipped"]
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and math.isfinite(summary["val_loss"])
    # the plot's inputs: the run's validation loss at its last step, its world size
    assert [r.get("val_loss") for r in records] == [None] * (STEPS - 1) + [summary["val_loss"]]
    assert {r["world_size"] for r in records} == {2} and not any("resumed" in r for r in records)
    assert [layer["strategies"]["r=1,linear,d=1,loop"]["count"] for layer in summary["layers"]] == [
        STEPS,
        STEPS,
    ]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000006"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == [
        "step_00000003",
        "step_00000006",
    ]


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_resume_continues_exactly(reference_run, tmp_path):
    ref, code = reference_run
    assert code == 0
    out = tmp_path / "run"
    common = ("--ckpt-every", "3", "--nproc", "2", "--batch-size", "4")
    assert main(_argv(out, "--steps", "3", *common)) == 0
    assert main(_argv(out, "--steps", str(STEPS), "--resume", *common)) == 0
    records = _metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if r.get("resumed")] == [4]
    assert [r["step"] for r in records if "val_loss" in r] == [3, STEPS]  # one per run
    torch.testing.assert_close(
        torch.tensor(_losses(out)), torch.tensor(_losses(ref)), rtol=0, atol=1e-6
    )


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_one_process_with_the_global_batch_matches_two_ranks(reference_run, tmp_path):
    ref, code = reference_run
    assert code == 0
    out = tmp_path / "run"
    assert main(_argv(out, "--steps", "3", "--nproc", "1", "--batch-size", "8")) == 0
    ours, theirs = _metrics(out), _metrics(ref)[:3]
    for key in ("loss", "router_loss", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor([r[key] for r in ours]),
            torch.tensor([r[key] for r in theirs]),
            rtol=1e-5,
            atol=1e-6,
        )


def _die_after_step_4(rank: int, step: int) -> None:
    if rank == 1 and step == 4:
        os._exit(3)


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_killed_rank_stops_the_run_and_the_last_checkpoint_resumes(reference_run, tmp_path):
    ref, code = reference_run
    assert code == 0
    out = tmp_path / "run"
    common = ("--ckpt-every", "3", "--nproc", "2", "--batch-size", "4")
    parser, _ = build_parser(_argv(out, "--steps", str(STEPS), *common))
    cfg = config_from_args(parser.parse_args(_argv(out, "--steps", str(STEPS), *common)))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 exited with code 3 without reporting"):
        train(cfg, 2, on_step=_die_after_step_4)
    assert time.monotonic() - start < 60 + 30  # the collective timeout plus start-up
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
    assert main(_argv(out, "--steps", str(STEPS), "--resume", *common)) == 0
    torch.testing.assert_close(
        torch.tensor(_losses(out)), torch.tensor(_losses(ref)), rtol=0, atol=1e-6
    )


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_nonfinite_loss_stops_with_a_clear_message(tmp_path, capfd):
    code = main(
        _argv(
            tmp_path / "run",
            "--steps",
            "4",
            "--nproc",
            "1",
            "--lr",
            "1e30",
            "--warmup",
            "0",
            "--clip-grad",
            "0",
        )
    )
    err = capfd.readouterr().err
    assert code == 1
    assert "(not finite); stopping (no checkpoint was saved)" in err
    assert "--skip-nonfinite" in err
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1]


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_skip_nonfinite_skips_the_step_instead(tmp_path, capfd):
    out = tmp_path / "run"
    code = main(
        _argv(
            out,
            "--steps",
            "4",
            "--nproc",
            "1",
            "--lr",
            "1e30",
            "--warmup",
            "0",
            "--clip-grad",
            "0",
            "--skip-nonfinite",
        )
    )
    stdout = capfd.readouterr().out
    assert code == 0
    assert [r["skipped"] for r in _metrics(out)] == [False, True, True, True]
    assert "done: steps 0 -> 4" in stdout and "3 steps skipped (non-finite)" in stdout
    assert "MoE layer" in stdout and "block 1    r=1,linear,d=1,loop" in stdout


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_without_a_matching_table_it_profiles_first_and_says_so(tmp_path, capfd):
    out = tmp_path / "run"
    argv = [
        a
        for a in _argv(out, "--steps", "2", "--nproc", "2", "--batch-size", "4")
        if a != "--no-table"
    ]
    assert main(argv) == 0
    stdout = capfd.readouterr().out
    assert "no strategy table matches this run" in stdout and "profiling quickly" in stdout
    assert f"strategy table {out / 'strategy_table_w2.msgpack'} (profiled now)" in stdout
    table = StrategyTable.load(out / "strategy_table_w2.msgpack")
    measured = {str(s) for entry in table.entries.values() for s in entry.times_ms}
    n = len(table.entries)  # the announcement counted what was then measured
    assert f"({n} workload bucket{'s' * (n > 1)} x {len(measured)} strategies = " in stdout
    for record in _metrics(out):
        assert set(record["strategies"]) <= measured
    # Resumed on one rank: that world's own table, the first one's left as it was.
    first = (out / "strategy_table_w2.msgpack").read_bytes()
    resume = [*argv[: argv.index("--steps")], "--steps", "3", "--nproc", "1", "--resume"]
    assert main(resume) == 0
    assert f"strategy table {out / 'strategy_table_w1.msgpack'} (profiled now)" in (
        capfd.readouterr().out
    )
    assert (out / "strategy_table_w2.msgpack").read_bytes() == first
    assert StrategyTable.load(out / "strategy_table_w1.msgpack").fingerprint.world_size == 1
    # the plot's marks: a world-size change at the resumed step, which is not a switch
    records = _metrics(out)
    assert [(r["world_size"], "resumed" in r) for r in records] == [
        (2, False),
        (2, False),
        (1, True),
    ]
    assert world_changes(records) == [(3, 2, 1)] and 3 not in strategy_switches(records)


def _table_for(fp: Fingerprint, shape: LayerShape) -> StrategyTable:
    table = StrategyTable(fp, shape)
    how = Measurement(
        repeats=1,
        warmup=0,
        timer="perf_counter",
        tokens_per_rank=8,
        max_tokens=8,
        skew=1.0,
        date="2026-01-01T00:00:00",
    )
    table.add_bucket(8, {Strategy(1, "linear", 1, "loop"): 1.0}, how)
    return table


def test_find_table_takes_an_earlier_runs_matching_table_and_skips_others(tmp_path):
    fp = Fingerprint.current(2, 2, "gloo", "cpu")
    shape = LayerShape(
        d_model=24, d_ff=40, num_experts=6, top_k=2, glu=True, dtype="float32", shards=1
    )
    runs = tmp_path / "runs"
    (runs / "new").mkdir(parents=True)
    (runs / "new" / "strategy_table.msgpack").write_bytes(b"not msgpack at all")
    assert find_table(runs / "new", fp, shape) is None
    other = Fingerprint.current(4, 4, "gloo", "cpu")
    (runs / "a").mkdir()
    _table_for(other, shape).save(runs / "a" / "strategy_table.msgpack")
    assert find_table(runs / "new", fp, shape) is None  # measured on 4 ranks: not ours
    (runs / "b").mkdir()
    _table_for(fp, shape).save(runs / "b" / "strategy_table.msgpack")
    assert find_table(runs / "new", fp, shape) == (runs / "b" / "strategy_table.msgpack").resolve()


@pytest.mark.parametrize(
    "extra",
    [
        ["--steps", "0"],
        ["--steps", "ten"],
        ["--lr", "-1"],
        ["--lr", "nan"],
        ["--val-fraction", "1.5"],
        ["--batch-size", "1.5"],
        ["--table", "t", "--no-table"],
        ["--no-such-flag"],
    ],
)
def test_bad_flags_are_argparse_errors(tmp_path, extra, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(tmp_path / "run"), *extra])
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--heads", "3"], "d_model=64 must be divisible by n_heads=3"),
        (["--top-k", "5"], "top_k=5 must be <= num_experts=4"),
        (["--experts", "3"], "num_experts=3 must be a multiple of the group size 2"),
        (["--data", "/no/such/file.txt"], "--data /no/such/file.txt: no such file"),
        (["--resume"], "holds no checkpoint"),
        (["--table", "/no/such/table.msgpack"], "--table /no/such/table.msgpack: no such file"),
    ],
)
def test_bad_combinations_exit_2_with_a_message(tmp_path, extra, message, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_fresh_run_refuses_an_existing_run_dir_and_resume_refuses_other_models(
    reference_run, capsys
):
    ref, code = reference_run
    assert code == 0
    assert main(["train", "--out", str(ref)]) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    assert main(["train", "--out", str(ref), "--resume", "--d-model", "64"]) == 2
    assert "--d-model 64 differs from the checkpoint's 32" in capsys.readouterr().err
    # A preset defines every field of a model: each must be the checkpoint's.
    for preset in ("cpu-9m", "tiny"):
        argv = ["train", "--out", str(ref), "--resume", "--steps", "9", "--preset", preset]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"--preset {preset} defines another model than the checkpoint's" in err
        assert "d_model=" in err and "(checkpoint: 32)" in err, err
    # ... and a preset that, with the flags given, is the checkpoint's model is accepted.
    model_flags = SMALL[: SMALL.index("--data-max-bytes")]
    argv = ["train", *model_flags, "--preset", "tiny", "--out", str(ref), "--resume"]
    cfg = _config([*argv, "--steps", "9", "--nproc", "2"])
    assert cfg.model.d_model == 32 and cfg.batch_size == 4


def _config(argv: list[str]):
    parser, _ = build_parser(argv)
    return config_from_args(parser.parse_args(argv))


def _copy_at_step_3(ref: Path, out: Path) -> Path:
    """A copy of the reference run as it stood after its step-3 checkpoint."""
    shutil.copytree(ref, out)
    (out / "checkpoints" / "latest").write_text("step_00000003")
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    return out


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_resume_on_another_world_size_keeps_the_global_batch(reference_run, tmp_path, capsys):
    ref, code = reference_run
    assert code == 0
    out = _copy_at_step_3(ref, tmp_path / "run")
    resume = _argv(out, "--steps", str(STEPS), "--resume")
    # 4 per rank on 2 ranks: 8 on 1 rank, 2 on 4; refused where it does not divide or
    # where --batch-size changes it, unless told.
    assert _config([*resume, "--nproc", "1"]).batch_size == 8
    assert _config([*resume, "--nproc", "4"]).batch_size == 2
    for extra, message in (
        (
            ["--nproc", "3"],
            "global batch 8 (4 per rank x 2 ranks x 1 micro-batch(es)) does not divide over 3",
        ),
        (["--nproc", "1", "--batch-size", "4"], "--batch-size 4 is a global batch of 4"),
    ):
        assert main([*resume, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "--allow-global-batch-change" in err, err
    changed = [*resume, "--nproc", "1", "--batch-size", "4", "--allow-global-batch-change"]
    assert _config(changed).batch_size == 4
    assert _config([*resume, "--nproc", "3", "--allow-global-batch-change"]).batch_size == 4
    # The resumed steps on one rank are the two-rank run's steps (one process with the
    # global batch computes the same step).
    assert main([*resume, "--nproc", "1"]) == 0
    ours, theirs = _metrics(out), _metrics(ref)
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor([r[key] for r in ours]),
            torch.tensor([r[key] for r in theirs]),
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize("steps", [STEPS, 2])
def test_resume_with_nothing_to_train_says_so_and_leaves_the_run_alone(
    reference_run, tmp_path, steps, capsys
):
    ref, code = reference_run
    assert code == 0
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(_argv(out, "--steps", str(steps), "--resume", "--nproc", "2")) == 2
    err = capsys.readouterr().err
    assert f"--steps {steps} is not beyond step {STEPS} of the checkpoint" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


# ---- data --------------------------------------------------------------------------------------


def test_stdlib_sources_are_sorted_python_files_without_site_packages():
    files = stdlib_sources()
    rel = [f.relative_to(stdlib_dir()).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert all(r.endswith(".py") for r in rel)
    assert not any("site-packages" in r or "dist-packages" in r for r in rel)
    assert "os.py" in rel


def test_corpus_is_deterministic_capped_and_splits(tmp_path):
    a, b = load_corpus(max_bytes=50_000), load_corpus(max_bytes=50_000)
    assert len(a) == 50_000 and a.sha256 == b.sha256 and torch.equal(a.data, b.data)
    f1, f2 = tmp_path / "a.txt", tmp_path / "b.txt"
    f1.write_bytes(b"hello")
    f2.write_bytes(b"world")
    c = load_corpus([f1, f2])
    assert bytes(c.data.tolist()) == b"hello\n\nworld"
    train_part, val = split(c, 0.25)
    assert bytes(train_part.tolist()) + bytes(val.tolist()) == b"hello\n\nworld"
    assert len(val) == math.ceil(12 * 0.25)
    with pytest.raises(ValueError, match="does not exist or is not a regular file"):
        load_corpus([tmp_path / "missing.txt"])


def test_global_batch_does_not_depend_on_the_world_size_and_covers_an_epoch():
    data = torch.arange(10 * 16 + 1, dtype=torch.uint8)  # 10 windows of 16 (+1 target byte)

    def global_batch(world: int, position: int) -> torch.Tensor:
        parts = [
            WindowSampler(data, 16, 4 // world, r, world, seed=3).batch(position)
            for r in range(world)
        ]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    for position in (0, 4, 8, 37):
        x1, y1 = global_batch(1, position)
        for world in (2, 4):
            x, y = global_batch(world, position)
            assert torch.equal(x, x1) and torch.equal(y, y1)
        assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next bytes
    sampler = WindowSampler(data, 16, 5, 0, 1, seed=3)
    epoch = sampler.windows(0) + sampler.windows(5)
    assert sorted(epoch) == list(range(10))  # one epoch: every window exactly once
    assert sampler.windows(10) != epoch[:5] or sampler.windows(15) != epoch[5:]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        WindowSampler(data, 16, 6, 0, 2, seed=0)


# ---- the model ---------------------------------------------------------------------------------


def _tiny(**kw) -> ModelConfig:
    base = {
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "d_ff": 48,
        "num_experts": 4,
        "top_k": 2,
        "moe_d_ff": 16,
        "max_seq_len": 16,
    }
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"n_heads": 5}, "d_model=32 must be divisible by n_heads=5"),
        ({"n_kv_heads": 3}, "n_kv_heads=3 must divide n_heads=4"),
        ({"n_heads": 32}, "must be even"),
        ({"top_k": 5}, "top_k=5 must be <="),
        ({"moe_every": 3}, "moe_every=3 must be <= n_layers=2"),
        ({"d_model": 0}, "d_model must be a positive integer"),
        ({"aux_loss_weight": -1.0}, "aux_loss_weight must be a finite number >= 0"),
        ({"capacity_factor": float("nan")}, "capacity_factor must be finite"),
        ({"tie_embeddings": 1}, "tie_embeddings must be a bool"),
    ],
)
def test_model_config_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        _tiny(**kw)


def _rope_reference(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as a complex rotation of (x_j, x_{j + D/2}) by angle t * theta^(-2j/D)."""
    d = x.shape[-1]
    pos = torch.arange(x.shape[-2], dtype=torch.float64)[:, None]
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double())
    z = z * torch.polar(torch.ones_like(pos * freq), pos * freq)
    return torch.cat([z.real, z.imag], dim=-1).float()


def test_attention_matches_an_explicit_gqa_rope_reference():
    torch.manual_seed(0)
    model = MoETransformer(_tiny(), seed=1)
    attn = model.blocks[0].attn
    x = torch.randn(2, 10, 32)
    b, t, h, kv, dh = 2, 10, 4, 2, 8
    q = (x @ attn.q_proj.weight.T).view(b, t, h, dh).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T).view(b, t, kv, dh).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T).view(b, t, kv, dh).transpose(1, 2)
    q, k = _rope_reference(q, 10000.0), _rope_reference(k, 10000.0)
    out = torch.full((b, h, t, dh), float("nan"))
    for head in range(h):
        kvh = head // (h // kv)  # query heads share key/value heads in contiguous groups
        scores = q[:, head] @ k[:, kvh].transpose(-1, -2) / math.sqrt(dh)
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        out[:, head] = scores.softmax(-1) @ v[:, kvh]
    ref = out.transpose(1, 2).reshape(b, t, 32) @ attn.o_proj.weight.T
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:MoELayer has no strategy table")
def test_model_is_causal_and_has_the_configured_layers():
    model = MoETransformer(_tiny(n_layers=4, moe_every=2), seed=0)
    assert len(list(model.moe_layers())) == 2
    assert [type(b.ffn).__name__ for b in model.blocks] == ["SwiGLU", "MoELayer"] * 2
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert a.shape == (2, 16, 256) and a.dtype == torch.float32
    # Only rounding may differ (expert GEMMs see the tokens grouped differently).
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().amax() > 1e-3
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_init_is_seeded_and_heads_tie_or_not():
    a, b, c = (MoETransformer(_tiny(), seed=s) for s in (5, 5, 6))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name
    assert a.lm_head is None
    untied = MoETransformer(_tiny(tie_embeddings=False), seed=5)
    assert untied.lm_head is not None and untied.lm_head.weight.shape == (256, 32)
    layer = next(a.moe_layers())
    assert layer.experts.gate_up_proj.std().item() == pytest.approx(0.02, rel=0.1)
    assert layer.experts.down_proj.std().item() == pytest.approx(0.01, rel=0.1)


@pytest.mark.filterwarnings("ignore:MoELayer has no strategy table")
def test_loss_gradient_reaches_every_parameter():
    model = MoETransformer(_tiny(tie_embeddings=False), seed=0)
    tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    logits = model(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
    (loss + model.router_loss()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert 5.0 < loss.item() < 6.0  # ~ln(256) at initialisation


# ---- small pieces ------------------------------------------------------------------------------


def test_lr_warmup_then_constant_and_short_strategy_names(tmp_path):
    parser, _ = build_parser(["train"])
    cfg = config_from_args(parser.parse_args(["train", "--out", str(tmp_path), "--warmup", "4"]))
    assert [lr_at(cfg, s) / cfg.lr for s in range(6)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0, 1.0], rel=1e-12
    )
    assert short(Strategy(1, "linear", 2, "scatter")) == "r1/d2/scatter"
    assert short(Strategy(0, "2dh", 1, "bmm")) == "r0/2dh/d1/bmm"


def test_plot_marks_strategy_switches(tmp_path):
    records = [
        {
            "step": i,
            "loss": 5.0 - 0.1 * i,
            "step_ms": 10.0 + i,
            "strategies": ["a", "b" if i < 3 else "c"],
            "skipped": i == 4,
        }
        for i in range(1, 7)
    ]
    assert strategy_switches(records) == [3]
    plot_training(records, tmp_path / "p.png", title="t")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="at least one metrics record"):
        plot_training([], tmp_path / "q.png")


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_torchrun_on_gpus_profiles_trains_and_resumes_on_another_world_size(tmp_path):
    """NCCL path: quick profile on GPU, train, then resume on a different GPU count."""
    n = min(2, torch.cuda.device_count())
    out = tmp_path / "run"
    flags = [f for f in SMALL if f != "--no-table"]

    def torchrun(nproc: int, *extra: str) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "adaptive_moe",
            "train",
            *flags,
            "--out",
            str(out),
            *extra,
        ]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280)

    first = torchrun(n, "--steps", "6", "--ckpt-every", "3", "--batch-size", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / f"strategy_table_w{n}.msgpack").is_file()
    resumed = torchrun(1 if n == 2 else n, "--steps", "8", "--resume", "--batch-size", str(4 * n))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = _metrics(out)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) for r in records)

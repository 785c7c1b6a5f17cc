"""The training model's issue-16 features: PR-MoE (per-block expert counts) and
Residual-MoE (shared experts) in ModelConfig and the calculator, presets, staged
knowledge distillation (Mixture-of-Students), MFU in the metrics; end to end on CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from adaptive_moe.calc import count_params, training_flops_per_token
from adaptive_moe.cli import build_parser, main
from adaptive_moe.runtime.layer import MoELayer
from adaptive_moe.training.cli import config_from_args
from adaptive_moe.training.config import (
    PRESET_NAMES,
    TrainConfig,
    distill_weight_at,
    preset_fields,
)
from adaptive_moe.training.model import ModelConfig, MoETransformer
from adaptive_moe.training.trainer import distillation_loss


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_pr_moe_and_residual_moe_blocks():
    cfg = ModelConfig(
        n_layers=4, experts_per_layer=(0, 2, 0, 4), shared_experts_per_layer=(0, 1, 0, 2), top_k=1
    )
    assert cfg.num_experts == 4  # max E_i
    model = MoETransformer(cfg)
    ffns = [block.ffn for block in model.blocks]
    assert [isinstance(f, MoELayer) for f in ffns] == [False, True, False, True]
    assert [f.router_cfg.num_experts for f in ffns if isinstance(f, MoELayer)] == [2, 4]
    assert [f.shared.down_proj.in_features for f in ffns if isinstance(f, MoELayer)] == [
        cfg.moe_d_ff,
        2 * cfg.moe_d_ff,
    ]
    # The calculator describes the same model: its parameter count is the real one.
    assert count_params(cfg.calc_spec()).total == _params(model)
    # The routed experts of block 3 are drawn at their own E (4), not the max's.
    assert tuple(ffns[3].experts.gate_up_proj.shape) == (4, 2 * cfg.moe_d_ff, cfg.d_model)
    y = model(torch.randint(0, 256, (2, 16)))
    assert y.shape == (2, 16, 256) and torch.isfinite(y).all()


def test_uniform_shared_experts_match_the_calculator():
    cfg = ModelConfig(n_layers=2, moe_every=2, shared_experts=1, top_k=1)
    model = MoETransformer(cfg)
    assert model.blocks[1].ffn.shared is not None and not isinstance(model.blocks[0].ffn, MoELayer)
    assert count_params(cfg.calc_spec()).total == _params(model)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(n_layers=2, experts_per_layer=(0, 4, 4)), "one entry per block"),
        (dict(n_layers=2, experts_per_layer=(0, 0)), "no MoE block"),
        (dict(n_layers=2, experts_per_layer=(0, 4), moe_every=2), "leave moe_every at 1"),
        (dict(n_layers=2, experts_per_layer=(1, 4), top_k=2), "num_experts=1 .the fewest"),
        (dict(n_layers=2, experts_per_layer=(0, -1)), r"experts_per_layer\[1\]"),
        (dict(n_layers=2, shared_experts_per_layer=(1, 0), moe_every=2), "block 0 is dense"),
        (dict(shared_experts=1, shared_experts_per_layer=(1, 1)), "not both"),
        (dict(experts_per_layer="0,4"), "sequence of ints"),
    ],
)
def test_per_layer_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kw)


def test_per_layer_round_trips_through_json():
    cfg = ModelConfig(n_layers=2, experts_per_layer=(2, 4), shared_experts_per_layer=(1, 0))
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.experts_per_layer == (2, 4)


def test_presets():
    """Small presets: the model built has the calculator's parameter count; the GPU ones
    are as large as stated (counted by the calculator only: 1B parameters on a CPU test
    would take gigabytes)."""
    totals = {}
    for name in PRESET_NAMES:
        cfg = ModelConfig(**preset_fields(name))
        totals[name] = count_params(cfg.calc_spec()).total
        if totals[name] < 20e6:
            assert totals[name] == _params(MoETransformer(cfg)), name
    assert totals["tiny"] < 1e6 and 5e6 < totals["cpu-9m"] < 12e6
    assert 1e8 < totals["gpu-150m"] < 2e8 and 0.9e9 < totals["gpu-1b"] < 1.1e9
    assert ModelConfig(**preset_fields("pr-moe")).experts_per_layer == (0, 8, 0, 16)
    with pytest.raises(ValueError, match="--preset must be one of"):
        preset_fields("huge")


def _config(tmp_path, *argv):
    argv = ["train", "--out", str(tmp_path / "r"), *argv]
    parser, _ = build_parser(argv)
    args = parser.parse_args(argv)
    return config_from_args(args)


def test_cli_preset_and_per_layer_flags(tmp_path):
    cfg = _config(tmp_path, "--preset", "pr-moe", "--layers", "2", "--experts-per-layer", "4,8")
    assert cfg.model.d_model == 128 and cfg.model.experts_per_layer == (4, 8)
    assert cfg.model.num_experts == 8 and cfg.model.shared_experts == 1
    cfg = _config(tmp_path, "--layers", "2", "--shared-experts-per-layer", "1,2")
    assert cfg.model.shared_experts_per_layer == (1, 2)
    assert _config(tmp_path).model == ModelConfig()  # CPU, no flag: "tiny"


def test_cli_bad_per_layer_values(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "r"), "--experts-per-layer", "0,x"])
    assert "is not an integer >= 0" in capsys.readouterr().err
    code = main(["train", "--out", str(tmp_path / "r"), "--experts-per-layer", "0,4,4"])
    assert code == 2
    assert "one entry per block" in capsys.readouterr().err


def test_distillation_loss_is_the_written_out_kl():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11) * 2
    for temp in (1.0, 2.5):
        ps, pt = F.softmax(s / temp, -1).double(), F.softmax(t / temp, -1).double()
        kl = (pt * (pt.log() - ps.log())).sum(-1).mean() * temp**2
        assert math.isclose(float(distillation_loss(s, t, temp)), float(kl), rel_tol=1e-5)
    assert float(distillation_loss(s, s, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_staged_distillation_weight():
    base = dict(model=ModelConfig(), out="x", steps=10, distill_from="ckpt", distill_weight=0.4)
    step = TrainConfig(**base, distill_steps=4)
    assert [distill_weight_at(step, i) for i in range(6)] == [0.4] * 4 + [0.0] * 2
    linear = TrainConfig(**base, distill_steps=4, distill_schedule="linear")
    want = [0.4, 0.3, 0.2, 0.1, 0.0, 0.0]
    assert [distill_weight_at(linear, i) for i in range(6)] == pytest.approx(want)
    half = TrainConfig(**base)  # distill_steps=0: half of the run
    assert distill_weight_at(half, 4) == 0.4 and distill_weight_at(half, 5) == 0.0
    assert distill_weight_at(TrainConfig(model=ModelConfig(), out="x"), 0) == 0.0
    with pytest.raises(ValueError, match="distill_schedule"):
        TrainConfig(**base, distill_schedule="cosine")


TINY = [
    "--d-model", "16", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--d-ff", "32",
    "--moe-d-ff", "16", "--seq-len", "16", "--data-max-bytes", "40000",
    "--no-table", "--no-progress", "--timeout", "60", "--batch-size", "2",
]  # fmt: skip


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(240)
def test_distill_from_a_trained_teacher_end_to_end(tmp_path):
    """A teacher trains 2 steps; a smaller student (fewer experts) trains 1 step against
    it with a linearly staged KD weight, then resumes to 3; MFU inputs in every record."""
    teacher = tmp_path / "teacher"
    assert main(["train", *TINY, "--experts", "4", "--out", str(teacher), "--steps", "2",
                 "--nproc", "1"]) == 0  # fmt: skip
    student = tmp_path / "student"
    argv = ["train", *TINY, "--experts", "2", "--out", str(student), "--nproc", "1"]
    distill = ["--distill-from", str(teacher), "--distill-steps", "2",
               "--distill-schedule", "linear", "--distill-weight", "0.8"]  # fmt: skip
    assert main([*argv, "--steps", "1", *distill]) == 0
    # Resumed without --distill-from: the run keeps its teacher and schedule.
    assert main([*argv, "--steps", "3", "--resume"]) == 0
    recs = _records(student)
    assert [r["kd_weight"] for r in recs] == pytest.approx([0.8, 0.4, 0.0])
    assert recs[0]["kd_loss"] > 0 and recs[1]["kd_loss"] > 0 and recs[2]["kd_loss"] == 0
    flops = training_flops_per_token(ModelConfig.from_dict(
        json.loads((student / "config.json").read_text())["model"]).calc_spec(), 16)  # fmt: skip
    for r in recs:
        assert r["mfu"] is None  # a CPU: the calculator knows no peak
        assert r["model_tflops_per_s"] == pytest.approx(r["tokens_per_s"] * flops / 1e12)
    summary = json.loads((student / "summary.json").read_text())
    assert summary["flops_per_token"] == pytest.approx(flops)


def test_distill_from_a_directory_without_checkpoints(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    code = main(["train", *TINY, "--out", str(tmp_path / "s"), "--distill-from",
                 str(tmp_path / "nothing")])  # fmt: skip
    assert code == 2
    assert "nothing" in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_pr_moe_trains_on_two_ranks_and_resumes_on_one(tmp_path):
    """Blocks with 2 and 4 experts shard differently over 2 ranks; the checkpoint keeps
    each at its own logical shape, so one rank resumes it."""
    out = tmp_path / "run"
    flags = [*TINY, "--layers", "3", "--experts-per-layer", "2,0,4", "--shared-experts", "1",
             "--top-k", "1", "--out", str(out)]  # fmt: skip
    assert main(["train", *flags, "--steps", "2", "--nproc", "2"]) == 0
    # One rank takes the global batch of two (2 x 2): --batch-size 4, or none.
    at = flags.index("--batch-size")
    resume = flags[:at] + flags[at + 2 :]
    assert main(["train", *resume, "--steps", "3", "--nproc", "1", "--resume"]) == 0
    recs = _records(out)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in recs)

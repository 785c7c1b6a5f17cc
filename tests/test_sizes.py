"""Sizes and launch settings a command line cannot run (issue 24, items 11 and 12):
counts that would run forever or overflow are refused by the argument types; a model or a
layer that cannot fit the device is refused from the calculator's estimate before anything
is allocated; a ``--ranks-per-node`` that does not divide the world and ``--device cuda``
without CUDA end in a message naming the flag and the valid values, exit status 2."""

from __future__ import annotations

import argparse
import re
from decimal import Decimal

import pytest
import torch

from adaptive_moe.cli import main
from adaptive_moe.core import cli_types, sizes
from adaptive_moe.core.checks import divisors
from adaptive_moe.core.launch import launch
from adaptive_moe.runtime.layer import MoELayer
from adaptive_moe.training.config import TrainConfig, training_bytes
from adaptive_moe.training.model import ModelConfig, MoETransformer

TINY_LAYER = ["--d-model", "8", "--d-ff", "8", "--experts", "2", "--top-k", "1"]


def _main(argv: list[str]) -> int:
    """``main``'s exit status, argparse's own refusals (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def _refused(argv: list[str], capsys, *parts: str) -> str:
    assert _main(argv) == 2
    err = capsys.readouterr().err
    for part in parts:
        assert part in err, err
    assert "Traceback" not in err
    return err


# ---- item 11 (a): bounded counts ----------------------------------------------------------


@pytest.mark.parametrize(
    ("parse", "good", "bad"),
    [
        (cli_types.count, ["1", "1e9"], ["0", str(10**9 + 1), "1e30", "1e400", "9" * 400]),
        (cli_types.non_negative_count, ["0", "1000000000"], ["-1", "2e9"]),
        (cli_types.positive_int, [str(2**63 - 1)], [str(2**63), "1e300", "inf", "nan"]),
        (cli_types.non_negative_int, ["0"], [str(2**63), "-1"]),
        (cli_types.layer_count, ["10000"], ["10001", "1e24"]),
        (cli_types.seed, ["0", str(2**32 - 1)], [str(2**32), "-1"]),
        (cli_types.seconds, ["0.5", "1e7"], ["1e30", "inf", "0"]),
    ],
)  # fmt: skip
def test_argument_types_bound_their_values(parse, good, bad):
    for text in good:
        assert parse(text) == Decimal(text)  # exact, also for 2**63-1
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match="is not"):
            parse(text)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["train", "--steps", "1e30"], "--steps"),
        (["train", "--steps", str(10**30)], "--steps"),
        (["train", "--eval-batches", "1e12"], "--eval-batches"),
        (["train", "--grad-accum", str(2**64)], "--grad-accum"),
        (["train", "--layers", "1000000"], "--layers"),
        (["train", "--timeout", "1e300"], "--timeout"),
        (["train", "--seed", str(2**70)], "--seed"),
        (["profile", *TINY_LAYER, "--repeats", "1e30"], "--repeats"),
        (["profile", *TINY_LAYER, "--repeats", "0"], "--repeats"),
        (["profile", *TINY_LAYER, "--tokens", str(10**12)], "--tokens"),
        (["profile", *TINY_LAYER, "--nproc", "1e10"], "--nproc"),
        (["plan", "--world", "1e30", *TINY_LAYER], "--world"),
        (["calc", "params", "--layers", "1e24"], "--layers"),
        (["calc", "mem", "--preset", "mixtral-8x7b", "--misc-mem-gib", "1e308"], "--misc-mem-gib"),
        (["plan", "--world", "8", *TINY_LAYER, "--max-memory-gb", "1e308"], "--max-memory-gb"),
        (["plan", "--world", "2", "--d-model", str(10**30), "--d-ff", "8"], "--d-model"),
        (["plan", "--world", "2", *TINY_LAYER, "--map-tokens", "16,1e30"], "--map-tokens"),
        (["plan", "--world", "2", *TINY_LAYER, "--capacity-factor", "nan"], "--capacity-factor"),
        (["profile", *TINY_LAYER, "--capacity-factor", "1e300"], "--capacity-factor"),
        (["train", "--capacity-factor", "inf"], "--capacity-factor"),
    ],
)
def test_commands_refuse_counts_that_never_end(tmp_path, capsys, argv, flag):
    if argv[0] == "train":
        argv = [*argv, "--out", str(tmp_path / "run")]
    _refused(argv, capsys, f"argument {flag}: ")


# ---- item 11 (b): memory estimates before allocating --------------------------------------


def test_training_estimate_is_at_least_the_weights_grads_and_adamw_states():
    """Independent reference: a rank holds every parameter of the model built on one
    rank in fp32 with its gradient and AdamW's two moments (16 bytes each)."""
    for model in (ModelConfig(), ModelConfig(d_model=96, n_layers=3, num_experts=2)):
        built = MoETransformer(model, device=torch.device("meta"))
        params = sum(p.numel() for p in built.parameters())
        cfg = TrainConfig(model=model, out="unused", precision="fp32")
        need = training_bytes(cfg, 1, torch.device("cpu"))
        assert 16 * params <= need < 16 * params + 64 * 2**20  # + activations of a tiny run


@pytest.mark.parametrize(
    "extra",
    [
        ["--d-model", "1000000"],
        ["--d-model", str(2**62), "--heads", "1", "--kv-heads", "1"],
        ["--moe-d-ff", "100000000", "--experts", "64"],
        ["--seq-len", "100000000", "--nproc", "1"],
        ["--batch-size", "1000000000"],
    ],
)
def test_train_refuses_a_model_that_cannot_fit(tmp_path, capsys, extra):
    argv = ["train", *extra, "--out", str(tmp_path / "run")]
    err = _refused(argv, capsys, "adaptive-moe train: error:", "needs about", "this host's RAM")
    assert f"{extra[0]} {extra[1]}" in err  # the flag that asked for it, with its value
    assert not (tmp_path / "run").exists()  # refused before any rank started


def test_train_counts_each_spawned_interpreter(tmp_path, capsys):
    """A thousand tiny ranks: each holds little, but each is a process with torch."""
    argv = ["train", "--nproc", "1000", "--experts", "1000", "--out", str(tmp_path / "run")]
    _refused(argv, capsys, "on 1000 ranks (--nproc", "(1000 ranks x", "this host's RAM")


def test_fit_check_against_the_memory_the_host_has(monkeypatch):
    need = 10 * 2**30
    monkeypatch.setattr(sizes, "host_memory", lambda: 2 * need)
    sizes.check_fits(need, "cpu", "--x 1", ranks=2)  # exactly full: fits
    full = r"--x 1: needs about 30 GiB \(3 ranks x 10 GiB\).* 20 GiB"
    with pytest.raises(ValueError, match=full):
        sizes.check_fits(need, "cpu", "--x 1", ranks=3)
    monkeypatch.setattr(sizes, "host_memory", lambda: None)
    sizes.check_fits(need * 10**9, "cpu", "--x 1")  # unknown memory: nothing refused
    sizes.check_fits(need * 10**9, "meta", "--x 1")


def test_train_counts_every_spawned_rank_against_the_host(tmp_path, capsys, monkeypatch):
    cfg = TrainConfig(model=ModelConfig(), out="unused", batch_size=8)
    one = training_bytes(cfg, 2, torch.device("cpu"))
    monkeypatch.setattr(sizes, "host_memory", lambda: int(1.5 * one))  # one rank fits, two not
    argv = ["train", "--nproc", "2", "--out", str(tmp_path / "run")]
    _refused(argv, capsys, "on 2 ranks", "(2 ranks x")


def test_profile_refuses_a_layer_that_cannot_fit(capsys):
    argv = ["profile", "--d-model", "100000", "--d-ff", "100000", "--experts", "8", "--top-k", "2"]
    shape = "--d-model 100000 --d-ff 100000 --experts 8"
    _refused([*argv, "--nproc", "1"], capsys, shape, "needs about", "GiB")


def test_moe_layer_refuses_expert_weights_beyond_the_device():
    with pytest.raises(ValueError, match=r"MoELayer\(d_model=1000000, d_ff=1000000.*needs about"):
        MoELayer(1_000_000, 1_000_000, 8, 2)
    with pytest.raises(ValueError, match="needs about"):
        MoELayer(4096, 10**9, 64, 2, dtype=torch.bfloat16, device="cpu")
    layer = MoELayer(1_000_000, 1_000_000, 8, 2, device="meta")  # nothing allocated
    assert layer.experts is not None


@pytest.mark.parametrize(
    "argv",
    [
        ["flops", "--preset", "mixtral-8x7b", "--tokens", "1e300"],
        ["mem", "--preset", "mixtral-8x7b", "--weight-bytes", "1e308", "--num-gpus", "1"],
    ],
)
def test_calc_refuses_results_that_overflow(capsys, argv):
    _refused(["calc", *argv], capsys, f"adaptive-moe calc {argv[0]}: error:", "too large")


def test_calc_prints_huge_but_finite_figures(capsys):
    big = str(2**63 - 1)
    shape = ["--hidden", big, "--layers", "3", "--heads", "1", "--vocab", big, "--ffn", big]
    for what in ("params", "flops", "mem"):
        assert main(["calc", what, *shape]) == 0
        out = capsys.readouterr().out
        assert out and not re.search(r"\b(inf|nan)\b", out, re.IGNORECASE), out


# ---- item 12: launch settings ---------------------------------------------------------------


def test_divisors_match_a_direct_search():
    for n in [1, 2, 12, 49, 97, 360, 1024]:
        assert divisors(n) == tuple(d for d in range(1, n + 1) if n % d == 0)


@pytest.mark.parametrize(
    ("argv", "valid"),
    [
        (["train", "--nproc", "2", "--ranks-per-node", "3"], "one of 1, 2"),
        (["train", "--nproc", "4", "--ranks-per-node", "3"], "one of 1, 2, 4"),
        (["profile", *TINY_LAYER, "--nproc", "2", "--ranks-per-node", "3"], "one of 1, 2"),
        (["plan", "--world", "6", "--ranks-per-node", "4", *TINY_LAYER, "--roofline", "h100",
          "--no-plot"], "one of 1, 2, 3, 6"),
        (["plan", "--world", "2", "--ranks-per-node", "3", *TINY_LAYER, "--calibrate",
          "{tmp}/cal.json"], "one of 1, 2"),
    ],
)  # fmt: skip
def test_ranks_per_node_that_does_not_divide_the_world(tmp_path, capsys, argv, valid):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "run")]
    _refused(argv, capsys, "--ranks-per-node must be a positive integer dividing", valid)
    assert not (tmp_path / "cal.json").exists()


def test_launch_names_the_valid_ranks_per_node():
    with pytest.raises(ValueError, match=r"dividing the world size 4 \(one of 1, 2, 4\), got 3"):
        launch(print, 4, ranks_per_node=3)


def test_profile_device_cuda_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for nproc in ("1", "2"):
        argv = ["profile", *TINY_LAYER, "--nproc", nproc, "--device", "cuda"]
        _refused(argv, capsys, "--device cuda: CUDA is not available", "valid here: auto, cpu")


def test_profile_device_cuda_on_spawned_ranks(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # refused before any use
    argv = ["profile", *TINY_LAYER, "--nproc", "2", "--device", "cuda"]
    _refused(argv, capsys, "--device cuda with several ranks needs torchrun", "--nproc 1")


def test_plan_calibrate_refuses_shapes_that_cannot_fit(tmp_path, capsys):
    argv = ["plan", "--calibrate", str(tmp_path / "cal.json"), "--world", "1"]
    shape = ["--d-model", "100000", "--d-ff", "100000", "--experts", "8", "--top-k", "2"]
    _refused([*argv, *shape], capsys, "d_model=100000 (--d-model)", "needs about")
    assert not (tmp_path / "cal.json").exists()


@pytest.mark.parametrize("command", [["train"], ["profile", *TINY_LAYER]])
def test_ranks_per_node_against_the_launchers_world(tmp_path, capsys, monkeypatch, command):
    """Under torchrun the world is WORLD_SIZE: refused before this rank joins a group."""
    env = {"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "LOCAL_WORLD_SIZE": "4"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = [*command, "--ranks-per-node", "3"]
    if command[0] == "train":
        argv += ["--out", str(tmp_path / "run")]
    _refused(argv, capsys, "--ranks-per-node must be a positive integer dividing the world size 4")


@pytest.mark.parametrize(
    ("argv", "parts"),
    [
        (["--device", "cuda"], ["--device cuda: CUDA is not available", "valid here: cpu"]),
        (["--device", "tpu"], ["argument --device: 'tpu' is not a device"]),
        (["--d-model", "1000000", "--d-ff", "1000000"], ["MoELayer(d_model=1000000", "needs"]),
        (["--tokens", "1000000000", "--d-model", "100000"], ["--tokens 1000000000", "needs"]),
        (["--tokens", "1e30"], ["argument --tokens"]),
    ],
)
def test_demo_refuses_what_this_machine_cannot_run(capsys, monkeypatch, argv, parts):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused(["demo", *argv], capsys, *parts)

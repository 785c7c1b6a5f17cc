"""``adaptive-moe plan`` end to end on CPU: a measured (tiny) kernel profile in, a
predicted table and a plot out; ``MoELayer`` takes the table on a matching gloo world,
and online exploration replaces predicted times by measured ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import adaptive_moe as am
from adaptive_moe.cli import main
from adaptive_moe.planning.calibrate import Calibration, CalibrationSpec, measure_rank
from adaptive_moe.planning.cost_model import cpu_overlap
from adaptive_moe.planning.kernel_profile import KernelProfile, measure_kernel_profile
from adaptive_moe.tuning.online import Exploration
from adaptive_moe.tuning.table import StrategyTable
from tests.dist_utils import run_distributed

D, H, E, K, T = 8, 16, 4, 2, 32


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "kernels-cpu.json"
    p = measure_kernel_profile(
        D,
        [H // 2, H],
        [1, 2, 4],
        [1, 16, 64],
        kernels=["loop", "bmm"],
        warmup=0,
        repeats=1,
        progress=False,
    )
    p.save(path)
    return path


def _plan(tmp_path, profile_path, *extra):
    out = tmp_path / "pred.msgpack"
    argv = [
        "plan",
        "--d-model",
        str(D),
        "--d-ff",
        str(H),
        "--experts",
        str(E),
        "--top-k",
        str(K),
        "--kernel-profile",
        str(profile_path),
        "--tokens",
        str(T),
        "--out",
        str(out),
        "--plot-worlds",
        "2,4,8",
        *extra,
    ]
    return main(argv), out


@pytest.mark.timeout(120)
def test_plan_writes_a_predicted_table_and_plot(tmp_path, profile_path, capsys):
    rc, out = _plan(
        tmp_path,
        profile_path,
        "--world",
        "4",
        "--ranks-per-node",
        "2",
        "--links",
        "a100-ndv4",
        "--inter-gbps",
        "10",
        "--measure-host",
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    table = StrategyTable.load(out)
    assert table.predicted is not None and table.predicted["world"] == 4
    assert table.predicted["links"]["inter"]["bandwidth_GBps"] == 10
    assert table.predicted["links"]["name"] == "a100-ndv4+flags(inter)"
    assert table.predicted["host_planning"] == "measured here"
    fp = table.fingerprint
    assert (fp.device, fp.world_size, fp.ranks_per_node, fp.backend) == ("cpu", 4, 2, "gloo")
    assert all(e.how.timer == "predicted" for e in table.entries.values())
    strategies = set(next(iter(table.entries.values())).times_ms)
    assert {s.a2a for s in strategies} == {"linear", "2dh"} and {s.r for s in strategies} == {0, 1}
    for key, entry in table.entries.items():  # every bucket printed with its best
        assert f"{entry.best!s}" in text and str(key) in text
    assert "margin" in text
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--world", "3"], "num_experts=4 must be a multiple of the group size 3"),
        (["--world", "4", "--ranks-per-node", "3"], "--ranks-per-node must be a positive integer"),
        (["--world", "4", "--roofline", "a100"], "exactly one of --kernel-profile"),
        (["--world", "4", "--dtype", "bfloat16"], "measured in float32"),
        (["--world", "4", "--inter-gbps", "0"], "bandwidth_GBps must be a finite number > 0"),
        (["--world", "4", "--max-memory-gb", "1e-6"], "planning W=4, E=4 needs about"),
    ],
)
def test_plan_rejects_bad_settings(tmp_path, profile_path, capsys, extra, message):
    rc, _ = _plan(tmp_path, profile_path, *extra)
    assert rc == 2
    assert message in capsys.readouterr().err


def test_plan_links_file_is_fitted(tmp_path, profile_path, capsys):
    res = [{"bytes": b, "method": "linear", "time_us": 50 + b / 1e3} for b in (1e4, 1e5, 1e6)]
    path = tmp_path / "a2a.json"
    path.write_text(json.dumps({"meta": {"world": 4, "ranks_per_node": 4}, "results": res}))
    rc, out = _plan(tmp_path, profile_path, "--world", "4", "--links-file", str(path), "--no-plot")
    assert rc == 0, capsys.readouterr().err
    links = StrategyTable.load(out).predicted["links"]
    # 3 peers of 1/4 of the bytes: 1 us per kB of the whole message = 0.75 kB per us
    assert links["name"] == "fit:a2a.json"
    assert links["intra"]["bandwidth_GBps"] == pytest.approx(0.75, rel=1e-6)


def _use_worker(rank, world, path):
    warnings.simplefilter("error")  # a mismatch warning would fail the run
    torch.manual_seed(0)
    layer = am.MoELayer(D, H, E, K, table=path, explore=Exploration(every=2, candidates=2))
    predicted = {k: dict(e.times_ms) for k, e in layer.table.entries.items()}
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    for _ in range(6):
        layer(x).sum().backward()
    layer(x)  # settles the last probe
    changed = {
        (k, str(s))
        for k, e in layer.table.entries.items()
        for s, ms in e.times_ms.items()
        if ms != predicted[k][s]
    }
    return changed, str(layer.last_strategy)


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_moelayer_uses_and_explores_the_predicted_table(tmp_path, profile_path, capsys):
    rc, out = _plan(tmp_path, profile_path, "--world", "2", "--ranks-per-node", "2", "--no-plot")
    assert rc == 0, capsys.readouterr().err
    results = run_distributed(_use_worker, 2, (str(out),), timeout=100)
    changed, _ = results[0]
    assert results[1] == results[0], "ranks recorded or chose differently"
    assert changed, "exploration recorded no measured time"


def test_plan_reads_the_layer_from_config_json(tmp_path, profile_path, capsys):
    cfg = {
        "hidden_size": D,
        "moe_intermediate_size": H,
        "num_experts": E,
        "num_experts_per_tok": K,
        "torch_dtype": "float32",
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "c.msgpack"
    argv = [
        "plan",
        "--config",
        str(tmp_path / "config.json"),
        "--world",
        "2",
        "--tokens",
        str(T),
        "--kernel-profile",
        str(profile_path),
        "--out",
        str(out),
        "--no-plot",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    shape = StrategyTable.load(out).shape
    assert (shape.d_model, shape.d_ff, shape.num_experts, shape.top_k) == (D, H, E, K)
    assert main(["plan", "--world", "2", "--roofline", "h100"]) == 2
    assert "--d-model" in capsys.readouterr().err


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_calibrate_measures_one_launch_and_plans_like_its_two_files(tmp_path, capsys):
    """``plan --calibrate``'s measurement (W = 2 gloo ranks, tiny grid) holds the
    exchanges and the slowest rank's kernel profile; planning with ``--calibration``
    gives the same table as ``--links-file`` (its exchanges as a benchmarks/alltoall.py
    file, gloo's one link) plus ``--kernel-profile`` (its profile) plus the overlap of
    the calibrated host."""
    spec = CalibrationSpec(D, H, E, 2, a2a_rows=(64, 256), rows=(1, 16), repeats=1)
    result = run_distributed(measure_rank, 2, (spec,), timeout=200)
    assert result[1] is None
    cal = Calibration(
        result[0]["meta"], result[0]["alltoall"], KernelProfile.from_dict(result[0]["profile"])
    )
    assert cal.meta["world"] == 2 and cal.meta["backend"] == "gloo"
    # per size: the exchange, and the all-gather of one rank's half of it
    assert [(r["bytes"], r["method"]) for r in cal.alltoall] == [
        (64 * D * 4, "linear"),
        (32 * D * 4, "allgather"),
        (256 * D * 4, "linear"),
        (128 * D * 4, "allgather"),
    ]
    assert all(r["time_us"] > 0 for r in cal.alltoall)
    assert cal.links().step_us is not None  # fitted to the all-gathers
    assert cal.profile.kernels == ("loop", "bmm") and cal.profile.rows == (1, 16)
    assert (cal.profile.hidden, cal.profile.experts) == ((H,), (2, E))  # r = 0 and s = 1
    cal.save(tmp_path / "cal.json")
    a2a = tmp_path / "a2a.json"
    a2a.write_text(json.dumps({"meta": cal.meta, "results": cal.alltoall}))
    cal.profile.save(tmp_path / "kernels.json")
    common = ["plan", "--d-model", str(D), "--d-ff", str(H), "--experts", str(E)]
    common += ["--top-k", str(K), "--world", "4", "--ranks-per-node", "2", "--tokens", str(T)]
    common += ["--no-plot"]
    one = tmp_path / "one.msgpack"
    assert main([*common, "--calibration", str(tmp_path / "cal.json"), "--out", str(one)]) == 0
    two = tmp_path / "two.msgpack"
    overlap = cpu_overlap(2, cal.meta["cores"])
    argv = [*common, "--links-file", str(a2a), "--links-one-level", "--copy-gbps", "5"]
    argv += ["--kernel-profile", str(tmp_path / "kernels.json"), "--overlap", str(overlap)]
    assert main([*argv, "--out", str(two)]) == 0, capsys.readouterr().err
    got, want = StrategyTable.load(one), StrategyTable.load(two)
    assert got.predicted["overlap"] == want.predicted["overlap"] == overlap
    assert {k: e.times_ms for k, e in got.entries.items()} == {
        k: e.times_ms for k, e in want.entries.items()
    }
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main([*common, "--calibration", str(bad)]) == 2
    assert "not a calibration" in capsys.readouterr().err
    argv = [*common, "--calibration", str(tmp_path / "cal.json"), "--roofline", "a100"]
    assert main(argv) == 2
    assert "drop --kernel-profile/--roofline" in capsys.readouterr().err


def test_plan_what_if_for_a_preset_prints_the_step_and_draws_the_map(tmp_path, capsys):
    out, png = tmp_path / "olmoe.msgpack", tmp_path / "map.png"
    argv = ["plan", "--preset", "olmoe-1b-7b", "--world", "8", "--roofline", "a100"]
    argv += ["--links", "a100-ndv4", "--tokens", "64", "--out", str(out), "--no-plot"]
    argv += ["--map", str(png), "--plot-worlds", "4,8,16", "--map-tokens", "16,64"]
    assert main(argv) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    table = StrategyTable.load(out)
    shape = table.shape
    assert (shape.d_model, shape.d_ff, shape.num_experts, shape.top_k) == (2048, 1024, 64, 8)
    assert "the 16 MoE layers' forward + backward per step" in text
    for key, entry in table.entries.items():
        ranked = sorted(entry.times_ms.values())
        row = next(line for line in text.splitlines() if line.split()[:1] == [str(key)])
        # the step's MoE time: 16 layers at the best and at the runner-up
        assert row.split()[-2:] == [f"{16 * ranked[0]:.1f}", f"{16 * ranked[1]:.1f}"]
        assert f"{(ranked[1] / ranked[0] - 1) * 100:.1f}%" in row
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*argv[:-6], "--moe-layers", "2"]) == 0
    assert "the 2 MoE layers'" in capsys.readouterr().out
    (tmp_path / "empty.json").write_text("{}")  # an existing file: refused for the pair
    assert main([*argv, "--config", str(tmp_path / "empty.json")]) == 2
    assert "at most one of --preset and --config" in capsys.readouterr().err


_NO_TORCH = """
import sys
from adaptive_moe.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "triton", "transformers") if m in sys.modules)
print("heavy modules:", heavy)
sys.exit(rc or (3 if heavy else 0))
"""


@pytest.mark.parametrize("compute", ["roofline", "kernel-profile"])
def test_planning_does_not_import_torch(tmp_path, profile_path, compute):
    """Plain planning (a roofline or a saved kernel profile, no --calibrate) loads only
    numpy, matplotlib and the planning modules: a subprocess, so that the modules this
    test process already holds do not count."""
    source = ["--roofline", "a100"] if compute == "roofline" else ["--kernel-profile"]
    source += [str(profile_path)] if compute == "kernel-profile" else []
    argv = ["plan", "--d-model", str(D), "--d-ff", str(H), "--experts", str(E), "--top-k"]
    argv += [str(K), "--world", "16", "--tokens", str(T), "--links", "a100-ndv4", *source]
    argv += ["--out", str(tmp_path / "p.msgpack"), "--plot-worlds", "8,16"]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, *argv], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "heavy modules: []" in done.stdout


def test_the_light_dtype_and_version_facts_match_torch():
    """``core.dtype_names`` and ``table.torch_version`` stand in for torch when planning."""
    from adaptive_moe.core.dtype_names import ITEMSIZES
    from adaptive_moe.core.dtypes import TORCH_DTYPES
    from adaptive_moe.tuning.table import torch_version

    assert {n: t.itemsize for n, t in TORCH_DTYPES.items()} == dict(ITEMSIZES)
    assert torch_version() == ".".join(torch.__version__.split("+")[0].split(".")[:2])

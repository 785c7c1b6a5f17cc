"""The profiler: synthetic routing, the sweep, ``profile_layer`` on 2 gloo ranks, and the
``adaptive-moe profile`` command end to end."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaptive_moe.profiling import cli as profile_cli
from adaptive_moe.profiling import profiler
from adaptive_moe.tuning.table import Fingerprint, LayerShape, StrategyTable
from adaptive_moe.tuning.workload import Buckets
from tests import reference
from tests.dist_utils import run_distributed

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"

# ---- synthetic routing -----------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, world, experts, k",
    [(16, 2, 4, 2), (7, 3, 6, 3), (5, 4, 2, 1), (9, 1, 8, 8), (4, 2, 1, 1)],
)
def test_synthetic_routing_has_the_requested_workload(tokens, world, experts, k):
    lo, hi = profiler.workload_range(tokens, world, experts, k)
    assert lo == -(-tokens * world * k // experts) and hi == tokens * world
    for target in sorted({lo, (lo + hi) // 2, hi}):
        ids = profiler.synthetic_routing(tokens, world, experts, k, target, seed=3)
        assert ids.shape == (world, tokens, k) and ids.dtype == torch.int64
        flat = ids.reshape(-1, k)
        assert int(flat.min()) >= 0 and int(flat.max()) < experts
        # no token picks one expert twice
        assert all(len(set(row)) == k for row in flat.tolist())
        counts = torch.bincount(flat.flatten(), minlength=experts)
        assert int(counts.max()) == target
        assert int(counts.sum()) == tokens * world * k
        # the others are as even as possible
        rest = counts.sort(descending=True).values[1:]
        if len(rest):
            assert int(rest.max()) - int(rest.min()) <= 1


def test_synthetic_routing_is_seeded_and_shuffled():
    a = profiler.synthetic_routing(64, 2, 8, 2, 100, seed=1)
    b = profiler.synthetic_routing(64, 2, 8, 2, 100, seed=1)
    c = profiler.synthetic_routing(64, 2, 8, 2, 100, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the hot expert's tokens are spread over both ranks, not packed on one
    hot = int(torch.bincount(a.flatten()).argmax())
    per_rank = [(a[r] == hot).any(1).sum().item() for r in range(2)]
    assert min(per_rank) > 20


@pytest.mark.parametrize("target", [31, 129])
def test_synthetic_routing_refuses_impossible_workloads(target):
    with pytest.raises(ValueError, match=r"max_tokens must be in \[32, 128\]"):
        profiler.synthetic_routing(64, 2, 8, 2, target, seed=0)


def test_capacity_factor_caps_the_sweep():
    # T=64, E=8, k=2: capacity per rank per expert 2*ceil(1.5*8) = 24, so at most 48 rows
    assert profiler.workload_range(64, 2, 8, 2, capacity_factor=1.5) == (32, 48)
    assert profiler.workload_range(64, 2, 8, 2, capacity_factor=-1.5) == (32, 48)
    assert profiler.workload_range(64, 2, 8, 2) == (32, 128)


def test_sweep_keys_span_the_range_and_stay_in_their_buckets():
    b = Buckets()
    sweep = profiler.sweep_keys(b, 32, 1024, 4)  # keys 6..11
    keys = [k for k, _ in sweep]
    assert keys[0] == 6 and keys[-1] == 11 and len(keys) == 4 and keys == sorted(set(keys))
    for key, max_tokens in sweep:
        assert 32 <= max_tokens <= 1024 and b.key(max_tokens) == key
    assert [k for k, _ in profiler.sweep_keys(b, 32, 1024, 100)] == list(range(6, 12))
    assert profiler.sweep_keys(b, 40, 40, 5) == [(6, 40)]
    lin = profiler.sweep_keys(Buckets("linear", window=128), 100, 300, 10)
    assert lin == [(0, 100), (1, 191), (2, 300)]


# ---- command-line inputs ----------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    profile_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mixtral-8x7b.json", (4096, 14336, 8, 2)),
        ("qwen3-30b-a3b.json", (2048, 768, 128, 8)),  # moe_intermediate_size wins
        ("deepseek-v3.json", (7168, 2048, 256, 8)),  # n_routed_experts
        ("olmoe-1b-7b.json", (2048, 1024, 64, 8)),  # num_experts
    ],
)
def test_shape_from_transformers_config(name, expected):
    spec = profile_cli.spec_from_args(_args("--config", str(FIXTURES / name)))
    assert (spec.d_model, spec.d_ff, spec.experts, spec.top_k) == expected
    assert spec.dtype == "bfloat16" and spec.activation == "silu" and spec.glu


def test_flags_override_the_config():
    spec = profile_cli.spec_from_args(
        _args(
            "--config",
            str(FIXTURES / "mixtral-8x7b.json"),
            "--d-ff",
            "256",
            "--dtype",
            "float32",
            "--no-glu",
        )
    )
    assert (spec.d_model, spec.d_ff, spec.dtype, spec.glu) == (4096, 256, "float32", False)


@pytest.mark.parametrize(
    "argv, match",
    [
        (("--d-model", "8", "--experts", "4"), "--d-ff, --top-k"),
        (("--d-model", "8", "--d-ff", "8", "--experts", "4", "--top-k", "5"), "top_k"),
        (
            ("--d-model", "8", "--d-ff", "8", "--experts", "4", "--top-k", "2", "--kernels", "cub"),
            "kernels",
        ),
    ],
)
def test_bad_profile_flags_are_named(argv, match):
    with pytest.raises(ValueError, match=match):
        profile_cli.spec_from_args(_args(*argv))


def test_profile_command_reports_bad_flags_without_starting_workers(capsys):
    from adaptive_moe.cli import main

    assert main(["profile", "--d-model", "8", "--d-ff", "8", "--experts", "4"]) == 2
    err = capsys.readouterr().err
    assert "adaptive-moe profile: error:" in err and "--top-k" in err


def test_unreadable_config_is_named(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=str(bad)):
        profile_cli.spec_from_args(_args("--config", str(bad)))


def test_default_path_names_what_was_measured():
    fp = Fingerprint("NVIDIA H100 80GB HBM3", 8, 8, "nccl", "2.11")
    shape = LayerShape(4096, 14336, 8, 2, True, "bfloat16", 1)
    assert str(profile_cli.default_path(fp, shape)) == (
        "profiles/nvidia-h100-80gb-hbm3-nccl-1x8-d4096-h14336-e8-k2-glu-bf16.msgpack"
    )


def test_shipped_profiles_load_and_are_named_for_what_they_measured():
    shipped = sorted((ROOT / "profiles").glob("*.msgpack"))
    assert any(p.name.startswith("cpu-gloo-1x2-") for p in shipped)
    assert any(p.name.startswith("cpu-gloo-2x2-") for p in shipped)
    for path in shipped:
        table = StrategyTable.load(path)
        assert profile_cli.default_path(table.fingerprint, table.shape).name == path.name
        assert table.entries, path
        assert path.name in (ROOT / "profiles" / "README.md").read_text()


# ---- measuring on 2 gloo ranks ----------------------------------------------------------


def _profile_worker(rank, world):
    from adaptive_moe.runtime.layer import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, top_k=2)
    before = [p.detach().clone() for p in layer.parameters()]
    kernel = layer.default_strategy.kernel
    chosen = [s for s in layer.strategies() if s.kernel == kernel and s.degree <= 2]
    table = profiler.profile_layer(
        layer, 16, num_buckets=3, repeats=2, warmup=1, strategies=chosen, progress=False
    )
    unchanged = all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    no_grads = all(p.grad is None for p in layer.parameters())
    return table, chosen, layer.fingerprint(), layer.layer_shape(), unchanged and no_grads


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_profile_layer_on_two_ranks():
    results = run_distributed(_profile_worker, 2, timeout=100)
    (table, chosen, fp, shape, clean), (other, *_rest) = results
    assert table == other  # every rank holds the same table, dates included
    assert clean  # weights untouched, gradients cleared
    assert table.fingerprint == fp and table.shape == shape
    # T=16 per rank, W=2, E=4, k=2: workload 16 (balanced) .. 32 (all on one expert)
    assert sorted(table.entries) == [Buckets().key(16), Buckets().key(32)]
    chosen = set(chosen)
    for key, entry in table.entries.items():
        assert set(entry.times_ms) == chosen
        assert entry.best == min(entry.times_ms, key=lambda s: (entry.times_ms[s], s))
        assert entry.how.repeats == 2 and entry.how.warmup == 1
        assert entry.how.timer == "perf_counter" and entry.how.tokens_per_rank == 16
        assert Buckets().key(entry.how.max_tokens) == key
        assert entry.how.skew == pytest.approx(entry.how.max_tokens / 16)


# ---- what the timed region runs -------------------------------------------------------

_PASSES = (1, 2)  # (warmup, repeats) per strategy and bucket


def _spy_exchange(layer, seen: list) -> None:
    """Record every count exchange of ``layer`` (the real one runs; its result is kept)."""
    exchange = layer.executor.exchange_counts

    def spy(kept, demand, **kw):  # kw: the layer's agreement flags (extra=)
        out = exchange(kept, demand, **kw)
        seen.append(out)
        return out

    layer.executor.exchange_counts = spy


def _spied_profile_worker(rank, world, capacity_factor=0.0):
    """Profile a layer with a shared expert while counting what each pass ran: the
    router (and the ids it handed on), the count exchange (and its result), the router's
    weight gradient, the shared expert, and the busiest expert's rows the layer saw."""
    from adaptive_moe.runtime.layer import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, top_k=2, shared_d_ff=8, capacity_factor=capacity_factor)
    # A user's forward first: its statistics and last-forward attributes must survive.
    layer(torch.randn(8, 16), strategy=layer.default_strategy)
    before = (layer.stats(), layer.last_strategy, layer.last_max_tokens, layer.aux_loss)

    seen = {"ids": [], "exchange": [], "router_grad": 0, "shared": 0, "max_tokens": []}
    layer.router.register_forward_hook(lambda m, a, out: seen["ids"].append(out.topk_ids))
    _spy_exchange(layer, seen["exchange"])

    def count(name):
        seen[name] += 1

    layer.router.weight.register_hook(lambda g: count("router_grad"))
    layer.shared.register_forward_hook(lambda m, a, out: count("shared"))
    layer.register_forward_hook(lambda m, a, out: seen["max_tokens"].append(m.last_max_tokens))
    kernel = layer.default_strategy.kernel
    chosen = [s for s in layer.strategies() if s.kernel == kernel and s.degree == 1][:2]
    warmup, repeats = _PASSES
    table = profiler.profile_layer(
        layer, 16, num_buckets=2, repeats=repeats, warmup=warmup, strategies=chosen,
        capacity_factor=capacity_factor, progress=False, outliers=None,  # passes are counted
    )  # fmt: skip
    after = (layer.stats(), layer.last_strategy, layer.last_max_tokens, layer.aux_loss)
    return table, chosen, seen, before, after


def _check_every_pass_ran_the_layer(table, chosen, seen, before, after):
    passes = len(table.entries) * len(chosen) * sum(_PASSES)
    assert len(table.entries) == 2
    # every pass, the timed ones included, ran the router, the count exchange, the
    # router's backward and the shared expert (warm-up alone would be a third of these)
    assert len(seen["ids"]) == len(seen["exchange"]) == passes
    assert seen["router_grad"] == seen["shared"] == len(seen["max_tokens"]) == passes
    # the profiler's passes are not the user's
    assert after[0] == before[0] and after[1:3] == before[1:3] and after[3] is before[3]


def _check_workload_is_exact(table, chosen, seen, rank, world):
    per_bucket = len(chosen) * sum(_PASSES)
    for i, (key, entry) in enumerate(sorted(table.entries.items())):
        target = entry.how.max_tokens
        expected = profiler.synthetic_routing(16, world, 4, 2, target, seed=key)[rank]
        for j in range(i * per_bucket, (i + 1) * per_bucket):
            # the layer routed by this rank's slice of the bucket's synthetic routing
            assert torch.equal(seen["ids"][j], expected)
            # and the exchange gave every rank the group's counts: the hot expert has
            # exactly the bucket's rows, the others share the rest evenly
            counts = seen["exchange"][j]
            group = [sum(col) for col in zip(*counts.kept)]
            assert group == counts.demand.tolist() and counts.demand_total == sum(group)
            assert max(group) == counts.max_tokens == target == seen["max_tokens"][j]
            rest = sorted(group)[:-1]
            assert sum(group) == 16 * world * 2 and max(rest) - min(rest) <= 1


def test_profiler_times_the_layer_forward_on_one_process():
    table, chosen, seen, before, after = _spied_profile_worker(0, 1)
    _check_every_pass_ran_the_layer(table, chosen, seen, before, after)


def test_after_profiling_the_layer_routes_by_its_router_again():
    from adaptive_moe.runtime.layer import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, top_k=2)
    profiler.profile_layer(layer, 16, num_buckets=1, repeats=1, warmup=0, progress=False)
    seen = []
    layer.router.register_forward_hook(lambda m, a, out: seen.append(out.topk_ids))
    x = torch.randn(32, 16)
    layer(x, strategy=layer.default_strategy)
    scores = torch.softmax(x @ layer.router.weight.detach().T, dim=-1)
    assert torch.equal(seen[0].sort(1).values, scores.topk(2).indices.sort(1).values)


# 1.5: the router drops slots of its own choice (capacity 12 of 32 slots per expert),
# the synthetic ids it is overridden by are all kept: the sweep stops at the capacity
@pytest.mark.parametrize("capacity_factor", [0.0, 1.5])
def test_profiled_workload_is_exact_on_one_process(capacity_factor):
    table, chosen, seen, _before, _after = _spied_profile_worker(0, 1, capacity_factor)
    workloads = sorted(e.how.max_tokens for e in table.entries.values())
    assert workloads == ([11] if capacity_factor else [11, 16])  # buckets' representatives
    _check_workload_is_exact(table, chosen, seen, 0, 1)


@pytest.mark.parametrize("target", [12, 24])  # T=24, E=4, k=2: balanced .. one hot expert
def test_profiled_pass_is_the_training_step_with_the_injected_routing(target):
    """One profiled pass computes the gradients of ``(y * dy).sum() + 0.01 * aux + 0.001 * z``
    of the layer forward whose router ran on x but whose slots go where the synthetic ids
    say (float64 reference: real router scores and gates, per-expert loop, shared expert,
    balance loss on the synthetic demand)."""
    from adaptive_moe.runtime.layer import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, top_k=2, shared_d_ff=8)
    batch = profiler._make_batch(layer, 0, 1, 24, target, seed=5)
    with layer._profiling_routing(profiler._routed_as(batch)):
        profiler._one_pass(layer, batch, layer.default_strategy)
    assert layer.last_max_tokens == 0  # put back after the pass

    w = reference.full_weights(layer)
    x = batch.x.detach().double().requires_grad_(True)
    _ids, gates, logits, scores, _demand = reference.route(x, w, k=2)
    ids = batch.topk_ids
    assert int(torch.bincount(ids.flatten(), minlength=4).max()) == target
    y = reference.experts_forward(x, ids, gates, w, glu=True, activation="silu")
    y = y + reference.shared_forward(x, w, "silu")
    balance, z = reference.aux_losses(scores, logits, torch.bincount(ids.flatten(), minlength=4))
    ((y * batch.dy.double()).sum() + 0.01 * balance + 0.001 * z).backward()
    s = layer.shared
    pairs = [
        (layer.router.weight.grad, w.router.grad),
        (layer.experts.w1.grad, w.w1.grad),
        (layer.experts.down_proj.grad, w.w2.grad),
        (s.gate_proj.weight.grad, w.shared[0].grad),
        (s.down_proj.weight.grad, w.shared[2].grad),
        (batch.x.grad, x.grad),
    ]
    for got, want in pairs:
        assert reference.rel_err(got, want) < 1e-5


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_profiler_times_the_layer_forward_on_two_ranks():
    results = run_distributed(_spied_profile_worker, 2, timeout=100)
    assert results[0][0] == results[1][0]  # the same table on both ranks
    for rank, (table, chosen, seen, before, after) in enumerate(results):
        assert {s.r for s in chosen} == {0, 1}  # DP and EP (an all-to-all)
        _check_every_pass_ran_the_layer(table, chosen, seen, before, after)
        _check_workload_is_exact(table, chosen, seen, rank, 2)


# ---- the command line, end to end -------------------------------------------------------


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_profile_cli_on_two_cpu_ranks(tmp_path):
    out = tmp_path / "small.msgpack"
    cmd = [
        sys.executable,
        "-m",
        "adaptive_moe",
        "profile",
        "--d-model",
        "16",
        "--d-ff",
        "32",
        "--experts",
        "4",
        "--top-k",
        "2",
        "--tokens",
        "32",
        "--nproc",
        "2",
        "--buckets",
        "2",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--max-degree",
        "2",
        "--kernels",
        "loop,bmm",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = StrategyTable.load(out)
    major, minor = torch.__version__.split(".")[:2]
    assert table.fingerprint == Fingerprint("cpu", 2, 2, "gloo", f"{major}.{minor}")
    assert table.shape == LayerShape(16, 32, 4, 2, True, "float32", 1)
    assert len(table.entries) == 2
    measured = {s for e in table.entries.values() for s in e.times_ms}
    assert {s.kernel for s in measured} == {"loop", "bmm"}
    assert {s.degree for s in measured} == {1, 2} and {s.r for s in measured} == {0, 1}
    assert f"wrote {out}" in proc.stdout and "speed-up" in proc.stdout
    # announced before measuring, and counted after: the same runs
    runs = sum(len(e.times_ms) for e in table.entries.values())
    assert f"measuring 2 workload buckets x {len(measured)} strategies = {runs} runs" in (
        proc.stdout
    )
    assert f"measured {runs} runs (2 buckets)" in proc.stdout
    for key, entry in table.entries.items():
        assert str(entry.best) in proc.stdout and str(key) in proc.stdout


# ---- one GPU --------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_profile_layer_on_one_gpu(tmp_path):
    from adaptive_moe.runtime.layer import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(128, 256, 8, top_k=2, dtype=torch.bfloat16, device="cuda")
    table = profiler.profile_layer(layer, 1024, num_buckets=2, repeats=3, warmup=1, progress=False)
    assert table.fingerprint == layer.fingerprint()
    assert table.fingerprint.device == torch.cuda.get_device_name()
    assert table.shape.dtype == "bfloat16" and len(table.entries) == 2
    for entry in table.entries.values():
        assert entry.how.timer == "cuda-events"
        assert set(entry.times_ms) == set(layer.strategies())  # a small layer fits
    table.save(tmp_path / "gpu.msgpack")
    assert StrategyTable.load(tmp_path / "gpu.msgpack") == table


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_strategies_that_do_not_fit_are_skipped(monkeypatch):
    from adaptive_moe.runtime.layer import MoELayer

    layer = MoELayer(128, 256, 8, top_k=2, dtype=torch.bfloat16, device="cuda")
    total = torch.cuda.mem_get_info()[1]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    with pytest.warns(UserWarning, match="no strategy fits"):
        table = profiler.profile_layer(
            layer, 256, num_buckets=1, repeats=1, warmup=0, progress=False
        )
    assert table.entries == {}

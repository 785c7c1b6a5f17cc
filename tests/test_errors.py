"""Hostile inputs that used to escape as TypeError / OverflowError / IndexError / tracebacks
(issue 16's audit): each now raises ValueError naming the argument, or, for the CLI, exits
non-zero with one line naming the file; ranks that disagree all fail with one message."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import adaptive_moe as am
from adaptive_moe.cli import main
from adaptive_moe.core.config import MAX_CAPACITY_FACTOR, ExpertConfig
from adaptive_moe.runtime.inference import InferenceConfig
from adaptive_moe.training.checkpoint import check_checkpoint, latest_checkpoint
from adaptive_moe.training.model import ModelConfig
from adaptive_moe.tuning.workload import Buckets
from tests.dist_utils import run_distributed

D, H = 8, 12


# ---- the layer --------------------------------------------------------------------------


@pytest.mark.parametrize("cf", [1e30, -1e30, float("inf"), MAX_CAPACITY_FACTOR * 2])
def test_huge_capacity_factor_is_refused_at_construction(cf):
    with pytest.raises(ValueError, match=r"capacity_factor must be finite with \|f\| <= 1e\+06"):
        am.MoELayer(D, H, 4, 2, capacity_factor=cf)


def test_largest_allowed_capacity_factor_keeps_every_slot():
    """|f| = 1e6 is accepted and keeps every slot: the capacity is capped at T, where
    ceil(f k T / E) alone would be ~1e7 for these sizes."""
    torch.manual_seed(0)
    layer = am.MoELayer(D, H, 4, 2, capacity_factor=MAX_CAPACITY_FACTOR)
    routing = layer.router(torch.randn(33, D))
    assert (routing.topk_ids >= 0).all()


@pytest.mark.parametrize("cf", ["1", None, True, [1.0]])
def test_capacity_factor_of_the_wrong_type(cf):
    with pytest.raises(ValueError, match="capacity_factor must be a number"):
        am.MoELayer(D, H, 4, 2, capacity_factor=cf)


def test_model_config_capacity_factor():
    with pytest.raises(ValueError, match=r"ModelConfig\.capacity_factor"):
        ModelConfig(capacity_factor=1e30)
    with pytest.raises(ValueError, match=r"ModelConfig\.capacity_factor"):
        ModelConfig(capacity_factor="1")


@pytest.mark.parametrize(
    "ids,weights,match",
    [
        (torch.zeros(5, 2), torch.ones(5, 2), "integer tensor"),
        (torch.zeros(5, dtype=torch.long), torch.ones(5), r"\[T, k\]"),
        (torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2), "T=5 rows"),
        (torch.zeros(5, 2, dtype=torch.long), torch.ones(5, 3), r"\[T, k\]"),
        (torch.full((5, 2), 4), torch.ones(5, 2), r"\[-1, 4\)"),
        (torch.zeros(5, 2, dtype=torch.long), torch.ones(5, 2, dtype=torch.long), "floating"),
        ([[0, 1]] * 5, torch.ones(5, 2), r"\[T, k\]"),
    ],
)
def test_forward_routed_bad_routing(ids, weights, match):
    layer = am.MoELayer(D, H, 4, 2)
    with pytest.raises(ValueError, match=match):
        layer.forward_routed(torch.randn(5, D), ids, weights)


def test_forward_routed_accepts_int32_ids():
    """Any integer dtype is an id tensor (the check is not a dtype whitelist)."""
    torch.manual_seed(0)
    layer = am.MoELayer(D, H, 4, 2)
    x, w = torch.randn(5, D), torch.rand(5, 2)
    ids = torch.randint(0, 4, (5, 2))
    ref = layer.forward_routed(x, ids, w)
    assert torch.equal(layer.forward_routed(x, ids.int(), w), ref)


def test_load_expert_weights_with_a_list_or_list_values():
    layer = am.MoELayer(D, H, 4, 2)
    w1 = torch.randn(4, 2 * H, D)
    with pytest.raises(ValueError, match="mapping of name"):
        layer.load_expert_weights([w1])
    with pytest.raises(ValueError, match=r"gate_up_proj must be a torch\.Tensor"):
        layer.load_expert_weights(gate_up_proj=w1.tolist())
    layer.load_expert_weights({"gate_up_proj": w1})  # a mapping is the positional form
    assert torch.equal(layer.experts.gate_up_proj, w1)


@pytest.mark.parametrize("name", ["gate_up_proj", "down_proj"])
@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda t: t.long(), "must be a floating-point tensor, got dtype torch.int64"),
        (lambda t: t.to(torch.int8), "must be a floating-point tensor, got dtype torch.int8"),
        (lambda t: t.index_fill(0, torch.tensor([3]), float("nan")), "holds NaN or infinite"),
        (lambda t: t.index_fill(0, torch.tensor([0]), -float("inf")), "holds NaN or infinite"),
    ],
)
def test_load_expert_weights_refuses_integer_and_non_finite_tensors(name, bad, match):
    layer = am.MoELayer(D, H, 4, 2)
    before = layer.experts.gate_up_proj.detach().clone()
    full = torch.randn(layer.experts.full_shape(name))
    with pytest.raises(ValueError, match=f"{name} {match}"):
        layer.load_expert_weights(**{name: bad(full)})
    assert torch.equal(layer.experts.gate_up_proj, before)  # nothing was loaded


def test_a_meta_input_or_a_layer_on_meta_is_refused():
    with pytest.raises(ValueError, match="x is on the meta device"):
        am.MoELayer(D, H, 4, 2)(torch.randn(3, D, device="meta"))
    with pytest.raises(ValueError, match="layer's weights are on the meta device"):
        am.MoELayer(D, H, 4, 2, device="meta")(torch.randn(3, D))


def _mutate_data(t: torch.Tensor) -> torch.Tensor:
    t.data.clamp_(min=0)  # hidden from the version counter
    return t


@pytest.mark.parametrize(
    "activation",
    [
        torch.relu_,
        functools.partial(torch.nn.functional.silu, inplace=True),
        functools.partial(torch.nn.functional.relu, inplace=True),
        torch.nn.ReLU(inplace=True),
        lambda t: t.mul_(torch.sigmoid(t)),
        _mutate_data,
    ],
)
def test_in_place_activations_are_refused_at_construction(activation):
    with pytest.raises(ValueError, match="modifies its input in place"):
        am.MoELayer(D, H, 4, 2, activation=activation)
    with pytest.raises(ValueError, match="modifies its input in place"):
        ExpertConfig(D, H, 4, activation=activation)


def test_callable_activations_that_leave_their_input_alone_are_accepted():
    for fn in (
        torch.tanh,
        lambda t: t,
        functools.partial(torch.nn.functional.gelu, approximate="tanh"),
    ):
        am.MoELayer(D, H, 4, 2, activation=fn)
    with pytest.raises(ValueError, match=r"must be elementwise .* returned \(\)"):
        am.MoELayer(D, H, 4, 2, activation=lambda t: t.sum())


@pytest.mark.parametrize("field", ["r", "degree"])
@pytest.mark.parametrize("value", [True, False, 1.0, "1", None])
def test_strategy_int_fields_refuse_bools_and_non_ints(field, value):
    with pytest.raises(ValueError, match=f"Strategy.{field} must be"):
        am.Strategy(**{field: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        am.MoELayer(D, H, 4, 2, device="cuda")


def test_unknown_device_string():
    with pytest.raises(ValueError, match="device must be"):
        am.MoELayer(D, H, 4, 2, device="gpu0")


# ---- the training command ---------------------------------------------------------------

TINY = [
    "--d-model", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--d-ff", "32",
    "--experts", "2", "--moe-d-ff", "16", "--seq-len", "16", "--data-max-bytes", "40000",
    "--no-table", "--no-progress", "--timeout", "60", "--batch-size", "2",
]  # fmt: skip


def test_train_capacity_factor_1e30_is_a_flag_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", *TINY, "--out", str(tmp_path / "r"), "--capacity-factor", "1e30"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--capacity-factor" in err and "1e+06" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One finished 2-step run on one spawned rank (its checkpoint is what we damage)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", *TINY, "--out", str(out), "--steps", "2", "--nproc", "1"]) == 0
    return out


def _damaged(tiny_run: Path, tmp_path: Path, damage) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    ckpt = latest_checkpoint(out / "checkpoints")
    return out, damage(ckpt)


def _truncate_metadata(ckpt: Path) -> Path:
    path = ckpt / ".metadata"
    path.write_bytes(path.read_bytes()[:50])
    return path


def _remove_shard(ckpt: Path) -> Path:
    (shard,) = ckpt.glob("*.distcp")
    shard.unlink()
    return shard


def _truncate_shard(ckpt: Path) -> Path:
    (shard,) = ckpt.glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:100])
    return shard


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "damage,what",
    [
        (_truncate_metadata, "truncated or corrupt"),
        (_remove_shard, "shard file missing"),
        (_truncate_shard, "shard file truncated"),
    ],
)
def test_resume_from_a_damaged_checkpoint_is_one_line(tiny_run, tmp_path, damage, what, capfd):
    out, bad_file = _damaged(tiny_run, tmp_path, damage)
    capfd.readouterr()
    assert main(["train", *TINY, "--out", str(out), "--steps", "3", "--resume"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert str(bad_file) in err[0] and what in err[0]
    # The library call says the same (Checkpointer.load runs this check first).
    with pytest.raises(ValueError, match=what):
        check_checkpoint(bad_file.parent)


def _flip_shard_bytes(ckpt: Path) -> Path:
    """Same size, some bytes inverted in the middle of the tensor data."""
    (shard,) = ckpt.glob("*.distcp")
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4] = bytes(b ^ 0xFF for b in data[mid : mid + 4])
    shard.write_bytes(bytes(data))
    return shard


@pytest.mark.timeout(120)
def test_resume_from_a_shard_with_flipped_bytes_is_refused(tiny_run, tmp_path, capfd):
    out, bad_file = _damaged(tiny_run, tmp_path, _flip_shard_bytes)
    assert (
        bad_file.stat().st_size == next(tiny_run.glob("checkpoints/step_*/*.distcp")).stat().st_size
    )
    check_checkpoint(bad_file.parent)  # the cheap check cannot see it ...
    capfd.readouterr()
    argv = ["train", *TINY, "--out", str(out), "--steps", "3", "--resume", "--nproc", "1"]
    assert main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()  # ... loading does, naming the file
    assert len(err) == 1 and f"{bad_file}: corrupt (sha256" in err[0], err
    assert not (out / "checkpoints" / "step_00000003").exists()


def test_intact_checkpoint_passes_the_check(tiny_run):
    check_checkpoint(latest_checkpoint(tiny_run / "checkpoints"))


# ---- ranks that disagree ----------------------------------------------------------------


CASES = {
    "strategy": "force different strategies (rank 0: r=1,linear,d=1,loop, rank 1: r=0",
    "invalid_strategy": "rank(s) [1] of the expert group forced a strategy",
    "bad_id": "rank(s) [1] of the expert group passed topk_ids outside [-1, num_experts)",
    "float_ids": "rank(s) [0] of the expert group passed topk_ids that are not an integer",
    "top_k": "rank(s) [1] of the expert group passed a top_k outside",
    "capacity": "rank(s) [0] of the expert group passed a capacity_factor that is not",
}


def _disagreeing_worker(rank: int, world: int) -> dict[str, str]:
    """Every case in turn on the same two ranks (one spawn): each must raise on both
    ranks, after which the ranks still run a forward together."""
    torch.manual_seed(0)
    layer = am.MoELayer(D, H, 2, 1)
    x = torch.randn(6, D)
    out = {}
    for case in CASES:
        try:
            if case == "strategy":
                layer(x, strategy=am.Strategy(r=1) if rank == 0 else am.Strategy(r=0))
            elif case == "invalid_strategy":
                layer(x, strategy=am.Strategy(r=2) if rank == 1 else None)
            elif case == "bad_id":
                ids = torch.zeros(6, 1, dtype=torch.long)
                ids[3, 0] = 99 if rank == 1 else 1
                layer.forward_routed(x, ids, torch.ones(6, 1))
            elif case == "float_ids":
                ids = torch.zeros(6, 1)
                layer.forward_routed(x, ids if rank == 0 else ids.long(), torch.ones(6, 1))
            elif case == "top_k":
                layer(x, top_k=3 if rank == 1 else 1)
            else:
                layer(x, capacity_factor="1" if rank == 0 else 0.5)
            out[case] = "no error"
        except ValueError as err:
            y = layer(x, strategy=am.Strategy(r=1))
            out[case] = f"{err}|{tuple(y.shape)}"
    for field, (mine, theirs) in BUILD_CASES.items():
        try:
            base = {"d_model": D, "d_ff": H, "num_experts": 2, "top_k": 1}
            am.MoELayer(**{**base, **(theirs if rank == 1 else mine)})
            out[field] = "no error"
        except ValueError as err:
            out[field] = str(err)
    # Equal configurations given differently build (defaults spelled out or not).
    agreeing = {"buckets": Buckets()} if rank == 1 else {"ranks_per_node": None}
    built = am.MoELayer(D, H, 2, 1, activation=_GELU_TANH, **agreeing)
    out["agreeing"] = str(tuple(built(x, strategy=am.Strategy(r=1)).shape))
    return out


def _two_expert_groups_worker(rank: int, world: int) -> tuple[tuple[int, ...], str]:
    """Expert groups {0, 2} and {1, 3}; the groups' layers may differ (E), the ranks of
    one group may not: when {1, 3} disagree, {0, 2} stop too (the layer's mesh is built
    collectively over the world, so they would wait for {1, 3} there)."""
    group = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
    layer = am.MoELayer(D, H, 2 if rank % 2 == 0 else 4, 1, process_group=group)
    shape = tuple(layer(torch.randn(5, D), strategy=am.Strategy(r=1)).shape)
    try:
        am.MoELayer(D, H, 2, 2 if rank == 3 else 1, process_group=group)
    except ValueError as err:
        return shape, str(err)
    return shape, "no error"


@pytest.mark.timeout(180)
def test_a_disagreeing_expert_group_stops_every_rank():
    results = run_distributed(_two_expert_groups_worker, 4, timeout=150)
    assert [shape for shape, _ in results] == [(5, D)] * 4
    for rank, (_, message) in enumerate(results):
        if rank % 2:
            assert "router.top_k: 1 on rank(s) [0]; 2 on rank(s) [1]" in message, message
        else:
            assert "another expert group's ranks build different MoE layers" in message


def _gelu_tanh(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(t, approximate="tanh")


_GELU_TANH = functools.partial(torch.nn.functional.gelu, approximate="tanh")


# Layers the two ranks build differently: field named in the error -> (rank 0's
# arguments, rank 1's). Each field of the layer's configuration, a shape among them.
BUILD_CASES = {
    "router.top_k": ({}, {"top_k": 2}),
    "experts.d_ff": ({}, {"d_ff": 2 * H}),
    "experts.activation": ({}, {"activation": "gelu"}),
    "router.gate_position": ({}, {"gate_position": "input"}),
    "router.capacity_factor": ({"capacity_factor": 1.25}, {}),
    "router.router_type": ({}, {"router_type": "cosine", "cosine_dim": 4}),
    "shared": ({}, {"shared_d_ff": 8}),
    "ranks_per_node": ({"ranks_per_node": 1}, {"ranks_per_node": 2}),
    "dtype": ({}, {"dtype": torch.bfloat16}),
    "device type": ({}, {"device": "meta"}),
    "inference.mode": ({}, {"inference": InferenceConfig(mode="off")}),
    # two callables of the same name that compute different things
    "experts.activation ": ({"activation": _GELU_TANH}, {"activation": _gelu_tanh}),
}


@pytest.mark.timeout(180)
def test_ranks_that_disagree_all_fail_with_one_message():
    results = run_distributed(_disagreeing_worker, 2, timeout=150)
    for case, message in CASES.items():
        got = [r[case] for r in results]
        assert got[0] == got[1], (case, got)
        assert message in got[0] and got[0].endswith(f"|{(6, D)}"), (case, got[0])
    for field in BUILD_CASES:
        got = [r[field] for r in results]
        assert got[0] == got[1], (field, got)
        assert "build different MoE layers" in got[0], (field, got[0])
        assert f"  {field.strip()}" in got[0] and "on rank(s) [1]" in got[0], (field, got[0])
        named = [line.split(":")[0].strip() for line in got[0].splitlines()[1:]]
        assert all(n.split(".")[0] == field.strip().split(".")[0] for n in named), named
    assert [r["agreeing"] for r in results] == [str((6, D))] * 2

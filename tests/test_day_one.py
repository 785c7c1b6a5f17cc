"""What a user hits on day one (issue 24): each test names the class of friction and
fails on the behaviour before the fix."""

from __future__ import annotations

import warnings

import pytest
import torch

from adaptive_moe import MoELayer
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.tuning.table import Measurement, StrategyTable


def _how() -> Measurement:
    return Measurement(
        repeats=3,
        warmup=1,
        timer="perf_counter",
        tokens_per_rank=8,
        max_tokens=8,
        skew=1.0,
        date="2026-01-01T00:00:00Z",
    )


def _layer(**kw: object) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(16, 32, 4, top_k=2, **kw)


# ---- 4: no "no strategy table" warning where a table changes nothing ----------------


def test_single_process_without_table_does_not_warn():
    layer = _layer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(6, 16))
    assert layer.last_strategy == layer.default_strategy


# ---- 7: a forced strategy names the invalid field and its valid values ---------------


@pytest.mark.parametrize(
    ("strategy", "field", "valid"),
    [
        (Strategy(1, "linear", 2, "loop"), "degree=2", "valid degree: [1]"),
        (Strategy(3, "linear", 1, "loop"), "r=3", "valid r: [1]"),
        (Strategy(1, "2dh", 1, "loop"), "a2a='2dh'", "valid a2a: ['linear']"),
    ],
)
def test_invalid_forced_strategy_names_field_and_valid_values(strategy, field, valid):
    layer = _layer()
    with pytest.raises(ValueError) as err:
        layer(torch.randn(6, 16), strategy=strategy)
    msg = str(err.value)
    assert field in msg and valid in msg
    assert "kernel=" not in msg  # the valid kernel is not blamed


# ---- 8: table errors name the real keyword; a table of no runnable strategy refused ---


def test_table_mismatch_error_names_the_layer_keyword():
    layer = _layer()
    shape = layer.layer_shape()
    other = type(shape)(**{**shape.__dict__, "top_k": 1})
    table = StrategyTable(layer.fingerprint(), other)
    table.add_bucket(8, {layer.default_strategy: 1.0}, _how())
    with pytest.raises(ValueError, match="allow_table_mismatch=True") as err:
        _layer(table=table)
    assert "use_table(table, allow_mismatch=True)" in str(err.value)
    with pytest.warns(UserWarning, match="using it anyway"):
        _layer(table=table, allow_table_mismatch=True)


def test_table_whose_every_strategy_is_invalid_is_refused():
    layer = _layer()
    table = StrategyTable(layer.fingerprint(), layer.layer_shape())
    table.add_bucket(8, {Strategy(0, "linear", 4, "loop"): 1.0}, _how())
    table.add_bucket(64, {Strategy(1, "2dh", 2, "bmm"): 1.0}, _how())
    with pytest.raises(ValueError, match="none of the strategies it names"):
        _layer(table=table)
    with pytest.raises(ValueError, match="none of the strategies it names"):
        layer.use_table(table)
    # One runnable strategy is enough: the table loads.
    table.add_bucket(512, {layer.default_strategy: 1.0}, _how())
    layer.use_table(table)
    assert layer.table is table


# ---- 9: calc mem says nothing about pipeline stages without a pipeline ---------------


def test_calc_mem_names_the_stage_only_with_a_pipeline(capsys):
    from adaptive_moe.cli import main

    assert main(["calc", "mem", "--preset", "olmoe-1b-7b"]) == 0
    assert "pipeline stage" not in capsys.readouterr().out
    assert main(["calc", "mem", "--preset", "olmoe-1b-7b", "--pp", "2", "--dp", "1"]) == 0
    out = capsys.readouterr().out
    assert "pipeline stage" in out and " of 2" in out


# ---- 24.1: wrap under a launcher before the process group exists ----------------------


def test_wrap_warns_when_launched_on_several_ranks_without_a_process_group(monkeypatch):
    pytest.importorskip("transformers")
    from adaptive_moe import wrap
    from tests.test_wrap import build_model

    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(UserWarning, match="WORLD_SIZE=2") as caught:
        wrap(build_model("mixtral"))
    msg = str(caught[0].message)
    assert "torch.distributed.init_process_group" in msg and "process_group=" in msg
    assert caught[0].filename == __file__  # points at the caller's wrap(...)
    for value in ("1", ""):  # one process, or a variable that is not a count
        monkeypatch.setenv("WORLD_SIZE", value)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            wrap(build_model("mixtral"))
    monkeypatch.delenv("WORLD_SIZE")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrap(build_model("mixtral"))


def _trainer_with_one_rank_experts(rank: int, world: int, out: str) -> str:
    """What wrap before init_process_group leaves on each rank: experts sharded over
    this rank alone (here a one-rank group), then a Trainer on ``world`` ranks."""
    from adaptive_moe import wrap
    from adaptive_moe.integrations.transformers import ShardedExpertsCallback
    from tests.test_wrap import build_model
    from tests.trainer_utils import in_order_trainer

    alone, _ = torch.distributed.new_subgroups(group_size=1)
    model = wrap(build_model("mixtral").train(), process_group=alone)
    trainer = in_order_trainer(
        rank, world, out, model, [ShardedExpertsCallback()], steps=1, global_batch=2
    )
    try:
        trainer.train()
    except ValueError as err:
        return str(err)
    return ""


@pytest.mark.dist
@pytest.mark.timeout(200)
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_trainer_refusing_one_rank_experts_names_the_fix(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from tests.dist_utils import run_distributed

    for msg in run_distributed(_trainer_with_one_rank_experts, 2, (str(tmp_path),), timeout=150):
        assert "shards its experts over 1 ranks, Trainer runs on 2" in msg, msg
        assert "init_process_group" in msg and "before adaptive_moe.wrap(model)" in msg
        assert "process_group=" in msg


# ---- 24.3: save_pretrained of a wrapped model writes the dtype it was loaded in -------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("family", ["mixtral", "olmoe", "deepseek_v3"])
def test_wrapped_save_pretrained_keeps_the_loaded_dtype(family, dtype, tmp_path):
    import json

    import safetensors.torch

    transformers = pytest.importorskip("transformers")
    from adaptive_moe import wrap
    from tests.test_wrap import build_model

    build_model(family).save_pretrained(tmp_path / "src")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=dtype)
    model.save_pretrained(tmp_path / "plain")  # the reference: never wrapped
    wrap(model)
    model.save_pretrained(tmp_path / "wrapped")
    config = json.loads((tmp_path / "wrapped" / "config.json").read_text())
    assert config["dtype"] == str(dtype).removeprefix("torch.")
    want = safetensors.torch.load_file(str(tmp_path / "plain" / "model.safetensors"))
    got = safetensors.torch.load_file(str(tmp_path / "wrapped" / "model.safetensors"))
    assert got.keys() == want.keys()
    # transformers keeps DeepSeek-V3's router and score bias in fp32 whatever the dtype:
    # those as the plain model writes them; Mixtral's and OLMoE's routers in config's.
    if family != "deepseek_v3":
        assert all(v.dtype == dtype for v in want.values())
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in want.items()}
    assert [k for k, v in got.items() if not torch.equal(v, want[k])] == []
    # The wrapped model itself still routes in fp32 (its weights are unchanged by saving).
    routers = [m.moe.router.weight for m in model.modules() if hasattr(m, "moe")]
    assert routers and all(w.dtype == torch.float32 for w in routers)

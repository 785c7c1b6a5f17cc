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


# ---- 24.2: the router aux loss under Trainer on W ranks equals one process ------------


def _trainer_with_aux_loss(
    rank: int, world: int, out: str, family: str, average_tokens: bool
) -> dict:
    """``family`` with its load-balancing loss in the training loss (router_aux_loss_coef),
    trained 3 steps on a global batch of 4 rows: wrapped with the callback on W ranks,
    the plain model on one process. SGD: the weights then differ by lr times the
    gradients' difference (Adam would blow the rounding of a near-zero gradient entry
    up to a full-size step)."""
    from adaptive_moe import wrap
    from adaptive_moe.integrations.transformers import ShardedExpertsCallback, export_state_dict
    from tests.test_wrap import build_model
    from tests.trainer_utils import in_order_trainer

    model = build_model(family, output_router_logits=True).train()
    callbacks = []
    if world > 1:
        wrap(model)
        callbacks = [ShardedExpertsCallback()]
    trainer = in_order_trainer(
        rank, world, out, model, callbacks, steps=3, global_batch=4,
        average_tokens_across_devices=average_tokens, optim="sgd",
    )  # fmt: skip
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    full = export_state_dict(model) if world > 1 else model.state_dict()
    return {"losses": losses, "full": {k: v.clone() for k, v in full.items()}}


@pytest.mark.dist
@pytest.mark.timeout(400)
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore:MoELayer has no strategy table")
@pytest.mark.parametrize(
    ("family", "average_tokens"), [("mixtral", True), ("mixtral", False), ("qwen2_moe", True)]
)
def test_trainer_router_aux_loss_on_two_ranks_matches_one_process(family, average_tokens, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from tests.dist_utils import run_distributed

    args = (family, average_tokens)
    ranks = run_distributed(_trainer_with_aux_loss, 2, (str(tmp_path / "dist"), *args), timeout=200)
    (ref,) = run_distributed(_trainer_with_aux_loss, 1, (str(tmp_path / "ref"), *args))
    assert len(ref["losses"]) == 3
    for r in ranks:
        torch.testing.assert_close(
            torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-6, atol=0
        )
        assert r["full"].keys() == ref["full"].keys()
        for key, want in ref["full"].items():
            torch.testing.assert_close(
                r["full"][key], want, rtol=1e-6, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}"
            )


def _balance_shares(rank: int, world: int, masked: bool) -> dict:
    """This rank's (local loss, share, d share / d logits) for its rows of fixed random
    router logits of 2 layers (the global batch: 2 rows per rank, 5 tokens per row)."""
    from adaptive_moe.integrations.transformers import _balance_share

    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, world * 10, 4, generator=gen)  # [L, W*T, E]
    mask = (torch.rand(world * 2, 5, generator=gen) > 0.3).long()  # [W*rows, seq]
    mine = logits[:, rank * 10 : (rank + 1) * 10].clone().requires_grad_(True)  # [L, T, E]
    local, share = _balance_share(
        tuple(mine), 4, 2, mask[rank * 2 : (rank + 1) * 2] if masked else None
    )
    share.backward()
    return {"local": local.detach(), "share": share.detach(), "grad": mine.grad}


@pytest.mark.dist
@pytest.mark.timeout(120)
@pytest.mark.parametrize("masked", [False, True])
def test_balance_shares_sum_to_transformers_loss_of_the_global_batch(masked):
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from tests.dist_utils import run_distributed

    world = 2
    ranks = run_distributed(_balance_shares, world, (masked,), timeout=90)
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, world * 10, 4, generator=gen).requires_grad_(True)
    mask = (torch.rand(world * 2, 5, generator=gen) > 0.3).long()
    whole = load_balancing_loss_func(tuple(logits), 4, 2, mask if masked else None)
    whole.backward()
    for rank, r in enumerate(ranks):  # each rank's own loss is transformers' of its rows
        rows = logits.detach()[:, rank * 10 : (rank + 1) * 10]
        own = mask[rank * 2 : (rank + 1) * 2] if masked else None
        want = load_balancing_loss_func(tuple(rows), 4, 2, own)
        torch.testing.assert_close(r["local"], want, rtol=1e-6, atol=0)
    total = sum(r["share"] for r in ranks)
    torch.testing.assert_close(total, whole.detach(), rtol=1e-6, atol=0)
    grad = torch.cat([r["grad"] for r in ranks], dim=1)  # [L, W*T, E]
    torch.testing.assert_close(grad, logits.grad, rtol=1e-5, atol=1e-8)

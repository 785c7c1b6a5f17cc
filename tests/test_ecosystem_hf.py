"""transformers end to end with wrapped models: ``save_pretrained`` of a still-wrapped
model, and ``Trainer`` on 2 gloo ranks (the DDP that accelerate builds).

References: the plain transformers model (never wrapped) with the same weights --
trained by ``Trainer`` in one process on the global batch for the Trainer test -- and
``from_pretrained``'s own loading report (no missing or unexpected key).
"""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from adaptive_moe import wrap  # noqa: E402
from tests.test_wrap import VOCAB, assert_close, batch, build_model  # noqa: E402
from tests.trainer_utils import in_order_trainer, torchrun_env  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:MoELayer has no strategy table")


def _load(path) -> tuple[torch.nn.Module, dict]:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", output_loading_info=True
    )
    return model.eval(), info


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_save_pretrained_of_a_wrapped_model_loads_into_plain_transformers(family, tmp_path):
    ref = build_model(family)
    ids, _ = batch(2)
    with torch.no_grad():
        want = ref(ids).logits
    model = wrap(build_model(family))
    model.save_pretrained(tmp_path)
    loaded, info = _load(tmp_path)
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        assert_close(loaded(ids).logits, want, "logits after save_pretrained of wrapped")
    ref_state = ref.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, ref_state[key]), key


GLOBAL_BATCH, STEPS = 4, 3


def _train(rank: int, world: int, out: str, family: str, wrapped: bool) -> list[float]:
    """transformers' Trainer on this rank (the environment torchrun would set), samples
    in order so that W ranks see together what one process sees in one batch."""
    from adaptive_moe.integrations.transformers import ShardedExpertsCallback

    model = build_model(family).train()
    callbacks = []
    if wrapped:
        wrap(model)
        callbacks.append(ShardedExpertsCallback())
    trainer = in_order_trainer(rank, world, out, model, callbacks, steps=STEPS,
                               global_batch=GLOBAL_BATCH, weight_decay=0.0,
                               max_grad_norm=0.0,  # clipping: test_ecosystem_trainer.py
                               save_strategy="no")  # fmt: skip
    trainer.train()
    trainer.save_model(os.path.join(out, "final"))
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["mixtral"])
def test_trainer_on_two_ranks_matches_one_process_and_saves_transformers_format(family, tmp_path):
    from tests.dist_utils import run_distributed

    pytest.importorskip("accelerate")
    dist_out, ref_out = str(tmp_path / "dist"), str(tmp_path / "ref")
    got = run_distributed(_train, 2, (dist_out, family, True), timeout=240)
    (want,) = run_distributed(_train, 1, (ref_out, family, False), timeout=120)
    assert len(want) == STEPS and got[0] == got[1]
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(want), rtol=1e-5, atol=0)
    trained, info = _load(os.path.join(dist_out, "final"))
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    reference, _ = _load(os.path.join(ref_out, "final"))
    ref_state = reference.state_dict()
    for key, value in trained.state_dict().items():
        assert_close(value, ref_state[key], key, tol=1e-4)
    ids, _ = batch(2)
    with torch.no_grad():
        assert_close(trained(ids).logits, reference(ids).logits, "logits", tol=1e-4)


def _lr0(rank: int, world: int, out: str) -> bool:
    """A Trainer step with learning rate 0 on a wrapped model must leave this rank's
    expert shards exactly as they were (DDP's start-up broadcast must skip them)."""
    torchrun_env(rank, world, MASTER_PORT="29500")
    model = wrap(build_model("mixtral").train())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n}
    ids = torch.randint(0, VOCAB, (8, 8), generator=torch.Generator().manual_seed(3))
    args = transformers.TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=2,
        max_steps=1,
        learning_rate=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        ddp_backend="gloo",
        disable_tqdm=True,
    )
    data = [{"input_ids": row, "labels": row} for row in ids]
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    after = dict(model.named_parameters())
    return all(torch.equal(after[n], v) for n, v in before.items())


@pytest.mark.dist
@pytest.mark.timeout(200)
def test_trainer_with_zero_learning_rate_keeps_every_ranks_expert_shards(tmp_path):
    from tests.dist_utils import run_distributed

    pytest.importorskip("accelerate")
    assert run_distributed(_lr0, 2, (str(tmp_path),), timeout=150) == [True, True]

"""What the callbacks Trainer runs before user callbacks (the ``report_to`` integrations:
TensorBoard, W&B, ...) are given once ``ShardedExpertsCallback.attach(trainer)`` placed
the callback before them, on 2 gloo ranks.

``_Reporter`` stands in for an integration: it sits before the sharded-experts callback
and records what ``on_train_begin`` and ``on_log`` hand it. Reference: the plain
transformers model (never wrapped) trained by Trainer in one process on the global
batch, with the same default ``max_grad_norm`` (Trainer's own clip by the whole norm).
"""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from adaptive_moe import wrap  # noqa: E402
from tests.test_wrap import build_model  # noqa: E402
from tests.trainer_utils import in_order_trainer  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:MoELayer has no strategy table"),
    pytest.mark.filterwarnings("ignore::UserWarning:torch.distributed"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

GLOBAL_BATCH, STEPS = 4, 2
MAX_GRAD_NORM = 1.0  # TrainingArguments' default; the toy model's norms are above it


class _Reporter(transformers.TrainerCallback):
    """Records what an integration would report: the logged grad_norm and the
    ``max_grad_norm`` in the arguments it sees (W&B and TensorBoard record the arguments
    on train begin)."""

    def __init__(self) -> None:
        self.grad_norms: list[float] = []
        self.max_grad_norm_seen: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.max_grad_norm_seen.append(args.max_grad_norm)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "grad_norm" in logs:
            self.grad_norms.append(float(logs["grad_norm"]))
            self.max_grad_norm_seen.append(args.max_grad_norm)


class _ClipsAgain(transformers.TrainerCallback):
    """Turns Trainer's own (per-rank) clipping back on after ShardedExpertsCallback."""

    def on_step_begin(self, args, state, control, **kwargs):
        args.max_grad_norm = MAX_GRAD_NORM


def _run(rank: int, world: int, out: str, wrapped: bool) -> dict:
    """``wrapped``: the reporter before a ShardedExpertsCallback, without and with
    ``attach``; else the plain model with the reporter alone."""
    from adaptive_moe.integrations.transformers import ShardedExpertsCallback

    result = {}
    for attached in [False, True] if wrapped else [False]:
        model = build_model("mixtral").train()
        reporter = _Reporter()
        callbacks = [reporter]
        if wrapped:
            wrap(model)
            callbacks.append(ShardedExpertsCallback())
        trainer = in_order_trainer(rank, world, os.path.join(out, str(attached)), model,
                                   callbacks, steps=STEPS, global_batch=GLOBAL_BATCH,
                                   save_strategy="no")  # fmt: skip
        assert trainer.args.max_grad_norm == MAX_GRAD_NORM
        if attached:
            ShardedExpertsCallback.attach(trainer)
            ShardedExpertsCallback.attach(trainer)  # again: no second callback
        trainer.train()
        result[attached] = {
            "order": [type(cb).__name__ for cb in trainer.callback_handler.callbacks],
            "reported": reporter.grad_norms,
            "max_grad_norm_seen": reporter.max_grad_norm_seen,
            "logged": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        }
    if wrapped:  # Trainer clipping by per-rank norms is refused, not run
        model = wrap(build_model("mixtral").train())
        callbacks = [ShardedExpertsCallback(), _ClipsAgain()]
        trainer = in_order_trainer(
            rank, world, os.path.join(out, "again"), model, callbacks,
            steps=1, global_batch=GLOBAL_BATCH, save_strategy="no",
        )  # fmt: skip
        try:
            trainer.train()
            result["refused"] = ""
        except RuntimeError as err:
            result["refused"] = str(err)
    return result


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_attached_callback_gives_integrations_the_global_grad_norm(tmp_path):
    from tests.dist_utils import run_distributed

    pytest.importorskip("accelerate")
    dist_runs = run_distributed(_run, 2, (str(tmp_path / "dist"), True), timeout=100)
    (ref,) = run_distributed(_run, 1, (str(tmp_path / "ref"), False), timeout=60)
    want = torch.tensor(ref[False]["reported"])
    assert len(want) == STEPS and min(want) > MAX_GRAD_NORM, want  # clipping at every step
    for rank, r in enumerate(dist_runs):
        before, after = r[False], r[True]
        assert after["order"] == [
            "DefaultFlowCallback",
            "ShardedExpertsCallback",
            "_Reporter",
            "PrinterCallback",
        ], after["order"]
        for run in (before, after):
            # Training and Trainer's own history are the global run either way.
            torch.testing.assert_close(
                torch.tensor(run["losses"]), torch.tensor(ref[False]["losses"]), rtol=1e-5, atol=0
            )
            torch.testing.assert_close(torch.tensor(run["logged"]), want, rtol=1e-4, atol=0)
            # The user's max_grad_norm in every argument a callback sees.
            assert run["max_grad_norm_seen"] == [MAX_GRAD_NORM] * (STEPS + 1), rank
        # Before attach the reporter gets this rank's own norm (the global norm is larger:
        # it adds the other rank's expert shard), after it the global one.
        assert (torch.tensor(before["reported"]) < want * (1 - 1e-3)).all(), (rank, before)
        torch.testing.assert_close(torch.tensor(after["reported"]), want, rtol=1e-4, atol=0)
        assert "each rank's own norm" in r["refused"], r["refused"]

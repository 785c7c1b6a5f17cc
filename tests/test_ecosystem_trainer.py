"""transformers ``Trainer`` with its default gradient clipping and ``resume_from_checkpoint``
on a wrapped model, 2 and 4 gloo ranks (E >= W and E < W), with ``ShardedExpertsCallback``,
and the ``save_model`` after training loaded back by plain ``from_pretrained``.

References, all independent of the library's sharding:
- clipping: the plain transformers model (never wrapped) trained by ``Trainer`` in one
  process on the global batch, with the same ``max_grad_norm`` (Trainer's own clip by
  the norm of the whole gradient);
- save_model: the reference's own ``save_model``, loaded the same way (same names, no
  missing or unexpected key, same weights and logits);
- resume: the same W-rank run without interruption; the resumed run must continue it
  exactly on every rank (its expert shards and their optimizer moments included).

transformers < 5.18 cannot resume any multi-process CPU run (``cpu_resume_problem``):
there the fixture trains without the resume part and the resume test is skipped.
"""

from __future__ import annotations

import os
import types
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from packaging.version import Version  # noqa: E402

from adaptive_moe import wrap  # noqa: E402
from tests.test_wrap import assert_close, build_model  # noqa: E402
from tests.trainer_utils import in_order_trainer  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:MoELayer has no strategy table"),
    pytest.mark.filterwarnings("ignore::UserWarning:torch.distributed"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

GLOBAL_BATCH, STEPS, SAVE_AT = 4, 4, 2
MAX_GRAD_NORM = 1.0  # TrainingArguments' default; the toy model's norms are above it
# transformers <= 5.17's Trainer loads optimizer.pt with map_location=args.device, which
# is "cpu:0" on gloo CPU ranks; torch.load restores CPU storages for "cpu" only.
RESUME_WORKS = Version(transformers.__version__) >= Version("5.18.0")
NO_RESUME = (
    f"transformers {transformers.__version__} < 5.18: Trainer's torch.load of optimizer.pt "
    f"on CPU ranks uses map_location='cpu:0', which torch cannot restore"
)


class _WeightsOnly(transformers.TrainerCallback):
    """What an older adaptive_moe's callback did: stage the full weights for rank 0's
    save, nothing about the optimizer (Trainer cannot save a sharded model otherwise)."""

    def on_step_end(self, args, state, control, **kwargs):
        from adaptive_moe.integrations.transformers import stage_for_save

        if control.should_save:
            stage_for_save(kwargs["model"])


def _trainer(rank: int, world: int, out: str, model, callback, steps: int = STEPS):
    """``callback``: True (ShardedExpertsCallback), False (none) or a callback."""
    from adaptive_moe.integrations.transformers import ShardedExpertsCallback

    if isinstance(callback, bool):
        callbacks = [ShardedExpertsCallback()] if callback else []
    else:
        callbacks = [callback]
    # Default arguments where they matter here: max_grad_norm (1.0), AdamW, weight decay 0.
    trainer = in_order_trainer(rank, world, out, model, callbacks, steps=steps,
                               global_batch=GLOBAL_BATCH, save_strategy="steps",
                               save_steps=SAVE_AT)  # fmt: skip
    assert trainer.args.max_grad_norm == MAX_GRAD_NORM
    return trainer


def _history(trainer, after: int = 0) -> tuple[list[float], list[float]]:
    # A resumed Trainer's history starts with the checkpoint's entries.
    logs = [h for h in trainer.state.log_history if "loss" in h and h["step"] > after]
    return [h["loss"] for h in logs], [h["grad_norm"] for h in logs]


def _run(rank: int, world: int, out: str, wrapped: bool, overrides: dict, resume: bool) -> dict:
    """An uninterrupted run (checkpoints at step 2 and 4); wrapped, with ``resume``, also
    a fresh model (other weights) and Trainer resumed from the step-2 checkpoint."""
    from adaptive_moe.integrations.transformers import export_state_dict

    model = build_model("mixtral", **overrides).train()
    if wrapped:
        wrap(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer(rank, world, out, model, callback=wrapped)
    trainer.train()
    # What a user saves at the end (ShardedExpertsCallback staged the full experts on
    # rank 0 at train end): before anything else reads the model's state.
    trainer.save_model(os.path.join(out, "final"))
    losses, norms = _history(trainer)
    result = {
        "final": os.path.join(out, "final"),
        "losses": losses,
        "grad_norms": norms,
        "max_grad_norm_after": trainer.args.max_grad_norm,
        "full": export_state_dict(model) if wrapped else model.state_dict(),
        "resume_warnings": [
            str(w.message) for w in caught if "resume_from_checkpoint" in str(w.message)
        ],
    }
    if not wrapped or not resume:
        return result
    result["local"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    fresh = wrap(build_model("mixtral", seed=5, **overrides).train())
    resumed = _trainer(rank, world, out, fresh, callback=True)
    resumed.train(resume_from_checkpoint=os.path.join(out, f"checkpoint-{SAVE_AT}"))
    result["resumed_losses"], result["resumed_grad_norms"] = _history(resumed, after=SAVE_AT)
    result["resumed_local"] = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    # A checkpoint written without ShardedExpertsCallback: rank 0's expert moments alone.
    legacy = os.path.join(out, "without_callback")
    old = wrap(build_model("mixtral", **overrides).train())
    _trainer(rank, world, legacy, old, _WeightsOnly(), SAVE_AT).train()
    again = _trainer(rank, world, legacy, wrap(build_model("mixtral", **overrides).train()), True)
    try:
        again.train(resume_from_checkpoint=os.path.join(legacy, f"checkpoint-{SAVE_AT}"))
        result["refused"] = ""
    except ValueError as err:
        result["refused"] = str(err)
    return result


# (world, Mixtral overrides): E = 4 on 2 ranks (whole experts), E = 1 on 2 ranks (each
# rank half of every hidden row), E = 2 on 4 ranks (two ranks share each expert).
CASES = {
    "W2-E4": (2, {}),
    "W2-E1": (2, {"num_local_experts": 1, "num_experts_per_tok": 1}),
    # k = 2: at k = 1 transformers' gate is p / p, whose rounding noise Adam would turn
    # into full-size router updates of random sign in the reference.
    "W4-E2": (4, {"num_local_experts": 2, "num_experts_per_tok": 2}),
}


@pytest.fixture(scope="module", params=list(CASES))
def runs(request, tmp_path_factory):
    from tests.dist_utils import run_distributed

    pytest.importorskip("accelerate")
    world, overrides = CASES[request.param]
    root = tmp_path_factory.mktemp("trainer")
    dist_args = (str(root / "dist"), True, overrides, RESUME_WORKS)
    dist_runs = run_distributed(_run, world, dist_args, timeout=300)
    (ref,) = run_distributed(_run, 1, (str(root / "ref"), False, overrides, False), timeout=120)
    return dist_runs, ref


@pytest.mark.dist
@pytest.mark.timeout(400)
def test_trainer_default_clipping_on_w_ranks_matches_one_process(runs):
    dist_runs, ref = runs
    # The reference clipped at every step: the test exercises clipping.
    assert len(ref["grad_norms"]) == STEPS
    assert min(ref["grad_norms"]) > MAX_GRAD_NORM, ref["grad_norms"]
    for r in dist_runs:
        torch.testing.assert_close(
            torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0
        )
        # The logged norm is the global one, not rank 0's shard's.
        torch.testing.assert_close(
            torch.tensor(r["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-4, atol=0
        )
        assert r["max_grad_norm_after"] == MAX_GRAD_NORM  # the user's arguments restored
        for key, want in ref["full"].items():
            assert_close(r["full"][key], want, key, tol=1e-4)


def _load(path: str) -> tuple[torch.nn.Module, dict]:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", output_loading_info=True
    )
    return model.eval(), info


@pytest.mark.dist
@pytest.mark.timeout(400)
def test_trainer_save_model_on_w_ranks_loads_into_plain_transformers(runs):
    dist_runs, ref = runs
    # Rank 0 wrote it (Trainer saves on the main process only); the reference is the
    # plain model's save_model after the same training in one process.
    trained, info = _load(dist_runs[0]["final"])
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    reference, _ = _load(ref["final"])
    got, want = trained.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key, value in got.items():
        assert_close(value, want[key], key, tol=1e-4)
    ids = torch.randint(
        0, trained.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        assert_close(trained(ids).logits, reference(ids).logits, "logits", tol=1e-4)


@pytest.mark.dist
@pytest.mark.timeout(400)
def test_callback_warns_once_when_transformers_cannot_resume_on_cpu_ranks(runs):
    dist_runs, ref = runs
    # Rank 0 alone warns, on the Trainer's construction, where and only where the
    # installed transformers fails to resume; one process never does.
    want = [] if RESUME_WORKS else ["upgrade to transformers >= 5.18.0"]
    for rank, r in enumerate(dist_runs):
        got = [m[m.index("upgrade") :] for m in r["resume_warnings"] if "upgrade" in m]
        assert got == (want if rank == 0 else []), (rank, r["resume_warnings"])
    assert ref["resume_warnings"] == []


def test_cpu_resume_problem_names_exactly_the_failing_configurations():
    from adaptive_moe.integrations.transformers import cpu_resume_problem

    def args(world=2, device="cpu:0", **extra):
        fields = {"deepspeed": None, "fsdp": None, "process_index": 0, **extra}
        return types.SimpleNamespace(world_size=world, device=torch.device(device), **fields)

    problem = cpu_resume_problem(args(), "5.17.0")
    assert problem is not None and "transformers >= 5.18.0" in problem and "cpu:0" in problem
    assert cpu_resume_problem(args(4, "cpu:0"), "5.0.0rc1") is not None
    assert cpu_resume_problem(args(), "5.18.0.dev0") is not None  # before the release
    for fixed in ["5.18.0", "5.18.1", "5.24.0", "6.0.0"]:
        assert cpu_resume_problem(args(), fixed) is None, fixed
    # Trainer maps to "cpu" on one process; CUDA devices restore as they are.
    assert cpu_resume_problem(args(world=1), "5.17.0") is None
    assert cpu_resume_problem(args(device="cpu"), "5.17.0") is None
    assert cpu_resume_problem(args(device="cuda:1"), "5.17.0") is None
    # DeepSpeed and FSDP load the optimizer state without that torch.load.
    assert cpu_resume_problem(args(deepspeed="ds.json"), "5.17.0") is None
    assert cpu_resume_problem(args(fsdp=True), "5.17.0") is None
    # The installed version by default.
    assert (cpu_resume_problem(args()) is None) == RESUME_WORKS


@pytest.mark.dist
@pytest.mark.timeout(400)
@pytest.mark.skipif(not RESUME_WORKS, reason=NO_RESUME)
def test_trainer_resume_from_checkpoint_continues_every_ranks_shards(runs):
    dist_runs, _ = runs
    for rank, r in enumerate(dist_runs):
        assert "without ShardedExpertsCallback" in r["refused"], r["refused"]
        assert len(r["resumed_losses"]) == STEPS - SAVE_AT
        torch.testing.assert_close(
            torch.tensor(r["resumed_losses"]),
            torch.tensor(r["losses"][SAVE_AT:]),
            rtol=1e-6,
            atol=0,
        )
        torch.testing.assert_close(
            torch.tensor(r["resumed_grad_norms"]),
            torch.tensor(r["grad_norms"][SAVE_AT:]),
            rtol=1e-6,
            atol=0,
        )
        for name, want in r["local"].items():
            torch.testing.assert_close(
                r["resumed_local"][name],
                want,
                rtol=1e-6,
                atol=1e-7,
                msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}",
            )


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3"])
def test_wrapped_model_loads_the_checkpoint_format_save_pretrained_writes(family, tmp_path):
    """What Trainer's resume does: ``load_state_dict(strict=False)`` of the safetensors
    file, whose MoE keys transformers 5 wrote in the checkpoint format (per-expert
    ``w1``/``w2``/``w3`` or ``gate_proj``/``up_proj``, renamed blocks)."""
    import safetensors.torch

    from adaptive_moe.integrations.transformers import export_state_dict

    saved = build_model(family)
    saved.save_pretrained(tmp_path)
    on_disk = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    model = wrap(build_model(family, seed=5))
    assert set(on_disk) != set(export_state_dict(model))  # really another format
    result = model.load_state_dict(on_disk, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result
    got, want = export_state_dict(model), saved.state_dict()
    assert got.keys() == want.keys()
    assert [k for k, v in want.items() if not torch.equal(got[k], v)] == []

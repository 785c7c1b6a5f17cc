"""adaptive_moe.training.checkpoint: resharding W -> W' (E >= W and E < W, both ways), atomic
saves (a crash between write and rename), and the allow-list reading of DCP's index.

The reference for "the loaded weights" is assembled here, independently of the
checkpoint code: every rank's expert shard is all-gathered and placed into the full
[E, ...] tensors by ShardLayout. The reference for "the next step" is the run that
wrote the checkpoint, continuing in memory on its own world size (same global batch).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.training.checkpoint import _SafeReader, latest_checkpoint
from adaptive_moe.training.config import TrainConfig
from adaptive_moe.training.model import ModelConfig
from tests.dist_utils import run_distributed

GLOBAL_BATCH = 8
LOSS_RTOL = 1e-5  # fp32; W and W' sum gradients and losses in different orders


def _config(out: Path, world: int, num_experts: int, resume: bool = False) -> TrainConfig:
    model = ModelConfig(
        d_model=32,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        d_ff=64,
        num_experts=num_experts,
        top_k=2 if num_experts > 1 else 1,
        moe_d_ff=32,
        max_seq_len=16,
    )
    return TrainConfig(
        model=model,
        out=str(out),
        data_max_bytes=100_000,
        steps=100,
        batch_size=GLOBAL_BATCH // world,
        use_table=False,
        resume=resume,
        ckpt_every=0,
        progress=False,
        lr=1e-2,
        warmup=0,
    )


def _full_weights(trainer) -> dict[str, torch.Tensor]:
    """Every parameter at its full logical shape (expert shards gathered by layout)."""
    world = dist.get_world_size()
    out = {}
    for name, param in trainer.model.named_parameters():
        if not getattr(param, "_moe_expert", False):
            out[name] = param.detach().clone()
    e, h = trainer.cfg.model.num_experts, trainer.cfg.model.moe_d_ff
    for i, layer in enumerate(trainer.model.moe_layers()):
        w1, w2 = layer.experts.gate_up_proj.detach(), layer.experts.down_proj.detach()
        g1 = [torch.empty_like(w1) for _ in range(world)]
        g2 = [torch.empty_like(w2) for _ in range(world)]
        dist.all_gather(g1, w1.contiguous())
        dist.all_gather(g2, w2.contiguous())
        gate = torch.full((e, h, w1.shape[2]), float("nan"))
        up, down = gate.clone(), torch.full((e, w2.shape[1], h), float("nan"))
        for r in range(world):
            lay = ShardLayout(world, r, e, h)
            ex, hid, h_l = lay.local_experts, lay.local_hidden, lay.hidden_per_rank
            gate[ex.start : ex.stop, hid] = g1[r][:, :h_l]
            up[ex.start : ex.stop, hid] = g1[r][:, h_l:]
            down[ex.start : ex.stop, :, hid] = g2[r]
        out[f"moe{i}.gate"], out[f"moe{i}.up"], out[f"moe{i}.down"] = gate, up, down
    return out


def _steps(trainer, n: int) -> list[float]:
    return [trainer.train_step()["loss"] for _ in range(n)]


def _fresh_run(rank: int, world: int, out: Path, num_experts: int) -> dict:
    """Train 2 steps, save, then continue 2 steps in memory (the reference)."""
    from adaptive_moe.training.trainer import Trainer

    t = Trainer(rank, world, _config(out, world, num_experts))
    t.setup()
    _steps(t, 2)
    t._save()
    return {"saved": _full_weights(t), "next": _steps(t, 2)}


def _resumed_run(rank: int, world: int, out: Path, num_experts: int) -> dict:
    """Poison every parameter, load the latest checkpoint on this world size, take 2
    steps; then save (for the way back) and continue 2 steps as that save's reference."""
    from adaptive_moe.training.trainer import Trainer

    t = Trainer(rank, world, _config(out, world, num_experts, resume=True))
    with torch.no_grad():
        for p in t.model.parameters():
            p.fill_(float("nan"))
    t.setup()
    res = {"step": t.state.step, "loaded": _full_weights(t), "loaded_next": _steps(t, 2)}
    t._save()
    return {**res, "saved": _full_weights(t), "next": _steps(t, 2)}


def _phase(rank: int, world: int, root: str, resume: bool) -> bytes:
    out = {
        e: (_resumed_run if resume else _fresh_run)(rank, world, Path(root, f"e{e}"), e)
        for e in (2, 4)
    }
    # By value: dist_utils' queue would share tensors through descriptors of a process
    # that may have exited before the parent reads them.
    return pickle.dumps(out if rank == 0 else {})


def _assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert not torch.isnan(want[name]).any(), name
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_reshard_2_to_4_and_4_to_2_with_e_ge_w_and_e_lt_w(tmp_path):
    # E=4: 2 -> 4 and 4 -> 2 keep E >= W. E=2: 2 -> 4 goes to E < W (each expert's
    # hidden dim split over 2 ranks), 4 -> 2 comes back from it.
    def phase(world: int, resume: bool) -> dict:
        res = run_distributed(_phase, world, (str(tmp_path), resume), timeout=200)
        return pickle.loads(res[0])

    two, four, back = phase(2, False), phase(4, True), phase(2, True)
    for e in (2, 4):
        for src, dst, step in ((two, four, 2), (four, back, 4)):
            assert dst[e]["step"] == step
            _assert_same_weights(dst[e]["loaded"], src[e]["saved"])
            # The first step checks the weights, the second the AdamW moments.
            torch.testing.assert_close(
                torch.tensor(dst[e]["loaded_next"]),
                torch.tensor(src[e]["next"]),
                rtol=LOSS_RTOL,
                atol=0,
            )


def _crash_between_write_and_rename(rank: int, world: int, out: str) -> dict:
    from adaptive_moe.training.trainer import Trainer

    t = Trainer(rank, world, _config(Path(out), world, 4))
    t.setup()
    _steps(t, 1)
    t._save()
    before = _full_weights(t)
    _steps(t, 1)
    real_replace = os.replace

    def crash(src, dst):
        if str(src).endswith(".partial"):
            raise OSError("simulated crash: the machine died before the rename")
        return real_replace(src, dst)

    with mock.patch("os.replace", crash), pytest.raises((OSError, RuntimeError)) as info:
        t._save()
    root = Path(out) / "checkpoints"
    partial_left = (root / ".step_00000002.partial").is_dir()
    latest_after_crash = (root / "latest").read_text()
    step2_exists = (root / "step_00000002").exists()
    resumed = Trainer(rank, world, _config(Path(out), world, 4, resume=True))
    resumed.setup()
    after, step = _full_weights(resumed), resumed.state.step
    _steps(resumed, 1)
    resumed._save()  # the next save clears the interrupted one away
    return pickle.dumps(
        {
            "error": str(info.value),
            "before": before,
            "after": after,
            "step": step,
            "partial_left": partial_left,
            "latest_after_crash": latest_after_crash,
            "step2_exists": step2_exists,
        }
    )


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_crash_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    res = run_distributed(_crash_between_write_and_rename, 2, (str(tmp_path),), timeout=100)
    res = [pickle.loads(r) for r in res]
    assert "simulated crash" in res[0]["error"]
    assert "failed on rank 0" in res[1]["error"]
    root = tmp_path / "checkpoints"
    assert res[0]["latest_after_crash"] == "step_00000001"
    assert not res[0]["step2_exists"]
    assert res[0]["partial_left"]  # the interrupted write was left behind, unused
    assert res[0]["step"] == 1  # latest still named step 1, which loaded completely
    _assert_same_weights(res[0]["after"], res[0]["before"])
    assert (root / "latest").read_text() == "step_00000002"
    assert latest_checkpoint(root) == root / "step_00000002"
    assert not (root / ".step_00000002.partial").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_index_is_read_with_an_allow_list(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(ValueError, match=r"refers to posix\.system|refers to os\.system"):
        _SafeReader(tmp_path).read_metadata()


def test_latest_pointer_is_validated(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "latest").write_text("../../etc")
    with pytest.raises(ValueError, match="must name a step_NNNNNNNN directory"):
        latest_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("step_00000007")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        latest_checkpoint(tmp_path)

"""transformers ``Trainer`` on a wrapped MoE model, on several ranks.

    python examples/ecosystem_trainer.py                          # 2 spawned gloo CPU ranks
    torchrun --nproc-per-node 2 examples/ecosystem_trainer.py     # the same under torchrun

``adaptive_moe.wrap(model)`` puts the experts in the ignore list of the
``DistributedDataParallel`` that Trainer (through accelerate) builds, and the layers
divide their expert gradients like DDP divides the dense ones. ``ShardedExpertsCallback``
gathers the full experts onto rank 0 before each save, so ``trainer.save_model`` writes
the original transformers names and layout; the script reloads it with plain
``from_pretrained`` and checks for missing keys and for the trained model's logits. The
callback also clips by the global gradient norm (Trainer's default
``max_grad_norm=1.0``; Trainer's own clip would use a per-rank norm) and puts every
rank's expert optimizer state in the checkpoints: the script resumes a fresh Trainer
from the step-4 checkpoint and checks that it continues the run exactly. All ranks
share one output directory: ``--output-dir``, or a temporary one that rank 0 creates
(on several nodes, pass a directory on a shared file system). Needs ``transformers``
and ``accelerate``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
import transformers

import adaptive_moe as am
from adaptive_moe.core.launch import external_world_size, launch
from adaptive_moe.integrations.transformers import ShardedExpertsCallback

VOCAB = 96


def build_trainer(out: str, seed: int) -> transformers.Trainer:
    config = transformers.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    torch.manual_seed(seed)  # the same weights on every rank
    model = am.wrap(transformers.AutoModelForCausalLM.from_config(config))
    ids = torch.randint(0, VOCAB, (64, 16), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=4,
        max_steps=8,
        learning_rate=3e-3,
        logging_steps=2,
        save_strategy="steps",
        save_steps=4,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if not torch.cuda.is_available() else None,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    # Adds the callback before every other one, report_to integrations included (Trainer
    # places those before callbacks=[...]), so all of them log the global grad_norm.
    ShardedExpertsCallback.attach(trainer)
    return trainer


def _losses(trainer: transformers.Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > 4]


def run(rank: int, world: int, out: str | None) -> dict[str, object]:
    """Train, save, resume, reload: all ranks in one output directory (``out``, or a
    temporary one that rank 0 creates, names to the others and removes at the end)."""
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    # What torchrun sets; accelerate reads it (spawned workers only have the process group).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    created = out is None
    # Every rank must read the checkpoints the others wrote: one directory, rank 0's (its
    # name is what travels). On several nodes pass --output-dir on a shared file system.
    box = [tempfile.mkdtemp(prefix="ecosystem_trainer_") if created and rank == 0 else out]
    dist.broadcast_object_list(box, src=0)
    out = box[0]
    try:
        trainer = build_trainer(out, seed=0)
        trainer.train()
        trainer.save_model(os.path.join(out, "final"))
        ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():  # collective: every rank runs the wrapped model
            logits = trainer.model.eval()(input_ids=ids).logits
        resumed = build_trainer(out, seed=1)  # other weights: the checkpoint restores them
        resumed.train(resume_from_checkpoint=os.path.join(out, "checkpoint-4"))
        result: dict[str, object] = {"losses": _losses(trainer), "resumed": _losses(resumed)}
        if rank == 0:
            plain, info = transformers.AutoModelForCausalLM.from_pretrained(
                os.path.join(out, "final"), output_loading_info=True
            )
            with torch.no_grad():
                result["logits_diff"] = (plain.eval()(input_ids=ids).logits - logits).abs().max()
            result["bad_keys"] = {k: v for k, v in info.items() if v}
        return result
    finally:
        dist.barrier()  # nobody reads the directory any more
        if created and rank == 0:
            shutil.rmtree(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", help="Trainer's output_dir (default: a temporary one)")
    args = parser.parse_args()
    result = launch(run, external_world_size() or 2, (args.output_dir,), timeout_s=600)[0]
    if "bad_keys" not in result:  # not rank 0 of a launcher: rank 0 reports
        return 0
    losses, resumed, bad = result["losses"], result["resumed"], result["bad_keys"]
    print("losses after step 4:", " ".join(f"{v:.5f}" for v in losses))
    print("resumed at step 4:  ", " ".join(f"{v:.5f}" for v in resumed))
    same = torch.allclose(torch.tensor(losses), torch.tensor(resumed), rtol=1e-6)
    print("from_pretrained:", bad if bad else "no missing or unexpected key", end=", ")
    print(f"max |logits - trained model's| = {result['logits_diff']:.2e}")
    return 0 if same and not bad and result["logits_diff"] < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())

"""transformers' Trainer on one of the spawned gloo ranks, as the Trainer tests build it.

The environment is what torchrun would set (the process group itself is initialised by
``tests.dist_utils``); samples run in order, so that W ranks see together in one step
what one process sees in one batch of ``global_batch`` rows.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers

from tests.test_wrap import VOCAB


def torchrun_env(rank: int, world: int, **extra: str) -> None:
    """The variables torchrun sets for ``rank`` of ``world`` on one node (and ``extra``)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        **extra,
    )


def in_order_trainer(
    rank: int,
    world: int,
    out: str,
    model: torch.nn.Module,
    callbacks: list[Any],
    *,
    steps: int,
    global_batch: int,
    **arguments: Any,
) -> transformers.Trainer:
    """A Trainer over ``global_batch * steps`` rows of random token ids (seed 3) with
    lr 1e-2 (constant), a log line every step and no reporting; ``arguments`` override
    or add ``TrainingArguments`` fields."""
    torchrun_env(rank, world)
    ids = torch.randint(
        0, VOCAB, (global_batch * steps, 8), generator=torch.Generator().manual_seed(3)
    )
    data = [{"input_ids": row, "labels": row} for row in ids]

    class InOrder(transformers.Trainer):
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> torch.utils.data.Sampler:
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = transformers.TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=global_batch // world,
        max_steps=steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo" if world > 1 else None,
        disable_tqdm=True,
        seed=0,
        **arguments,
    )
    return InOrder(model=model, args=args, train_dataset=data, callbacks=callbacks)

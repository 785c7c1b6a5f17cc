"""Configuration of ``adaptive-moe train`` and the small helpers both of its halves use
(the command line, ``training.cli``, and one rank's loop, ``training.trainer``).

    adaptive-moe train                       # 2 spawned gloo CPU workers, stdlib corpus
    torchrun --nproc-per-node 8 -m adaptive_moe train --steps 2000 --data corpus.txt
    adaptive-moe train --out runs/x --resume --steps 200   # continue, on any world size

Per step (W ranks, B windows of T bytes per rank):

    loss_r   = CE(model(x_r), y_r) + router losses      this rank's mean over B*T bytes
    backward -> replicated grads: summed in ONE flat all-reduce, divided by W
                expert grads: already summed over ranks in the owner's shard, divided by W
             => every gradient is that of the global-batch mean (a single process running
                all W*B windows computes the same step)
    the same all-reduce carries the losses and the expert shards' squared grad norm, so
    the global grad norm (clipping, non-finite check) costs no extra collective.

Outputs in ``--out``: ``metrics.jsonl`` (one record per step), ``training.png``,
``summary.json``, ``config.json``, ``strategy_table.msgpack`` (when it profiled) and
``checkpoints/`` (see ``adaptive_moe.training.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from adaptive_moe.core.checks import int_at_least
from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.training.data import DEFAULT_MAX_BYTES
from adaptive_moe.training.model import ModelConfig

METRICS = "metrics.jsonl"
PLOT = "training.png"
SUMMARY = "summary.json"
CONFIG = "config.json"
TABLE = "strategy_table.msgpack"
CHECKPOINTS = "checkpoints"
DEFAULT_NPROC = 2


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm of a step was NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; built on the launching process, validated, and
    sent to every rank. Field meanings: see ``adaptive-moe train --help``."""

    model: ModelConfig
    out: str
    data: tuple[str, ...] = ()
    data_max_bytes: int = DEFAULT_MAX_BYTES
    val_fraction: float = 0.05
    steps: int = 100
    batch_size: int = 8
    lr: float = 3e-3
    warmup: int = 10
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    seed: int = 0
    skip_nonfinite: bool = False
    ckpt_every: int = 50
    keep: int = 2
    resume: bool = False
    table: str | None = None
    use_table: bool = True
    eval_batches: int = 4
    ranks_per_node: int | None = None
    timeout_s: float = 120.0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("data_max_bytes", "steps", "batch_size", "keep", "eval_batches"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup", "ckpt_every", "seed"):
            _check_int(name, getattr(self, name), 0)
        for name, lo in (("lr", 0.0), ("timeout_s", 0.0)):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > lo):
                raise ValueError(f"{name} must be a finite number > {lo}, got {value!r}")
        for name in ("weight_decay", "clip_grad"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.table is not None and not self.use_table:
            raise ValueError("a table path and use_table=False contradict each other")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"] = self.model.to_dict()
        out["data"] = list(self.data)
        return out


def _check_int(name: str, value: object, least: int) -> None:
    int_at_least(name, value, least)


def check_world(model: ModelConfig, world: int) -> None:
    """Raise ValueError unless the experts shard evenly over ``world`` ranks."""
    try:
        ShardLayout(world, 0, model.num_experts, model.moe_d_ff)
    except ValueError as err:
        raise ValueError(
            f"{err} (--experts {model.num_experts}, --moe-d-ff {model.moe_d_ff}, {world} ranks)"
        ) from err


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant (so that a run can be
    extended or resumed without changing the steps already planned)."""
    if cfg.warmup == 0:
        return cfg.lr
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup)


def short(strategy: Strategy | None) -> str:
    """Compact strategy name for the progress bar: ``r1/d2/scatter`` (+``/2dh``)."""
    if strategy is None:
        return "-"
    a2a = "/2dh" if strategy.a2a == "2dh" else ""
    return f"r{strategy.r}{a2a}/d{strategy.degree}/{strategy.kernel}"


def nonfinite_message(step: int, loss: float, grad_norm: float, checkpoint: str | None) -> str:
    where = f"the last checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved"
    return (
        f"step {step}: the loss is {loss} and the gradient norm {grad_norm} (not finite); "
        f"stopping ({where}). Lower --lr, keep --clip-grad on, or pass --skip-nonfinite "
        f"to skip such steps"
    )

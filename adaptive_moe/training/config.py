"""Configuration of ``adaptive-moe train`` and the small helpers both of its halves use
(the command line, ``training.cli``, and one rank's loop, ``training.trainer``).

    adaptive-moe train                       # 2 spawned gloo CPU workers, stdlib corpus
    torchrun --nproc-per-node 8 -m adaptive_moe train --steps 2000 --data corpus.txt
    adaptive-moe train --out runs/x --resume --steps 200   # continue, on any world size

Per step (W ranks, B windows of T bytes per rank, N = --grad-accum micro-batches):

    loss_r   = CE(model(x_r), y_r) + router losses      this rank's mean over B*T bytes,
                                                        per micro-batch, backward of loss/N
    backward -> dense grads: averaged by ``adaptive_moe.parallelize`` (DDP buckets or
                FSDP2 reduce-scatter, overlapping the backward; DDP's no_sync and FSDP2's
                requires_gradient_sync skip it on all but the last micro-batch)
                expert grads: already summed over ranks in the owner's shard, divided by W
                (``MoELayer.set_grad_divisor``)
             => every gradient is that of the mean over the W*B*N windows of the step:
                a single process running them as one batch computes the same step
                (with N > 1 up to the router's balance loss, which is computed per
                micro-batch and is not linear in the batch)
    the global grad norm (clipping, non-finite check): ``adaptive_moe.clip_grad_norm_``,
    one scalar all-reduce; the losses for the log: one more (3 scalars).
    --precision bf16: forward under torch.autocast(bf16) over fp32 master weights and
    fp32 AdamW state; router, softmax and losses in fp32.

Outputs in ``--out``: ``metrics.jsonl`` (one record per step), ``training.png``,
``summary.json``, ``config.json``, ``strategy_table_w<W>.msgpack`` (when it profiled on W
ranks: one table per world size, so a resume on another world size keeps the first's) and
``checkpoints/`` (see ``adaptive_moe.training.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch

from adaptive_moe.calc.memory import Parallel, TrainSetup, training_memory
from adaptive_moe.core.checks import int_at_least
from adaptive_moe.core.config import COMPILE_BACKENDS, CompileBackend
from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.core.sizes import PROCESS_BYTES, check_fits
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.training.data import DEFAULT_MAX_BYTES
from adaptive_moe.training.model import ModelConfig

METRICS = "metrics.jsonl"
PLOT = "training.png"
SUMMARY = "summary.json"
CONFIG = "config.json"
TABLE_GLOB = "strategy_table*.msgpack"  # this run's tables, any world size
CHECKPOINTS = "checkpoints"
DEFAULT_NPROC = 2


DistillSchedule = Literal["step", "linear"]
DISTILL_SCHEDULES: tuple[str, ...] = ("step", "linear")
# bf16: autocast compute over fp32 master weights and optimizer state (README "Training").
Precision = Literal["bf16", "fp32"]
PRECISIONS: tuple[str, ...] = ("bf16", "fp32")
# How the dense (non-expert) gradients are reduced: ``adaptive_moe.parallelize``'s modes.
DenseParallel = Literal["ddp", "fsdp2"]
DENSE_PARALLEL: tuple[str, ...] = ("ddp", "fsdp2")
# Settings of how a step runs, not of what it computes (metrics, summary and banner
# record them; a resumed run may change them: resumed_batch_size keeps the global batch).
SPEED_SETTINGS: tuple[str, ...] = (
    "precision", "compile", "dense_parallel", "grad_accum", "activation_checkpointing",
)  # fmt: skip

# Model presets (``--preset``): parameters in total / active per token (``adaptive-moe
# calc params``). "tiny" is ModelConfig's defaults; a GPU run with no model flags picks
# "gpu-1b" (>= 40 GiB of device memory) or "gpu-150m".
PRESETS: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = (
    ("tiny", ()),  # 0.24M: tests, CI
    (
        "cpu-9m",  # 8.7M total, 4.0M active: a CPU run that learns in minutes
        (
            ("d_model", 256), ("n_layers", 4), ("n_heads", 4), ("n_kv_heads", 2),
            ("d_ff", 1024), ("num_experts", 8), ("top_k", 2), ("moe_d_ff", 512),
            ("moe_every", 2), ("max_seq_len", 128),
        ),
    ),
    (
        # 3.2M total, 1.0M active: DeepSpeed-MoE's PR-MoE pyramid + Residual-MoE (top-1
        # routed expert + 1 shared)
        "pr-moe",
        (
            ("d_model", 128), ("n_layers", 4), ("n_heads", 4), ("n_kv_heads", 2),
            ("d_ff", 512), ("top_k", 1), ("moe_d_ff", 256), ("experts_per_layer", (0, 8, 0, 16)),
            ("shared_experts", 1), ("max_seq_len", 128),
        ),
    ),
    (
        "gpu-150m",  # 154M total, 69M active
        (
            ("d_model", 768), ("n_layers", 8), ("n_heads", 12), ("n_kv_heads", 4),
            ("d_ff", 3072), ("num_experts", 8), ("top_k", 2), ("moe_d_ff", 1536),
            ("moe_every", 2), ("max_seq_len", 512),
        ),
    ),
    (
        "gpu-1b",  # 0.95B total, 0.24B active: fills a good part of one H100/H200
        (
            ("d_model", 1024), ("n_layers", 16), ("n_heads", 16), ("n_kv_heads", 4),
            ("d_ff", 4096), ("num_experts", 16), ("top_k", 2), ("moe_d_ff", 2048),
            ("moe_every", 2), ("max_seq_len", 1024),
        ),
    ),
)  # fmt: skip
PRESET_NAMES: tuple[str, ...] = tuple(name for name, _ in PRESETS)


def preset_fields(name: str) -> dict[str, object]:
    """The ModelConfig fields preset ``name`` sets (the others keep their defaults)."""
    for preset, fields in PRESETS:
        if preset == name:
            return dict(fields)
    raise ValueError(f"--preset must be one of {', '.join(PRESET_NAMES)}, got {name!r}")


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
    allow_global_batch_change: bool = False
    table: str | None = None
    use_table: bool = True
    eval_batches: int = 4
    ranks_per_node: int | None = None
    timeout_s: float = 120.0
    progress: bool = True
    distill_from: str | None = None
    distill_weight: float = 0.5
    distill_steps: int = 0
    distill_schedule: DistillSchedule = "step"
    distill_temperature: float = 1.0
    precision: Precision | None = None  # None: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    compile_backend: CompileBackend = "inductor"
    dense_parallel: DenseParallel = "ddp"
    grad_accum: int = 1
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        self._check_speed_settings()
        if self.distill_from is not None:
            if not (math.isfinite(self.distill_weight) and self.distill_weight > 0):
                raise ValueError(
                    f"distill_weight must be a finite number > 0, got {self.distill_weight!r}"
                )
            if not (math.isfinite(self.distill_temperature) and self.distill_temperature > 0):
                raise ValueError(
                    f"distill_temperature must be a finite number > 0, "
                    f"got {self.distill_temperature!r}"
                )
            _check_int("distill_steps", self.distill_steps, 0)
            if self.distill_schedule not in DISTILL_SCHEDULES:
                raise ValueError(
                    f"distill_schedule must be one of {DISTILL_SCHEDULES}, "
                    f"got {self.distill_schedule!r}"
                )
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

    def _check_speed_settings(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(
                f"precision (--precision) must be one of {PRECISIONS}, got {self.precision!r}"
            )
        if self.dense_parallel not in DENSE_PARALLEL:
            raise ValueError(
                f"dense_parallel (--dense-parallel) must be one of {DENSE_PARALLEL}, "
                f"got {self.dense_parallel!r}"
            )
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ValueError(
                f"compile_backend must be one of {COMPILE_BACKENDS}, got {self.compile_backend!r}"
            )
        for name in ("compile", "activation_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _check_int("grad_accum", self.grad_accum, 1)

    @property
    def batch_per_step(self) -> int:
        """Sequences per rank per optimizer step: ``batch_size`` x ``grad_accum``."""
        return self.batch_size * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"] = self.model.to_dict()
        out["data"] = list(self.data)
        return out


def _check_int(name: str, value: object, least: int) -> None:
    int_at_least(name, value, least)


def check_world(model: ModelConfig, world: int) -> None:
    """Raise ValueError unless every MoE block's experts shard evenly over ``world``."""
    for e in sorted({e for e in model.layer_expert_counts() if e}):
        try:
            ShardLayout(world, 0, e, model.moe_d_ff)
        except ValueError as err:
            raise ValueError(
                f"{err} (experts {e}, --moe-d-ff {model.moe_d_ff}, {world} ranks)"
            ) from err


# The flags whose sizes decide a rank's memory (named when a run cannot fit).
_SIZE_FLAGS = {
    "d_model": "--d-model",
    "n_layers": "--layers",
    "d_ff": "--d-ff",
    "num_experts": "--experts",
    "moe_d_ff": "--moe-d-ff",
    "max_seq_len": "--seq-len",
}


def training_bytes(cfg: TrainConfig, world: int, device: torch.device) -> int:
    """The calculator's peak bytes of one rank of ``cfg`` on ``world`` ranks (experts
    sharded over all of them, the dense part replicated as under DDP)."""
    spec = cfg.model.calc_spec()
    ep = world if spec.num_experts else 1
    precision = resolve_precision(cfg.precision, device)
    # bf16 here is autocast: fp32 weights, gradients and AdamW states, bf16 activations.
    values = {"weight_value_bytes": 4, "grad_value_bytes": 4, "state_value_bytes": 4}
    setup = TrainSetup(
        micro_batch=cfg.batch_size,
        seq_len=cfg.model.max_seq_len,
        precision="bf16" if precision == "bf16" else "fp32",
        checkpointing="full" if cfg.activation_checkpointing else "none",
        capacity_factor=max(1.0, cfg.model.capacity_factor),
        **values if precision == "bf16" else {},
    )
    return training_memory(spec, Parallel(dp=world, ep=ep), setup).peak


def check_memory(cfg: TrainConfig, world: int, device: torch.device, ranks_here: int) -> None:
    """ValueError naming the size flags when ``ranks_here`` ranks of ``cfg`` (those that
    share ``device``: the host's, for CPU ranks) cannot fit its memory."""
    flags = " ".join(f"{flag} {getattr(cfg.model, f)}" for f, flag in _SIZE_FLAGS.items())
    ranks = f"{world} rank{'s' * (world > 1)} (--nproc, or torchrun's WORLD_SIZE)"
    what = f"{flags} --batch-size {cfg.batch_size} on {ranks}"
    need = training_bytes(cfg, world, device) + (PROCESS_BYTES if device.type == "cpu" else 0)
    check_fits(need, device, what, ranks=ranks_here)


def resolve_precision(precision: Precision | None, device: torch.device) -> Precision:
    """The run's precision on ``device``: ``precision``, or the device's default (bf16 on
    CUDA, fp32 elsewhere). ValueError naming --precision where the device cannot run it."""
    if precision is None:
        return "bf16" if device.type == "cuda" and _cuda_bf16(device) else "fp32"
    if precision == "bf16" and device.type == "cuda" and not _cuda_bf16(device):
        raise ValueError(
            f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 "
            f"arithmetic (compute capability >= 8.0 does); pass --precision fp32"
        )
    return precision


def _cuda_bf16(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)  # Ampere on: bf16 tensor cores


def table_file(world: int, index: int = 0) -> str:
    """The file name of a run's strategy table measured on ``world`` ranks (``index``:
    the run's ``index``-th distinct MoE layer shape)."""
    return (
        f"strategy_table_w{world}.msgpack"
        if index == 0
        else f"strategy_table_w{world}_{index}.msgpack"
    )


def resumed_batch_size(
    given: int | None,
    saved: tuple[int, int, int],
    world: int,
    accum: int,
    allow_change: bool,
) -> int:
    """The per-rank micro-batch of a run resumed on ``world`` ranks with ``accum``
    micro-batches per step, from a checkpoint whose run trained ``saved`` = (per-rank
    batch, ranks, micro-batches per step): the one that keeps the global batch per step
    (the optimisation the run was doing), unless ``allow_change``."""
    saved_batch, saved_world, saved_accum = saved
    global_batch = saved_batch * saved_world * saved_accum
    per_batch = world * accum  # sequences per step for each sequence of --batch-size
    fix = (
        f"pass --batch-size B with B x {world} rank(s) x {accum} micro-batch(es) = "
        f"{global_batch} (or no --batch-size), or --allow-global-batch-change to go on "
        f"with another global batch"
    )
    was = (
        f"{global_batch} ({saved_batch} per rank x {saved_world} ranks x {saved_accum} "
        f"micro-batch(es))"
    )
    if given is not None:
        if given * per_batch == global_batch or allow_change:
            return given
        raise ValueError(
            f"--batch-size {given} is a global batch of {given * per_batch} sequences per "
            f"step, but the checkpoint's run trained with {was}; {fix}"
        )
    if global_batch % per_batch == 0:
        return global_batch // per_batch
    if allow_change:
        return saved_batch
    raise ValueError(
        f"the checkpoint's global batch {was} does not divide over {world} rank(s) x "
        f"{accum} micro-batch(es); {fix}"
    )


def check_steps_beyond(steps: int, step: int, checkpoint: object) -> None:
    """A resumed run trains until ``steps`` in total: refuse one with nothing to train."""
    if steps <= step:
        raise ValueError(
            f"--steps {steps} is not beyond step {step} of the checkpoint {checkpoint}: "
            f"--steps counts every step of the run, so there is nothing to train; pass "
            f"--steps > {step} (the run's files were left as they are)"
        )


def distill_weight_at(cfg: TrainConfig, step: int) -> float:
    """Weight of the knowledge-distillation loss at 0-based ``step`` (staged KD,
    DeepSpeed-MoE's Mixture-of-Students): ``"step"`` keeps ``distill_weight`` for the
    first ``distill_steps`` steps and then 0 (DeepSpeed stops KD outright); ``"linear"``
    decays it linearly, ``w * (1 - step / distill_steps)``, reaching 0 at
    ``distill_steps``. ``distill_steps=0``: half of ``steps``. 0 without a teacher."""
    if cfg.distill_from is None:
        return 0.0
    stop = cfg.distill_steps or max(1, cfg.steps // 2)
    if step >= stop:
        return 0.0
    if cfg.distill_schedule == "linear":
        return cfg.distill_weight * (1.0 - step / stop)
    return cfg.distill_weight


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

"""``adaptive-moe train``: the command line (flags, resume merging, launching the ranks).
The configuration is ``training.config``; one rank's loop is ``training.trainer``."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adaptive_moe.core import cli_types as arg
from adaptive_moe.core import fileio
from adaptive_moe.core.checks import check_ranks_per_node
from adaptive_moe.core.launch import (
    external_world_size,
    launch,
    launched_externally,
    ranks_on_this_host,
)
from adaptive_moe.training.checkpoint import check_checkpoint, latest_checkpoint, read_meta
from adaptive_moe.training.config import (
    CHECKPOINTS,
    DEFAULT_NPROC,
    DENSE_PARALLEL,
    DISTILL_SCHEDULES,
    METRICS,
    PRECISIONS,
    PRESET_NAMES,
    SPEED_SETTINGS,
    TrainConfig,
    check_memory,
    check_steps_beyond,
    check_world,
    preset_fields,
    resumed_batch_size,
)
from adaptive_moe.training.data import DEFAULT_MAX_BYTES
from adaptive_moe.training.model import ModelConfig
from adaptive_moe.training.trainer import Trainer

# ModelConfig field -> command-line flag. Defaults are None: "not given", so that a
# resumed run takes the checkpoint's value and a fresh run ModelConfig's default.
_MODEL_FLAGS = {
    "d_model": "--d-model",
    "n_layers": "--layers",
    "n_heads": "--heads",
    "n_kv_heads": "--kv-heads",
    "d_ff": "--d-ff",
    "num_experts": "--experts",
    "top_k": "--top-k",
    "moe_d_ff": "--moe-d-ff",
    "moe_every": "--moe-every",
    "capacity_factor": "--capacity-factor",
    "aux_loss_weight": "--aux-loss-weight",
    "z_loss_weight": "--z-loss-weight",
    "max_seq_len": "--seq-len",
    "tie_embeddings": "--tie-embeddings",
    "experts_per_layer": "--experts-per-layer",
    "shared_experts": "--shared-experts",
    "shared_experts_per_layer": "--shared-experts-per-layer",
}
_TUPLE_FIELDS = ("experts_per_layer", "shared_experts_per_layer")
# A GPU run with no model flag trains this preset (by device memory), a CPU run "tiny".
_GPU_PRESET_MIN_GIB = 40
# Run settings that define the data stream: on resume they must match the checkpoint.
_DATA_FIELDS = ("data", "data_max_bytes", "val_fraction", "seed")
_BATCH_SIZE = 8  # per rank, of a fresh run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` subcommand's flags."""
    d = ModelConfig()
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data",
        nargs="+",
        metavar="FILE",
        default=None,
        help="text file(s) to train on, read as bytes "
        "(default: the Python standard library's own .py sources)",
    )
    g.add_argument(
        "--data-max-bytes",
        type=arg.positive_int,
        default=None,
        metavar="N",
        help=f"cap on the corpus size in bytes (default {DEFAULT_MAX_BYTES})",
    )
    g.add_argument(
        "--val-fraction",
        type=arg.fraction,
        default=None,
        metavar="F",
        help="share of the corpus held out for validation (default 0.05)",
    )
    g = parser.add_argument_group("model (defaults: ModelConfig, or the checkpoint's on --resume)")
    ints = {
        "d_model": "model width",
        "n_layers": "transformer blocks",
        "n_heads": "query heads",
        "n_kv_heads": "key/value heads (GQA)",
        "d_ff": "hidden size of the dense MLP blocks",
        "num_experts": "experts per MoE layer",
        "top_k": "experts per token",
        "moe_d_ff": "hidden size of one expert",
        "moe_every": "every N-th block is MoE",
        "max_seq_len": "bytes per sequence",
    }
    for field, what in ints.items():
        g.add_argument(
            _MODEL_FLAGS[field],
            dest=field,
            type=arg.layer_count if field == "n_layers" else arg.positive_int,
            default=None,
            metavar="N",
            help=f"{what} (default {getattr(d, field)})",
        )
    g.add_argument(
        "--capacity-factor",
        dest="capacity_factor",
        type=arg.capacity_factor,
        default=None,
        metavar="F",
        help=">0 fixed capacity factor, 0 dropless, <0 dropless capped at |f| "
        f"(default {d.capacity_factor})",
    )
    for field in ("aux_loss_weight", "z_loss_weight"):
        g.add_argument(
            _MODEL_FLAGS[field],
            dest=field,
            type=arg.non_negative_float,
            default=None,
            metavar="W",
            help=f"loss weight (default {getattr(d, field)})",
        )
    g.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default=None,
        help="model preset the other model flags override (tiny 0.24M, cpu-9m 8.7M, "
        "pr-moe 3.2M, gpu-150m 154M, gpu-1b 0.95B parameters; default: tiny on CPU; "
        f"on GPUs with no model flag gpu-1b, or gpu-150m below {_GPU_PRESET_MIN_GIB} GiB)",
    )
    g.add_argument(
        "--experts-per-layer",
        dest="experts_per_layer",
        type=arg.non_negative_int_list,
        default=None,
        metavar="E0,E1,...",
        help="PR-MoE: experts of each block, 0 = dense (e.g. 0,4,0,8; replaces --moe-every)",
    )
    g.add_argument(
        "--shared-experts",
        dest="shared_experts",
        type=arg.non_negative_int,
        default=None,
        metavar="N",
        help="Residual-MoE: always-on experts of --moe-d-ff on every MoE block (default 0)",
    )
    g.add_argument(
        "--shared-experts-per-layer",
        dest="shared_experts_per_layer",
        type=arg.non_negative_int_list,
        default=None,
        metavar="N0,N1,...",
        help="shared experts of each block instead (0 on dense blocks)",
    )
    g.add_argument(
        "--tie-embeddings",
        dest="tie_embeddings",
        default=None,
        action=argparse.BooleanOptionalAction,
        help=f"share the embedding and LM-head matrix (default {d.tie_embeddings})",
    )
    g = parser.add_argument_group("training")
    g.add_argument(
        "--steps",
        type=arg.count,
        default=100,
        metavar="N",
        help="train until this many optimizer steps in total (default 100)",
    )
    g.add_argument(
        "--batch-size",
        type=arg.count,
        default=None,
        metavar="B",
        help=f"sequences per rank per step (default {_BATCH_SIZE}; on --resume: the "
        "checkpoint's global batch divided over the ranks)",
    )
    g.add_argument(
        "--lr",
        type=arg.positive_float,
        default=3e-3,
        help="AdamW learning rate after warm-up (default %(default)s)",
    )
    g.add_argument(
        "--warmup",
        type=arg.non_negative_count,
        default=10,
        metavar="N",
        help="linear warm-up steps, then a constant rate (default %(default)s)",
    )
    g.add_argument(
        "--weight-decay",
        type=arg.non_negative_float,
        default=0.1,
        metavar="W",
        help="AdamW weight decay of matrices (default %(default)s)",
    )
    g.add_argument(
        "--clip-grad",
        type=arg.non_negative_float,
        default=1.0,
        metavar="NORM",
        help="clip the global gradient norm to this, 0: off (default %(default)s)",
    )
    g.add_argument(
        "--seed",
        type=arg.seed,
        default=None,
        metavar="N",
        help="seed of the initialisation and data order (default 0)",
    )
    g.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip a step whose loss or gradient is NaN/inf instead of stopping",
    )
    g.add_argument(
        "--eval-batches",
        type=arg.count,
        default=4,
        metavar="N",
        help="validation batches per rank at the end (default %(default)s)",
    )
    g = parser.add_argument_group("distillation (Mixture-of-Students)")
    g.add_argument(
        "--distill-from",
        metavar="CHECKPOINT",
        default=None,
        help="train against this trained teacher (a run directory or one of its "
        "checkpoints/step_N): loss = CE + w(step) * T^2 * KL(teacher || student)",
    )
    g.add_argument(
        "--distill-weight",
        type=arg.positive_float,
        default=0.5,
        metavar="W",
        help="KD loss weight while distilling (default %(default)s)",
    )
    g.add_argument(
        "--distill-steps",
        type=arg.non_negative_count,
        default=0,
        metavar="N",
        help="the KD weight is 0 from this step on (staged KD; default 0: half of --steps)",
    )
    g.add_argument(
        "--distill-schedule",
        choices=DISTILL_SCHEDULES,
        default="step",
        help="step: w until --distill-steps, then 0 (DeepSpeed-MoE); linear: w decays "
        "linearly to 0 at --distill-steps (default %(default)s)",
    )
    g.add_argument(
        "--distill-temperature",
        type=arg.positive_float,
        default=1.0,
        metavar="T",
        help="softmax temperature of the KD loss (default %(default)s)",
    )
    g = parser.add_argument_group("strategy")
    t = g.add_mutually_exclusive_group()
    t.add_argument(
        "--table",
        metavar="PATH",
        default=None,
        help="strategy table to use (default: a matching one from profiles/ or an "
        "earlier run, else profile quickly first)",
    )
    t.add_argument(
        "--no-table",
        dest="use_table",
        action="store_false",
        help="no table, no profiling: run every MoE layer's default strategy",
    )
    g = parser.add_argument_group("launch and output")
    g.add_argument(
        "--nproc",
        type=arg.count,
        default=None,
        metavar="N",
        help=f"CPU worker processes to spawn without torchrun (default "
        f"{DEFAULT_NPROC}; under torchrun: its world size)",
    )
    g.add_argument(
        "--ranks-per-node",
        type=arg.count,
        default=None,
        metavar="N",
        help="ranks per node (default LOCAL_WORLD_SIZE)",
    )
    g.add_argument(
        "--timeout",
        type=arg.seconds,
        default=120.0,
        metavar="SECONDS",
        help="collective timeout in seconds: a dead or hung rank stops the run "
        "within this bound (default 120)",
    )
    g.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="output directory (default runs/<timestamp>)",
    )
    g.add_argument(
        "--ckpt-every",
        type=arg.non_negative_count,
        default=50,
        metavar="N",
        help="save a checkpoint every N steps, and at the end (0: only at the end)",
    )
    g.add_argument(
        "--keep",
        type=arg.count,
        default=2,
        metavar="N",
        help="checkpoints kept on disk (default %(default)s)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in --out (any world size; the global "
        "batch is kept)",
    )
    g.add_argument(
        "--allow-global-batch-change",
        action="store_true",
        help="on --resume: accept a --batch-size (or a world size) that changes the "
        "checkpoint's global batch",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _add_speed_arguments(parser.add_argument_group("speed (how a step runs, not what it computes)"))


def _add_speed_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="bf16: autocast compute over fp32 master weights and AdamW state (router, "
        "softmax and losses in fp32); default bf16 on CUDA, fp32 on CPU",
    )
    g.add_argument(
        "--dense-parallel",
        choices=DENSE_PARALLEL,
        default="ddp",
        help="how the dense gradients are reduced, overlapping the backward: "
        "adaptive_moe.parallelize's mode (default %(default)s)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each transformer block (an MoE block's dense part) and, on one "
        "process, each MoE layer's grouped_mm experts",
    )
    g.add_argument(
        "--grad-accum",
        type=arg.count,
        default=1,
        metavar="N",
        help="micro-batches of --batch-size per optimizer step (default 1); the global "
        "batch is ranks x --batch-size x N sequences",
    )
    g.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each block's activations in the backward (non-reentrant)",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build the run's configuration; raises ValueError with a message for the user."""
    out = Path(args.out) if args.out else _fresh_run_dir()
    saved = _resume_source(out) if args.resume else None
    if saved is None:
        _refuse_to_overwrite(out)
    else:  # nothing to train is said before anything is launched or written
        check_steps_beyond(args.steps, int(saved["step"]), out / CHECKPOINTS)
    model = _merge_model(args, saved)
    run = saved.get("run", {}) if saved else {}
    data_given = {
        "data": tuple(args.data) if args.data else None,
        "data_max_bytes": args.data_max_bytes,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
    }
    defaults = {"data": (), "data_max_bytes": DEFAULT_MAX_BYTES, "val_fraction": 0.05, "seed": 0}
    data = {}
    for name in _DATA_FIELDS:
        before = tuple(run[name]) if name == "data" and name in run else run.get(name)
        data[name] = _merge(name, data_given[name], before, defaults[name], f"--{name}")
    return TrainConfig(
        model=model,
        out=str(out),
        **data,
        steps=args.steps,
        batch_size=_batch_size(args, saved),
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        clip_grad=args.clip_grad,
        skip_nonfinite=args.skip_nonfinite,
        ckpt_every=args.ckpt_every,
        keep=args.keep,
        resume=args.resume,
        allow_global_batch_change=args.allow_global_batch_change,
        table=args.table,
        use_table=args.use_table,
        eval_batches=args.eval_batches,
        ranks_per_node=args.ranks_per_node,
        timeout_s=args.timeout,
        progress=args.progress,
        **_distill_settings(args, run),
        **{name: getattr(args, name) for name in SPEED_SETTINGS},
    )


_DISTILL_FIELDS = ("distill_weight", "distill_steps", "distill_schedule", "distill_temperature")


def _distill_settings(args: argparse.Namespace, run: dict[str, Any]) -> dict[str, Any]:
    """The flags' distillation settings; a resumed distillation without --distill-from
    keeps its teacher and schedule (the KD weight follows the global step either way)."""
    if args.distill_from is None and run.get("distill_from"):
        return {"distill_from": run["distill_from"], **{f: run[f] for f in _DISTILL_FIELDS}}
    return {
        "distill_from": _teacher_checkpoint(args.distill_from),
        **{f: getattr(args, f) for f in _DISTILL_FIELDS},
    }


def _teacher_checkpoint(given: str | None) -> str | None:
    """The checkpoint directory ``--distill-from`` names (a run dir: its latest)."""
    if given is None:
        return None
    path = Path(given)
    if (path / CHECKPOINTS).is_dir():
        found = latest_checkpoint(path / CHECKPOINTS)
        if found is None:
            raise ValueError(f"--distill-from {path}: {path / CHECKPOINTS} holds no checkpoint")
        path = found
    read_meta(path)  # a readable adaptive_moe checkpoint, else a ValueError naming it
    check_checkpoint(path)
    return str(path)


def _fresh_run_dir() -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out, n = Path("runs") / stamp, 1
    while out.exists():
        n += 1
        out = Path("runs") / f"{stamp}-{n}"
    return out


def _resume_source(out: Path) -> dict[str, Any]:
    ckpt = latest_checkpoint(out / CHECKPOINTS)
    if ckpt is None:
        raise ValueError(
            f"--resume: {out / CHECKPOINTS} holds no checkpoint "
            f"(is --out the directory of the run to continue?)"
        )
    meta = read_meta(ckpt)
    check_checkpoint(ckpt)
    return meta


def _refuse_to_overwrite(out: Path) -> None:
    if (out / CHECKPOINTS / "latest").exists() or (out / METRICS).exists():
        raise ValueError(
            f"--out {out} already holds a run: pass --resume to continue it, "
            f"or choose another --out"
        )


def _merge(name: str, given: Any, saved: Any, default: Any, flag: str) -> Any:
    if saved is None:
        return default if given is None else given
    if given is not None and given != saved:
        raise ValueError(
            f"{flag} {given!r} differs from the checkpoint's {saved!r}; "
            f"a resumed run keeps the checkpoint's value (drop {flag})"
        )
    return saved


def _batch_size(args: argparse.Namespace, saved: dict[str, Any] | None) -> int:
    """``--batch-size``; on resume, the per-rank batch that keeps the checkpoint's
    global batch on this world size (``resumed_batch_size``)."""
    if saved is None:
        return args.batch_size or _BATCH_SIZE
    run = saved["run"]
    return resumed_batch_size(
        args.batch_size,
        (int(run["batch_size"]), int(saved["world_size"]), int(run.get("grad_accum", 1))),
        _world_size(args.nproc),
        args.grad_accum,
        args.allow_global_batch_change,
    )


def _merge_model(args: argparse.Namespace, saved: dict[str, Any] | None) -> ModelConfig:
    """A fresh run's model: the preset's, overridden by the model flags. A resumed run's:
    the checkpoint's, every field of it; every model flag given, and every field a
    given ``--preset`` defines, must agree with it."""
    preset = getattr(args, "preset", None)
    given = {f: getattr(args, f) for f in _MODEL_FLAGS if getattr(args, f) is not None}
    if saved is None:
        base = ModelConfig(**preset_fields(preset or _default_preset(args)))
        return dataclasses.replace(base, **given)
    before = dict(saved.get("model", {}))
    for field in _TUPLE_FIELDS:  # JSON keeps tuples as lists
        if isinstance(before.get(field), list):
            before[field] = tuple(before[field])
    resumed = ModelConfig.from_dict(before)
    for field, value in given.items():
        _merge(field, value, getattr(resumed, field), None, _MODEL_FLAGS[field])
    if preset is not None:
        wanted = dataclasses.replace(ModelConfig(**preset_fields(preset)), **given)
        differ = [
            f"{f.name}={getattr(wanted, f.name)!r} (checkpoint: {getattr(resumed, f.name)!r})"
            for f in dataclasses.fields(ModelConfig)
            if getattr(wanted, f.name) != getattr(resumed, f.name)
        ]
        if differ:
            raise ValueError(
                f"--preset {preset} defines another model than the checkpoint's: "
                f"{', '.join(differ)}; a resumed run keeps the checkpoint's model (drop --preset)"
            )
    return resumed


def _default_preset(args: argparse.Namespace) -> str:
    """``tiny``; on GPUs (torchrun with CUDA) with no model flag, a preset that uses the
    device: ``gpu-1b``, or ``gpu-150m`` on devices below 40 GiB."""
    if any(getattr(args, field) is not None for field in _MODEL_FLAGS):
        return "tiny"
    if _run_device().type != "cuda":
        return "tiny"
    gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    return "gpu-1b" if gib >= _GPU_PRESET_MIN_GIB else "gpu-150m"


def run(args: argparse.Namespace) -> int:
    """``adaptive-moe train``: validate, launch the ranks, report."""
    try:
        cfg = config_from_args(args)
        world = _world_size(args.nproc)
        check_ranks_per_node(cfg.ranks_per_node, world, "--ranks-per-node")
        check_world(cfg.model, world)
        device = _run_device()
        check_memory(cfg, world, device, 1 if device.type == "cuda" else ranks_on_this_host(world))
        for flag, path in [("--data", p) for p in cfg.data] + [("--table", cfg.table)]:
            if path is not None:  # a FIFO or a directory refused before a rank opens it
                fileio.check_input_file(path, flag)
        fileio.check_output_dir(cfg.out, "--out")
    except ValueError as err:
        _error(str(err))
        return 2
    try:
        result = train(cfg, world)[0]
    except RuntimeError as err:  # a rank died or raised (spawned), or this rank failed
        _error(str(err))
        return 1
    if result["status"] != "ok":
        _error(result["message"])
        return 2 if result["status"] == "usage" else 1
    return 0


def _error(message: str) -> None:
    # Under torchrun every rank runs this; say which one speaks.
    rank = os.environ.get("RANK") if external_world_size() else None
    who = f"rank {rank}: " if rank is not None else ""
    print(f"adaptive-moe train: {who}error: {message}", file=sys.stderr)


def _run_device() -> torch.device:
    """Where the ranks train: CUDA under torchrun on a CUDA machine (NCCL), else CPU."""
    if launched_externally() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _world_size(nproc: int | None) -> int:
    external = external_world_size()
    if external is None:
        return nproc or DEFAULT_NPROC
    if nproc is not None and nproc != external:
        raise ValueError(
            f"--nproc {nproc} contradicts the launcher's WORLD_SIZE={external} "
            f"(drop --nproc under torchrun)"
        )
    return external


def train(
    cfg: TrainConfig, world: int, on_step: Callable[[int, int], None] | None = None
) -> list[dict[str, Any]]:
    """Run training on ``world`` ranks (spawned, or this one under torchrun); returns
    the per-rank results (``status`` ``"ok"``, ``"nonfinite"`` or ``"usage"`` (a
    table, corpus or checkpoint that does not fit), ``message``, ...).
    ``on_step(rank, step)`` is called on every rank before each step."""
    return launch(
        _worker, world, (cfg, on_step), timeout_s=cfg.timeout_s, ranks_per_node=cfg.ranks_per_node
    )


def _worker(
    rank: int, world: int, cfg: TrainConfig, on_step: Callable[[int, int], None] | None
) -> dict[str, Any]:
    try:
        trainer = Trainer(rank, world, cfg)
        trainer.setup()
    except ValueError as err:  # a table, corpus or checkpoint that does not fit the run
        return {"status": "usage", "message": str(err)}
    return trainer.run(on_step)

"""``adaptive-moe train``: the command line (flags, resume merging, launching the ranks).
The configuration is ``training.config``; one rank's loop is ``training.trainer``."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adaptive_moe.core import cli_types as arg
from adaptive_moe.core.launch import external_world_size, launch
from adaptive_moe.training.checkpoint import latest_checkpoint, read_meta
from adaptive_moe.training.config import (
    CHECKPOINTS,
    DEFAULT_NPROC,
    METRICS,
    TrainConfig,
    check_world,
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
}
# Run settings that define the data stream: on resume they must match the checkpoint.
_DATA_FIELDS = ("data", "data_max_bytes", "val_fraction", "seed")


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
            type=arg.positive_int,
            default=None,
            metavar="N",
            help=f"{what} (default {getattr(d, field)})",
        )
    g.add_argument(
        "--capacity-factor",
        dest="capacity_factor",
        type=arg.finite_float,
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
        "--tie-embeddings",
        dest="tie_embeddings",
        default=None,
        action=argparse.BooleanOptionalAction,
        help=f"share the embedding and LM-head matrix (default {d.tie_embeddings})",
    )
    g = parser.add_argument_group("training")
    g.add_argument(
        "--steps",
        type=arg.positive_int,
        default=100,
        metavar="N",
        help="train until this many optimizer steps in total (default 100)",
    )
    g.add_argument(
        "--batch-size",
        type=arg.positive_int,
        default=8,
        metavar="B",
        help="sequences per rank per step (default 8)",
    )
    g.add_argument(
        "--lr",
        type=arg.positive_float,
        default=3e-3,
        help="AdamW learning rate after warm-up (default %(default)s)",
    )
    g.add_argument(
        "--warmup",
        type=arg.non_negative_int,
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
        type=arg.non_negative_int,
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
        type=arg.positive_int,
        default=4,
        metavar="N",
        help="validation batches per rank at the end (default %(default)s)",
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
        type=arg.positive_int,
        default=None,
        metavar="N",
        help=f"CPU worker processes to spawn without torchrun (default "
        f"{DEFAULT_NPROC}; under torchrun: its world size)",
    )
    g.add_argument(
        "--ranks-per-node",
        type=arg.positive_int,
        default=None,
        metavar="N",
        help="ranks per node (default LOCAL_WORLD_SIZE)",
    )
    g.add_argument(
        "--timeout",
        type=arg.positive_float,
        default=120.0,
        metavar="SECONDS",
        help="collective timeout in seconds: a dead or hung rank stops the run "
        "within this bound (default 120)",
    )
    g.add_argument(
        "--out", metavar="DIR", default=None, help="output directory (default runs/<timestamp>)"
    )
    g.add_argument(
        "--ckpt-every",
        type=arg.non_negative_int,
        default=50,
        metavar="N",
        help="save a checkpoint every N steps, and at the end (0: only at the end)",
    )
    g.add_argument(
        "--keep",
        type=arg.positive_int,
        default=2,
        metavar="N",
        help="checkpoints kept on disk (default %(default)s)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in --out (any world size)",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build the run's configuration; raises ValueError with a message for the user."""
    out = Path(args.out) if args.out else _fresh_run_dir()
    saved = _resume_source(out) if args.resume else None
    if saved is None:
        _refuse_to_overwrite(out)
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
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        clip_grad=args.clip_grad,
        skip_nonfinite=args.skip_nonfinite,
        ckpt_every=args.ckpt_every,
        keep=args.keep,
        resume=args.resume,
        table=args.table,
        use_table=args.use_table,
        eval_batches=args.eval_batches,
        ranks_per_node=args.ranks_per_node,
        timeout_s=args.timeout,
        progress=args.progress,
    )


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
    return read_meta(ckpt)


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


def _merge_model(args: argparse.Namespace, saved: dict[str, Any] | None) -> ModelConfig:
    base = ModelConfig()
    before = saved.get("model", {}) if saved else {}
    values = {
        field: _merge(field, getattr(args, field), before.get(field), getattr(base, field), flag)
        for field, flag in _MODEL_FLAGS.items()
    }
    return ModelConfig(**values)


def run(args: argparse.Namespace) -> int:
    """``adaptive-moe train``: validate, launch the ranks, report."""
    try:
        cfg = config_from_args(args)
        world = _world_size(args.nproc)
        check_world(cfg.model, world)
        for flag, path in [("--data", p) for p in cfg.data] + [("--table", cfg.table)]:
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")
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

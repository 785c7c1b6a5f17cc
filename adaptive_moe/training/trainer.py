"""One rank of ``adaptive-moe train`` (see ``adaptive_moe.training.cli`` for the step's maths).

A ``Trainer`` builds the data stream, model, optimizer and checkpointer, finds (or
measures) the strategy table, resumes if asked, runs the loop and reports. Rank 0 alone
draws the progress bar and writes ``metrics.jsonl``, ``summary.json``, the plot and the
summary table; every rank takes part in the collectives (gradients, checkpoints).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from adaptive_moe.calc import measured_device_flops, mfu, training_flops_per_token
from adaptive_moe.core.config import CompileBackend
from adaptive_moe.core.fileio import atomic_write
from adaptive_moe.integrations.parallelize import clip_grad_norm_, parallelize
from adaptive_moe.profiling.profiler import plan_sweep, profile_layer, summary
from adaptive_moe.runtime.experts.stacked import is_expert_param
from adaptive_moe.runtime.layer import MoELayer
from adaptive_moe.training.checkpoint import Checkpointer, TrainState, latest_checkpoint, read_meta
from adaptive_moe.training.config import (
    CHECKPOINTS,
    CONFIG,
    METRICS,
    PLOT,
    SPEED_SETTINGS,
    SUMMARY,
    TABLE_GLOB,
    NonFiniteLossError,
    TrainConfig,
    check_steps_beyond,
    check_world,
    distill_weight_at,
    lr_at,
    nonfinite_message,
    resolve_precision,
    resumed_batch_size,
    short,
    table_file,
)
from adaptive_moe.training.data import Corpus, WindowSampler, load_corpus, split
from adaptive_moe.training.model import ModelConfig, MoETransformer, wrap_blocks
from adaptive_moe.training.plot import plot_training, strategy_switches
from adaptive_moe.tuning.table import Fingerprint, LayerShape, StrategyTable

# The quick profile a run does when no table matches: few buckets, few repeats.
QUICK_BUCKETS = 4
QUICK_REPEATS = 3
_REPO_PROFILES = Path(__file__).resolve().parents[1] / "profiles"


class Trainer:
    """Training on one rank; ``run`` is collective over the default process group."""

    def __init__(self, rank: int, world: int, cfg: TrainConfig):
        self.rank, self.world = rank, world
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
        # Under torchrun every rank parsed the flags itself: a default runs/<timestamp>
        # may differ by a second between them. Rank 0's directory is the run's.
        self.cfg = cfg = dataclasses.replace(
            cfg,
            out=self._broadcast_text(cfg.out),
            precision=resolve_precision(cfg.precision, self.device),
        )
        self.out = Path(cfg.out)
        self.corpus = load_corpus(cfg.data, cfg.data_max_bytes)
        self.sampler, self.val_sampler = self._samplers(self.corpus)
        self.model = MoETransformer(
            cfg.model,
            ranks_per_node=cfg.ranks_per_node,
            compile_experts=self._compile_experts(),
            device=self.device,
            seed=cfg.seed,
        )
        self.moe_blocks = [i for i in range(cfg.model.n_layers) if cfg.model.is_moe_layer(i)]
        self.n_params = _param_count(self.model, world)  # before FSDP2 shards the dense part
        wrap_blocks(
            self.model,
            compile=cfg.compile,
            checkpoint=cfg.activation_checkpointing,
            backend=cfg.compile_backend,
        )
        # The module the training forward runs through (DDP's wrapper, or the model itself
        # under FSDP2); evaluation, checkpoints and statistics use self.model.
        self.dp = self._parallelize()
        self.expert_params = [p for p in self.model.parameters() if is_expert_param(p)]
        self.optimizer = self._build_optimizer()
        self.ckpt = Checkpointer(self.out / CHECKPOINTS, self.model, self.optimizer, keep=cfg.keep)
        self.flops_per_token = training_flops_per_token(
            cfg.model.calc_spec(), cfg.model.max_seq_len
        )
        self.device_flops = (
            measured_device_flops(torch.cuda.get_device_name(self.device))
            if self.device.type == "cuda"
            else None
        )
        self.teacher = self._build_teacher() if cfg.distill_from is not None else None
        self.state = TrainState()
        self.records: list[dict[str, Any]] = []
        self.records_this_run = 0  # of ``records``, those logged since this run started
        self.last_checkpoint: str | None = None
        self.saved_step = -1
        self._metrics_file: Any = None

    def _parallelize(self) -> torch.nn.Module:
        """The dense part under ``adaptive_moe.parallelize`` (experts left to the layers).
        DDP: fp32 gradient buckets reduced while the backward runs; buffers (RoPE tables)
        are equal on every rank by construction, so they are not broadcast each forward."""
        if self.cfg.dense_parallel == "ddp":
            return parallelize(self.model, "ddp", gradient_as_bucket_view=True, **_no_buffer_sync())
        return parallelize(self.model, "fsdp2", blocks=list(self.model.blocks))

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over fp32 parameters (the masters under bf16), state fp32. Groups: decay
        or not (matrices / vectors) x expert or dense, since FSDP2's dense DTensors and
        the plain expert tensors cannot share a foreach / fused group. Fused on CUDA;
        torch's default elsewhere (on CPU its per-parameter loop)."""
        cfg = self.cfg
        groups = []
        for expert in (False, True):
            params = [p for p in self.model.parameters() if is_expert_param(p) == expert]
            for decay in (True, False):
                chosen = [p for p in params if (p.dim() >= 2) == decay]
                if chosen:
                    wd = cfg.weight_decay if decay else 0.0
                    groups.append({"params": chosen, "weight_decay": wd})
        fused = True if self.device.type == "cuda" else None
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)

    def _compile_experts(self) -> CompileBackend | None:
        """--compile: each MoE layer's one-process grouped_mm experts as one graph too
        (the model's layers and the layer a quick profile measures alike)."""
        return self.cfg.compile_backend if self.cfg.compile else None

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16 compute over the fp32 weights under --precision bf16 (a no-op in fp32)."""
        bf16 = self.cfg.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def _build_teacher(self) -> MoETransformer:
        """The distillation teacher (Mixture-of-Students): the model of ``distill_from``'s
        checkpoint, sharded over this group like the student, weights loaded in setup."""
        meta = read_meta(self.cfg.distill_from)
        teacher_cfg = ModelConfig.from_dict(meta["model"])
        student = self.cfg.model
        if teacher_cfg.vocab_size != student.vocab_size:
            raise ValueError(
                f"--distill-from {self.cfg.distill_from}: the teacher's vocabulary "
                f"({teacher_cfg.vocab_size}) differs from the student's ({student.vocab_size})"
            )
        if teacher_cfg.max_seq_len < student.max_seq_len:
            raise ValueError(
                f"--distill-from {self.cfg.distill_from}: the teacher reads at most "
                f"{teacher_cfg.max_seq_len} bytes, the student {student.max_seq_len} (--seq-len)"
            )
        check_world(teacher_cfg, self.world)
        teacher = MoETransformer(
            teacher_cfg, ranks_per_node=self.cfg.ranks_per_node, device=self.device
        )
        teacher.eval().requires_grad_(False)
        return teacher

    def _samplers(self, corpus: Corpus) -> tuple[WindowSampler, WindowSampler]:
        cfg = self.cfg
        train, val = split(corpus, cfg.val_fraction)
        t, b = cfg.model.max_seq_len, cfg.batch_size
        try:
            val_sampler = WindowSampler(val, t, b, self.rank, self.world, cfg.seed, shuffle=False)
        except ValueError as err:
            raise ValueError(
                f"validation split (--val-fraction {cfg.val_fraction}): {err}"
            ) from err
        return WindowSampler(train, t, b, self.rank, self.world, cfg.seed), val_sampler

    # ---- the run --------------------------------------------------------------------------

    def setup(self) -> None:
        """Attach the strategy table (found or measured) and resume if asked. Raises
        ValueError for what the user must fix (a table or corpus that does not match)."""
        with self._autocast():  # tables are per compute dtype: bf16 ones under bf16
            table_note = self._setup_table()
        if self.teacher is not None:
            Checkpointer(self.out / CHECKPOINTS, self.teacher, None).load_weights(
                self.cfg.distill_from
            )
            table_note += f"\nteacher: {self.cfg.distill_from} ({_count(self.teacher)} parameters)"
        torch.manual_seed(self.cfg.seed * 1_000_003 + self.rank)  # per-rank stream
        if self.cfg.resume:
            self._resume()
        self._say(self._banner(table_note))

    def run(self, on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Train until ``cfg.steps``, evaluate, save, report (after ``setup``). Returns
        ``{"status": "ok" | "nonfinite", "message": ..., ...}`` (same on every rank)."""
        self._open_metrics()
        start_step, started = self.state.step, time.perf_counter()
        try:
            self._loop(on_step)
        except NonFiniteLossError as err:
            self._close_metrics()
            return {"status": "nonfinite", "message": str(err), "step": self.state.step}
        stats = [layer.stats() for layer in self.model.moe_layers()]
        val_loss = self._evaluate()
        if self.saved_step != self.state.step:
            self._save()
        self._close_metrics()
        self._log_val_loss(val_loss)
        wall = time.perf_counter() - started
        if self.rank == 0 and self.records:
            self._report(start_step, wall, val_loss, stats)
        return {"status": "ok", "message": "", "step": self.state.step, "val_loss": val_loss}

    def _loop(self, on_step: Callable[[int, int], None] | None) -> None:
        cfg = self.cfg
        bar = tqdm(
            total=cfg.steps,
            initial=self.state.step,
            unit="step",
            desc="train",
            dynamic_ncols=True,
            disable=self.rank != 0 or not cfg.progress,
        )
        with bar:
            while self.state.step < cfg.steps:
                if on_step is not None:
                    on_step(self.rank, self.state.step)
                record = self.train_step()
                self._log(record, bar)
                if cfg.ckpt_every and self.state.step % cfg.ckpt_every == 0:
                    self._save()

    # ---- one step -------------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches (collective); returns its
        metrics record (``step``, ``loss``, ``grad_norm``, ``step_ms``, ``tokens_per_s``,
        ``mfu``, the strategies, ...)."""
        cfg, state = self.cfg, self.state
        started = time.perf_counter()
        kd_weight = distill_weight_at(cfg, state.step)
        losses = torch.zeros(3, device=self.device)  # ce, router, kd: sums over micro-batches
        for j in range(cfg.grad_accum):
            position = state.data_position + j * self.sampler.global_batch
            with self._gradient_sync(j == cfg.grad_accum - 1):
                losses += self._micro_step(position, kd_weight)
        loss, router_loss, kd_loss = self._mean_losses(losses)
        for p in self.expert_params:
            if p.grad is None:  # no token reached this shard's experts: still a step
                p.grad = torch.zeros_like(p)
        grad_norm = float(clip_grad_norm_(self.dp, cfg.clip_grad or math.inf))
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(cfg, state.step)
            self.optimizer.step()
        elif not cfg.skip_nonfinite:
            raise NonFiniteLossError(
                nonfinite_message(state.step + 1, loss, grad_norm, self.last_checkpoint)
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        step_s = time.perf_counter() - started
        windows = cfg.grad_accum * self.sampler.global_batch
        self.state = TrainState(
            state.step + 1, state.data_position + windows, state.skipped_steps + int(not finite)
        )
        layers = list(self.model.moe_layers())
        tokens_per_s = windows * cfg.model.max_seq_len / step_s
        record = {
            "step": self.state.step,
            "loss": loss,
            "router_loss": router_loss,
            "grad_norm": grad_norm,
            "lr": lr_at(cfg, state.step),
            "skipped": not finite,
            "step_ms": step_s * 1e3,
            "tokens_per_s": tokens_per_s,
            # Model FLOPs of the student's forward + backward (the calculator's count).
            "model_tflops_per_s": tokens_per_s * self.flops_per_token / 1e12,
            "mfu": self._mfu(tokens_per_s),
            "strategies": [str(layer.last_strategy) for layer in layers],
            "world_size": self.world,  # a resume may change it (the strategies with it)
            "max_tokens": [layer.last_max_tokens for layer in layers],
            **{name: getattr(cfg, name) for name in SPEED_SETTINGS},
        }
        if cfg.distill_from is not None:
            record.update(kd_loss=kd_loss, kd_weight=kd_weight)
        return record

    def _micro_step(self, position: int, kd_weight: float) -> torch.Tensor:
        """Forward and backward of the micro-batch at ``position`` (loss / grad_accum);
        returns its [ce, router, kd] losses, detached."""
        x, y = self.sampler.batch(position)  # [B, T], [B, T]
        x, y = x.to(self.device), y.to(self.device)
        kd = torch.zeros((), device=self.device)
        with self._autocast():
            logits = self.dp(x)  # [B, T, V] fp32 (upcast from the bf16 head)
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            router = self.model.router_loss()  # fp32: the router computes in fp32
            if kd_weight > 0:  # staged KD: the teacher runs only while its weight is > 0
                kd = distillation_loss(
                    logits, self._teacher_logits(x), self.cfg.distill_temperature
                )
        ((ce + router + kd_weight * kd) / self.cfg.grad_accum).backward()
        return torch.stack([ce, router, kd]).detach()

    @contextlib.contextmanager
    def _gradient_sync(self, sync: bool) -> Iterator[None]:
        """Reduce the dense gradients in this backward (the last micro-batch) or let them
        accumulate locally (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``).
        Expert gradients arrive reduced in every backward either way."""
        if sync:
            yield
        elif isinstance(self.dp, DistributedDataParallel):
            with self.dp.no_sync():
                yield
        else:
            self.dp.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.dp.set_requires_gradient_sync(True)

    def _mean_losses(self, sums: torch.Tensor) -> tuple[float, float, float]:
        """The losses' means over the micro-batches and ranks (one 3-scalar all-reduce)."""
        dist.all_reduce(sums)
        ce, router, kd = (sums / (self.world * self.cfg.grad_accum)).tolist()
        return ce, router, kd

    def _mfu(self, tokens_per_s: float) -> float | None:
        """Model-FLOPs utilisation against the device's measured bf16 dense rate (None
        where the calculator knows no rate: CPUs, unlisted GPUs)."""
        if self.device_flops is None:
            return None
        return mfu(self.flops_per_token, tokens_per_s, self.world, self.device_flops)

    @torch.no_grad()
    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # a teacher layer without a table runs its default
            warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
            return self.teacher(x)  # [B, T, V]

    @torch.no_grad()
    def _evaluate(self) -> float:
        """Mean validation loss over ``eval_batches`` global batches (in order)."""
        self.model.eval()
        total = torch.zeros(1, device=self.device)
        for i in range(self.cfg.eval_batches):
            x, y = self.val_sampler.batch(i * self.val_sampler.global_batch)
            with self._autocast():
                logits = self.model(x.to(self.device))  # [B, T, V] fp32
            total += F.cross_entropy(logits.flatten(0, 1), y.to(self.device).flatten())
        self.model.train()
        dist.all_reduce(total)
        return float(total) / (self.world * self.cfg.eval_batches)

    # ---- strategy table ---------------------------------------------------------------------

    def _setup_table(self) -> str:
        """Attach a strategy table to every MoE layer; return a line saying which."""
        cfg = self.cfg
        layers = list(self.model.moe_layers())
        if not cfg.use_table:
            warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
            return "strategies: each MoE layer's default (--no-table)"
        if cfg.table is not None:
            table = StrategyTable.load(cfg.table)
            for layer in layers:
                layer.use_table(table)
            return f"strategy table {cfg.table}"
        # One table per distinct layer shape (PR-MoE blocks differ in E), in block order.
        shapes: dict[LayerShape, list[MoELayer]] = {}
        for layer in layers:
            shapes.setdefault(layer.layer_shape(), []).append(layer)
        notes = []
        for i, (shape, group) in enumerate(shapes.items()):
            here = find_table(self.out, group[0].fingerprint(), shape) if self.rank == 0 else None
            found = self._broadcast_text(str(here or ""))
            if found:
                table = StrategyTable.load(found)
                note = f"strategy table {found} (matches this run)"
            else:
                path = self.out / table_file(self.world, i)  # one table per world size
                table, note = self._quick_profile(group[0], path)
            for layer in group:
                layer.use_table(table)
            notes.append(note if len(shapes) == 1 else f"{shape.label()}: {note}")
        return "\n".join(notes)

    def _quick_profile(self, like: MoELayer, path: Path) -> tuple[StrategyTable, str]:
        cfg, m = self.cfg, self.cfg.model
        fp = like.fingerprint()
        layer = MoELayer(
            m.d_model,
            m.moe_d_ff,
            like.router_cfg.num_experts,
            m.top_k,
            capacity_factor=m.capacity_factor,
            ranks_per_node=cfg.ranks_per_node,
            device=self.device,
            compile_experts=self._compile_experts(),  # measure the experts as they will run
        )
        tokens = cfg.batch_size * m.max_seq_len
        sweep = {"num_buckets": QUICK_BUCKETS, "capacity_factor": m.capacity_factor}
        self._say(
            f"no strategy table matches this run ({fp.world_size} x {fp.device}, "
            f"{fp.backend}; layer {like.layer_shape().label()}): profiling quickly "
            f"({plan_sweep(layer, tokens, **sweep).describe()}, {QUICK_REPEATS} repeats) ..."
        )
        started = time.perf_counter()
        notes: list[str] = []
        table = profile_layer(
            layer,
            tokens,
            repeats=QUICK_REPEATS,
            warmup=1,
            seed=cfg.seed,
            progress=cfg.progress and self.rank == 0,
            report=notes.append,
            **sweep,
        )
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            table.save(path)
        self._say(
            f"profiled in {time.perf_counter() - started:.1f} s -> {path}\n"
            + "".join(f"{note}\n" for note in notes)
            + summary(table, layer.default_strategy)
        )
        return table, f"strategy table {path} (profiled now)"

    def _broadcast_text(self, text: str) -> str:
        """Rank 0's ``text`` on every rank (so that all ranks take the same decision)."""
        data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=self.device)
        size = torch.tensor([data.numel()], device=self.device)
        dist.broadcast(size, src=0)
        if not int(size):
            return ""
        buf = (
            data
            if self.rank == 0
            else torch.empty(int(size), dtype=torch.uint8, device=self.device)
        )
        dist.broadcast(buf, src=0)
        return bytes(buf.tolist()).decode()

    # ---- checkpoints ------------------------------------------------------------------------

    def _save(self) -> None:
        meta = {
            "run": self.cfg.to_dict(),
            "corpus": {
                "source": self.corpus.source,
                "sha256": self.corpus.sha256,
                "bytes": len(self.corpus),
            },
        }
        self.last_checkpoint = str(self.ckpt.save(self.state, meta))
        self.saved_step = self.state.step

    def _resume(self) -> None:
        path = latest_checkpoint(self.out / CHECKPOINTS)
        if path is None:
            raise ValueError(f"--resume: no checkpoint in {self.out / CHECKPOINTS}")
        meta = read_meta(path)
        check_steps_beyond(self.cfg.steps, int(meta["step"]), path)
        run = meta.get("run", {})
        resumed_batch_size(
            self.cfg.batch_size,
            (
                int(run.get("batch_size", self.cfg.batch_size)),
                int(meta.get("world_size", self.world)),
                int(run.get("grad_accum", 1)),
            ),
            self.world,
            self.cfg.grad_accum,
            self.cfg.allow_global_batch_change,
        )  # raises unless this run keeps the checkpoint's global batch (or may change it)
        saved = meta.get("corpus", {})
        if saved.get("sha256") != self.corpus.sha256:
            raise ValueError(
                f"--resume: the corpus ({self.corpus.source}, {len(self.corpus)} "
                f"bytes) differs from the one checkpoint {path} was trained on "
                f"({saved.get('source')}, {saved.get('bytes')} bytes)"
            )
        self.state = self.ckpt.load(path)
        self.last_checkpoint, self.saved_step = str(path), self.state.step

    # ---- output (rank 0) ------------------------------------------------------------------

    def _say(self, text: str) -> None:
        if self.rank == 0:
            tqdm.write(text)

    def _banner(self, table_note: str) -> str:
        m, cfg = self.cfg.model, self.cfg
        backend = dist.get_backend()
        resumed = f", resumed at step {self.state.step}" if cfg.resume else ""
        return (
            f"training a {self.n_params / 1e6:.2f}M-parameter MoE LM ({m.n_layers} blocks, "
            f"MoE in {len(self.moe_blocks)}: {self._experts_label()}, k={m.top_k}) on "
            f"{self.world} x {self.device.type} ({backend}){resumed}\n"
            f"data: {self.corpus.source}, {len(self.corpus) / 2**20:.1f} MiB; "
            f"{cfg.batch_size} x {m.max_seq_len} bytes per rank per micro-batch, "
            f"{cfg.grad_accum} micro-batch(es) per step\n{self._speed_label()}\n"
            f"{table_note}\noutput: {self.out}"
        )

    def _speed_label(self) -> str:
        cfg = self.cfg
        precision = (
            "bf16 (autocast; fp32 master weights and AdamW state)"
            if cfg.precision == "bf16"
            else "fp32"
        )
        fused = "fused" if self.optimizer.defaults.get("fused") else "torch's default"
        return (
            f"precision {precision}; dense part: {cfg.dense_parallel}; compile "
            f"{f'on (per block, {cfg.compile_backend})' if cfg.compile else 'off'}; "
            f"activation checkpointing "
            f"{'on (per block)' if cfg.activation_checkpointing else 'off'}; {fused} AdamW"
        )

    def _experts_label(self) -> str:
        m = self.cfg.model
        counts = [m.layer_experts(i) for i in self.moe_blocks]
        shared = [m.layer_shared_experts(i) for i in self.moe_blocks]
        label = f"E={counts[0]}" if len(set(counts)) == 1 else f"E per MoE block {counts}"
        if any(shared):
            label += f", shared {shared[0] if len(set(shared)) == 1 else shared}"
        return label

    def _open_metrics(self) -> None:
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / METRICS
        if self.cfg.resume and path.exists():
            # Records past the checkpoint belong to steps that will now run again.
            kept = [
                r
                for r in map(json.loads, path.read_text().splitlines())
                if r["step"] <= self.state.step
            ]
            self.records = kept
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
        else:
            atomic_write(self.out / CONFIG, json.dumps(self.cfg.to_dict(), indent=1))
            path.write_text("")
        self._metrics_file = open(path, "a")  # noqa: SIM115 - closed in _close_metrics

    def _close_metrics(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None

    def _log_val_loss(self, val_loss: float) -> None:
        """Put ``val_loss`` on the last metrics record (rewriting ``metrics.jsonl``: the
        plot shows every run's validation loss, those of resumed runs included)."""
        if self.rank != 0 or not self.records:
            return
        self.records[-1]["val_loss"] = val_loss
        atomic_write(self.out / METRICS, "".join(json.dumps(r) + "\n" for r in self.records))

    def _log(self, record: dict[str, Any], bar: tqdm) -> None:
        if self.rank != 0:
            return
        if self.cfg.resume and not self.records_this_run:
            record["resumed"] = True  # the plot marks the resume at the first step after it
        self.records_this_run += 1
        self.records.append(record)
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        layers = list(self.model.moe_layers())
        strategies = " ".join(
            f"b{i}:{short(layer.last_strategy)}" for i, layer in zip(self.moe_blocks, layers)
        )
        skipped = " SKIPPED(non-finite)" if record["skipped"] else ""
        mfu_text = f" | MFU {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else ""
        bar.set_postfix_str(
            f"loss {record['loss']:.3f} | {record['tokens_per_s']:,.0f} tok/s{mfu_text}"
            f" | {strategies}{skipped}",
            refresh=False,
        )
        bar.update()

    def _report(
        self,
        start_step: int,
        wall: float,
        val_loss: float,
        stats: list[dict[Any, dict[str, float]]],
    ) -> None:
        # matplotlib costs seconds to import: only rank 0 needs it, and only now.
        recs = self.records
        new = [r for r in recs if r["step"] > start_step]
        tail = [r["loss"] for r in recs[-10:]]
        tps = sum(r["tokens_per_s"] for r in new) / max(1, len(new))
        mfus = [r["mfu"] for r in new if r.get("mfu") is not None]
        mfu_text = (
            f" (MFU {100 * sum(mfus) / len(mfus):.1f}% of the bf16 peak)"
            if mfus
            else f" ({self.flops_per_token * tps / 1e12:.3f} model TFLOP/s; no MFU: the "
            f"calculator knows no peak for {self.device.type})"
        )
        lines = [
            f"done: steps {start_step} -> {self.state.step} in {wall:.1f} s; loss "
            f"{recs[0]['loss']:.3f} (step {recs[0]['step']}) -> {sum(tail) / len(tail):.3f} "
            f"(mean of the last {len(tail)}); val loss {val_loss:.3f}; {tps:,.0f} tokens/s"
            f"{mfu_text}; "
            f"{len(strategy_switches(recs))} strategy switches"
            + (
                f"; {self.state.skipped_steps} steps skipped (non-finite)"
                if self.state.skipped_steps
                else ""
            ),
            _stats_table(self.moe_blocks, stats),
        ]
        plot_training(recs, self.out / PLOT, title=f"adaptive-moe train: {self.out}")
        summary_data = {
            "steps": self.state.step,
            "wall_s": wall,
            "val_loss": val_loss,
            "final_loss": recs[-1]["loss"],
            "skipped_steps": self.state.skipped_steps,
            "tokens_per_s": tps,
            "flops_per_token": self.flops_per_token,
            "mfu": sum(mfus) / len(mfus) if mfus else None,
            "checkpoint": self.last_checkpoint,
            **{name: getattr(self.cfg, name) for name in SPEED_SETTINGS},
            "layers": [
                {"block": i, "strategies": {str(s): v for s, v in st.items()}}
                for i, st in zip(self.moe_blocks, stats)
            ],
        }
        atomic_write(self.out / SUMMARY, json.dumps(summary_data, indent=1))
        lines.append(
            f"wrote {self.out / METRICS}, {self.out / PLOT}, {self.out / SUMMARY}; "
            f"checkpoint {self.last_checkpoint}"
        )
        print("\n".join(lines), flush=True)


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Knowledge-distillation loss ``T^2 * mean_tokens KL(softmax(t / T) || softmax(s / T))``
    of logits [..., V] (Hinton et al.; the T^2 keeps its gradient scale independent of T)."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, v).float() / temperature, dim=-1)  # [N, V]
    t = F.log_softmax(teacher_logits.reshape(-1, v).float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="sum") / s.shape[0]
    return kl * temperature**2


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's keyword that stops the per-forward buffer broadcast (torch 2.13 renamed
    ``broadcast_buffers`` to ``forward_sync_buffers`` and deprecated the old name)."""
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    name = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {name: False}


def _param_count(model: torch.nn.Module, world: int) -> int:
    """Parameters of a model whose experts are sharded over ``world`` ranks."""
    return sum(p.numel() * (world if is_expert_param(p) else 1) for p in model.parameters())


def _count(model: torch.nn.Module) -> str:
    return f"{_param_count(model, dist.get_world_size()) / 1e6:.2f}M"


def _stats_table(blocks: list[int], stats: list[dict[Any, dict[str, float]]]) -> str:
    head = f"{'MoE layer':<10} {'strategy':<26} {'forwards':>8} {'share':>7} {'mean ms':>9}"
    lines = [head, "-" * len(head)]
    for block, st in zip(blocks, stats):
        total = sum(v["count"] for v in st.values()) or 1
        for strategy, v in sorted(st.items(), key=lambda kv: -kv[1]["count"]):
            lines.append(
                f"{'block ' + str(block):<10} {strategy!s:<26} {int(v['count']):>8} "
                f"{100 * v['count'] / total:>6.1f}% {v['mean_ms']:>9.3f}"
            )
    return "\n".join(lines)


def find_table(out: Path, fingerprint: Fingerprint, shape: LayerShape) -> Path | None:
    """The first table that matches the run exactly (``_candidate_tables`` order), or
    None. Unreadable or foreign files are passed over."""
    for path in _candidate_tables(out):
        try:
            table = StrategyTable.load(path)
        except (OSError, ValueError):
            continue
        if not table.mismatches(fingerprint, shape):
            return path
    return None


def _candidate_tables(out: Path) -> list[Path]:
    """Where a matching table may already be: this run's, shipped ones, earlier runs'."""
    paths = sorted(out.glob(TABLE_GLOB))
    for folder in (Path("profiles"), _REPO_PROFILES):
        paths += sorted(folder.glob("*.msgpack"))
    earlier = sorted(
        out.parent.glob(f"*/{TABLE_GLOB}"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    unique: dict[Path, None] = {}
    for p in paths + earlier:
        if p.is_file():
            unique.setdefault(p.resolve(), None)
    return list(unique)

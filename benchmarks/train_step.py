"""Whole training steps on one GPU, one process, one run (issue 28 item 4): this
project's trainer, a baseline written plainly as a torchtitan user would, and a
transformers Qwen3-MoE-shaped model plain and after ``adaptive_moe.wrap``.

    python -m benchmarks.train_step [--parts a,b,c] [--preset gpu-1b] [--modes eager,compile]
        [--batch-size 8] [--warmup 5] [--steps 10] [--no-table] [--out results.json]
    python -m benchmarks.train_step --smoke      # tiny shapes, end to end on a CPU

Parts (each one independent of the others; ``--parts`` picks them):
    a  ``adaptive_moe.training.Trainer.train_step()`` on ``--preset`` (default gpu-1b),
       for each precision (bf16, fp32) x ``--modes`` (eager, compile), built as
       ``adaptive-moe train`` builds it (``Trainer(0, 1, cfg)`` in a 1-process NCCL group;
       gloo on a CPU), its strategy table found or quickly profiled by ``setup()``
       (``--no-table``: each layer's default). Data: the trainer's own corpus.
    b  the same model (the preset's dims) with the experts as ``torch._grouped_mm`` over
       expert-sorted tokens, each expert's rows padded to 16 bytes as torchtitan pads
       them; the router an fp32 linear + softmax + top-k, renormalised, with the same
       load-balancing and z-losses; attention, dense SwiGLU blocks, norms and embedding
       are ``training.model``'s modules, so (a) vs (b) differs only in the MoE layer
       and the trainer. bf16 autocast over fp32 parameters, fused AdamW (the trainer's
       betas, lr, weight decay), gradient clipping at 1.0; ``compile`` compiles each
       block (``nn.Module.compile``), as torchtitan does. Data: seeded random tokens of
       the trainer's batch shape.
    c  a Qwen3-MoE-shaped transformers model (4 decoder layers, hidden 2048, 128 experts
       of 768, top-8, vocab 151936, batch 4 x 2048 = 8192 tokens), bf16, random weights
       from the config: plain with every ``experts_implementation`` the installed
       transformers registers (one that errors or runs out of memory is reported as
       skipped), then the same model after ``adaptive_moe.wrap``. Step = forward +
       backward of the LM loss (no optimizer step); logits agreement = relative L2
       difference of each variant's logits from the first plain implementation's, same
       weights and inputs; greedy ``generate`` at batch 1 (32-token prompt, 128 new
       tokens, ``min_new_tokens`` = ``max_new_tokens`` so EOS cannot stop it early).
       Newer transformers switch ``grouped_mm`` to ``batched_mm`` inside ``generate``
       on GPUs: the generate column shows what ``generate`` itself runs.

Method: every variant is warmed up (``--warmup`` steps: compilation, autotuning, the
layers' first measured choice), then ``--steps`` steps are timed one by one with the
device synchronised around each; the median is reported. Peak = the largest
``max_memory_allocated`` during the timed steps (absolute: weights, gradients, optimizer
state and activations). Model FLOPs per token: ``adaptive_moe.calc``'s
``training_flops_per_token`` (for (c) from the HF config through ``calc.hf``), so
TFLOP/s = tokens/s x FLOPs/token and MFU = TFLOP/s / the dense bf16 rate of one 8192^3
matmul measured at the start of the same run (not a data-sheet peak). Ratios: (a) and
(b) rows against (b) with the same mode; (c) rows against the fastest plain
implementation (step time and generate tokens/s separately).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from adaptive_moe.calc import training_flops_per_token
from adaptive_moe.runtime.routing.router import balance_loss, z_loss
from adaptive_moe.training.config import PRESET_NAMES, TrainConfig, preset_fields
from adaptive_moe.training.model import Block, ModelConfig, SwiGLU
from adaptive_moe.training.trainer import Trainer

PARTS = ("a", "b", "c")
MODES = ("eager", "compile")
PRECISIONS = ("bf16", "fp32")
# The TrainConfig fields and Trainer method part (a) drives (issue 28 items 1-3).
TRAINER_FIELDS = ("precision", "compile")
# (c): Qwen3-30B-A3B's block at 4 layers; batch x sequence = 8192 tokens per step.
QWEN3_MOE = dict(
    hidden_size=2048, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=4,
    head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
    num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    vocab_size=151936, max_position_embeddings=4096,
)  # fmt: skip
QWEN3_BATCH = (4, 2048)
SMOKE_QWEN3 = dict(
    QWEN3_MOE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
    num_experts=8, num_experts_per_tok=2, vocab_size=256, max_position_embeddings=128,
)  # fmt: skip
SMOKE_BATCH = (2, 32)
PROMPT_TOKENS, NEW_TOKENS = 32, 128
SMOKE_NEW_TOKENS = 8
DENSE_N, SMOKE_DENSE_N = 8192, 256


@dataclasses.dataclass
class Timing:
    ms: float  # median over the timed steps
    peak_gib: float | None  # None on a CPU


# ---- measuring ----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[], object],
    device: torch.device,
    warmup: int,
    steps: int,
    before: Callable[[], None] = lambda: None,
    profile: str | None = None,
) -> Timing:
    """Median ms of ``steps`` calls of ``step`` after ``warmup`` untimed ones, the device
    synchronised around each call; ``before`` runs untimed ahead of every call.
    ``profile``: a label; then two more steps run under ``torch.profiler`` and its top
    operators by device time are printed under that label (``--profile``)."""
    for _ in range(warmup):
        before()
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        before()
        _sync(device)
        started = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - started) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if profile is not None:
        print_profile(profile, step, before, device)
    return Timing(statistics.median(times), peak)


def print_profile(
    label: str, step: Callable[[], object], before: Callable[[], None], device: torch.device
) -> None:
    """Two steps under ``torch.profiler``: the operators that took the most device time
    (self time, so nested operators are not counted twice), per step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            before()
            step()
        _sync(device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)
    print(f"---- profile: {label} (2 steps) ----\n{table}", flush=True)


def dense_tflops(device: torch.device, n: int) -> float:
    """TFLOP/s of one n^3 matmul (bf16 on a GPU, fp32 on a CPU), median of repeats."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, generator=g).to(dtype) for _ in range(2))
    timing = time_steps(lambda: a @ b, device, warmup=10, steps=50)
    return 2 * n**3 / timing.ms / 1e9


def _free(device: torch.device) -> None:
    """Drop what the last variant left (compiled graphs, cached blocks) before the next."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _row(part: str, variant: str, timing: Timing, tokens: int, flops_per_token: float,
         dense: float, **extra: Any) -> dict[str, Any]:  # fmt: skip
    tokens_per_s = tokens / (timing.ms / 1e3)
    tflops = tokens_per_s * flops_per_token / 1e12
    return {"part": part, "variant": variant, "step_ms": timing.ms, "tokens_per_s": tokens_per_s,
            "model_tflops": tflops, "mfu": tflops / dense, "peak_gib": timing.peak_gib,
            **extra}  # fmt: skip


def _skipped(part: str, variant: str, reason: str) -> dict[str, Any]:
    print(f"  [{part}] {variant}: skipped ({reason})", flush=True)
    return {"part": part, "variant": variant, "skipped": reason}


def _failure(err: BaseException) -> str:
    if isinstance(err, torch.OutOfMemoryError):
        return f"out of memory: {str(err).splitlines()[0]}"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _say(part: str, row: dict[str, Any]) -> None:
    if "skipped" in row:
        return
    peak = "" if row["peak_gib"] is None else f", {row['peak_gib']:.2f} GiB"
    print(f"  [{part}] {row['variant']}: {row['step_ms']:.2f} ms, "
          f"{row['tokens_per_s']:,.0f} tok/s, MFU {100 * row['mfu']:.1f}%{peak}",
          flush=True)  # fmt: skip


# ---- (a) this project's trainer -----------------------------------------------------------


def trainer_interface_missing() -> list[str]:
    """What part (a) needs from the trainer and the installed code lacks."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    missing = [f"TrainConfig.{name}" for name in TRAINER_FIELDS if name not in fields]
    if not callable(getattr(Trainer, "train_step", None)):
        missing.append("Trainer.train_step()")
    return missing


@contextlib.contextmanager
def one_process_group(device: torch.device) -> Iterator[None]:
    """The default group of ``adaptive-moe train`` on one GPU (NCCL; gloo on a CPU),
    rendezvous through a file so that no port is needed."""
    with tempfile.TemporaryDirectory() as tmp:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{tmp}/rendezvous", rank=0,
                                world_size=1)  # fmt: skip
        try:
            yield
        finally:
            dist.destroy_process_group()


def part_trainer(args: argparse.Namespace, device: torch.device, dense: float) -> list[dict]:
    model = ModelConfig(**preset_fields(args.preset))
    tokens = args.batch_size * model.max_seq_len
    flops = training_flops_per_token(model.calc_spec(), model.max_seq_len)
    rows = []
    with one_process_group(device), tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions:
            for mode in args.modes:
                variant = f"adaptive_moe Trainer, {precision}, {mode}"
                print(f"[a] {variant}: building, setup, {args.warmup} warm-up steps ...",
                      flush=True)  # fmt: skip
                new_fields = {"precision": precision, "compile": mode == "compile"}
                # One folder per mode: the trainer reuses a sibling run's matching table,
                # and a table is not marked eager or compiled, so each mode profiles its own.
                try:
                    cfg = TrainConfig(
                        model=model, out=str(Path(tmp) / mode / precision),
                        steps=args.warmup + args.steps + 2 * args.profile,
                        batch_size=args.batch_size,
                        ckpt_every=0, progress=False, use_table=not args.no_table,
                        eval_batches=1, **new_fields,
                    )  # fmt: skip
                    rows.append(_trainer_row(cfg, variant, args, device, tokens, flops, dense))
                except ValueError as err:  # a precision the device cannot run
                    rows.append(_skipped("a", variant, str(err)))
                except Exception as err:  # a failed variant is a row: the others still run
                    traceback.print_exc()
                    rows.append(_skipped("a", variant, _failure(err)))
                _say("a", rows[-1])
                _free(device)
    return rows


def _trainer_row(
    cfg: TrainConfig, variant: str, args: argparse.Namespace, device: torch.device,
    tokens: int, flops: float, dense: float,
) -> dict[str, Any]:  # fmt: skip
    trainer = Trainer(0, 1, cfg)
    trainer.setup()  # profiles this variant's strategy table (or finds a matching one)
    records: list[dict[str, Any]] = []
    label = variant if args.profile else None
    timing = time_steps(lambda: records.append(trainer.train_step()), device,
                        args.warmup, args.steps, profile=label)  # fmt: skip
    timed = records[args.warmup : args.warmup + args.steps]
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return _row("a", variant, timing, tokens, flops, dense,
                trainer_step_ms=statistics.median(r["step_ms"] for r in timed),
                trainer_mfu=statistics.median(mfus) if mfus else None,
                final_loss=timed[-1]["loss"], strategies=timed[-1].get("strategies"))  # fmt: skip


# ---- (b) the plain baseline ---------------------------------------------------------------


def grouped_swiglu(
    x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """SwiGLU experts over expert-sorted tokens with two ``torch._grouped_mm`` calls.

    x [N, d]; ids, gates [N, k]; w1 [E, 2h, d] (gate rows, then up rows); w2 [E, d, h]
    -> [N, d] = sum_j gates[:, j] * expert_{ids[:, j]}(x). Each expert's rows start at
    a 16-byte boundary and every expert gets at least one aligned block (TMA needs
    aligned group starts; the ragged-K weight-gradient GEMM may reject empty groups), as
    torchtitan pads them; the buffer is sized by its bound, so nothing syncs the host."""
    n, k = ids.shape
    e, d, h = w1.shape[0], x.shape[1], w2.shape[2]
    align = 16 // x.element_size()
    flat = ids.reshape(-1)  # [N*k]
    order = flat.argsort(stable=True)  # [N*k] slots, expert-sorted
    # bincount's output length depends on the data, which torch.compile cannot trace.
    counts = torch.zeros(e, dtype=torch.long, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E]
    padded = ((counts + align - 1) // align).clamp(min=1) * align  # [E]
    ends = padded.cumsum(0)  # [E]
    expert = flat[order]  # [N*k]
    within = torch.arange(n * k, device=x.device) - (counts.cumsum(0) - counts)[expert]
    pos = (ends - padded)[expert] + within  # [N*k] row of each sorted slot in the buffer
    buf = x.new_zeros((n * k + e * align, d)).index_copy(0, pos, x[order // k])  # [M, d]
    offs = ends.to(torch.int32)
    hg = torch._grouped_mm(buf, w1.transpose(1, 2), offs=offs)  # [M, 2h]
    a = F.silu(hg[:, :h]) * hg[:, h:]  # [M, h]
    y = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)  # [M, d]
    slots = torch.empty_like(y[: n * k]).index_copy(0, order, y[pos])  # [N*k, d] token order
    return (slots.view(n, k, d) * gates.unsqueeze(-1).to(slots.dtype)).sum(1)  # [N, d]


class GroupedMoE(nn.Module):
    """The baseline's MoE FFN: fp32 router (softmax, top-k, renormalised), the
    ``grouped_swiglu`` experts in the autocast dtype; ``aux_loss`` / ``z_loss`` as the
    project's layer defines them."""

    def __init__(self, d: int, h: int, e: int, k: int):
        super().__init__()
        self.k = k
        self.router = nn.Linear(d, e, bias=False)
        self.w1 = nn.Parameter(torch.empty(e, 2 * h, d))
        self.w2 = nn.Parameter(torch.empty(e, d, h))
        self.aux_loss = self.z_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        x = x.reshape(b * t, d)  # [N, d]
        with torch.autocast(x.device.type, enabled=False):  # the router in fp32
            logits = F.linear(x.float(), self.router.weight.float())  # [N, E]
        probs = logits.softmax(-1)  # [N, E]
        gates, ids = probs.topk(self.k, dim=-1)  # [N, k]
        gates = gates / gates.sum(-1, keepdim=True)
        flat = ids.reshape(-1)  # [N*k]; counts [E], slots routed to each expert
        counts = probs.new_zeros(probs.shape[1]).index_add_(0, flat, probs.new_ones(flat.shape))
        self.aux_loss = balance_loss(probs, counts, ids.numel())
        self.z_loss = z_loss(logits)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(
            x.device.type) else x.dtype  # fmt: skip
        y = grouped_swiglu(x.to(dtype), ids, gates, self.w1.to(dtype), self.w2.to(dtype))
        return y.view(b, t, d)


class BaselineLM(nn.Module):
    """``MoETransformer``'s architecture (training.model) with ``GroupedMoE`` as its MoE
    blocks: embedding, pre-norm blocks, final norm, tied head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg, GroupedMoE(cfg.d_model, cfg.moe_d_ff, cfg.num_experts, cfg.top_k)
                  if cfg.is_moe_layer(i) else SwiGLU(cfg.d_model, cfg.d_ff, None), None)
            for i in range(cfg.n_layers)
        )  # fmt: skip
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, cfg.init_std)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] -> logits [B, T, V], the weighted router losses."""
        x = self.embed(tokens)  # [B, T, d]
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.norm(x), self.embed.weight)  # [B, T, V]
        moe = [b.ffn for b in self.blocks if isinstance(b.ffn, GroupedMoE)]
        router = sum(self.cfg.aux_loss_weight * m.aux_loss + self.cfg.z_loss_weight * m.z_loss
                     for m in moe)  # fmt: skip
        return logits, router


def _baseline_optimizer(model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """The trainer's AdamW (decay on matrices only), fused where the device has it."""
    defaults = TrainConfig(model=ModelConfig(), out="")
    params = list(model.parameters())
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": defaults.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=defaults.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )  # fmt: skip


def part_baseline(args: argparse.Namespace, device: torch.device, dense: float) -> list[dict]:
    cfg = ModelConfig(**preset_fields(args.preset))
    t = cfg.max_seq_len
    tokens = args.batch_size * t
    flops = training_flops_per_token(cfg.calc_spec(), t)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (args.batch_size, t + 1), generator=g).to(device)
    x, y = batch[:, :-1], batch[:, 1:]  # [B, T] each
    rows = []
    for mode in args.modes:
        variant = f"baseline grouped_mm, bf16, {mode}"
        print(f"[b] {variant}: building, {args.warmup} warm-up steps ...", flush=True)
        torch.manual_seed(0)
        with torch.device(device):
            model = BaselineLM(cfg)
        if mode == "compile":
            for block in model.blocks:
                block.compile()
        opt = _baseline_optimizer(model, device)

        def step(model=model, opt=opt) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits, router = model(x)  # [B, T, V]
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) + router
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            label = variant if args.profile else None
            timing = time_steps(step, device, args.warmup, args.steps, profile=label)
            rows.append(_row("b", variant, timing, tokens, flops, dense))
        except (RuntimeError, NotImplementedError) as err:  # e.g. no bf16 grouped_mm here
            rows.append(_skipped("b", variant, _failure(err)))
        _say("b", rows[-1])
        del model, opt, step
        _free(device)
    return rows


# ---- (c) transformers, plain and wrapped --------------------------------------------------


def experts_implementations() -> list[str]:
    """Every ``experts_implementation`` the installed transformers registers."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager", *(name for name in ALL_EXPERTS_FUNCTIONS if name != "eager")]


def set_experts_implementation(model: nn.Module, name: str) -> str:
    """Switch the model's experts; returns what its config now says it runs."""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(name)
    else:  # older transformers 5: the config attribute the experts read
        model.config._experts_implementation = name
    return str(model.config._experts_implementation)


def part_transformers(args: argparse.Namespace, device: torch.device, dense: float) -> list[dict]:
    import transformers

    import adaptive_moe as am
    from adaptive_moe.calc.hf import from_hf_config

    config = transformers.Qwen3MoeConfig(**(SMOKE_QWEN3 if args.smoke else QWEN3_MOE))
    b, t = SMOKE_BATCH if args.smoke else QWEN3_BATCH
    new_tokens = SMOKE_NEW_TOKENS if args.smoke else NEW_TOKENS
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    flops = training_flops_per_token(from_hf_config(config.to_dict()), t)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (b, t), generator=g).to(device)  # [B, T]
    prompt = ids[:1, :PROMPT_TOKENS]  # [1, P]
    print(f"[c] Qwen3-MoE-shaped model, {config.num_hidden_layers} layers, {dtype}: building ...",
          flush=True)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    bench = _HFBench(model, ids, prompt, new_tokens, args, device, b * t, flops, dense)
    working = None
    for name in experts_implementations():
        try:
            runs = set_experts_implementation(model, name)
        except (ValueError, KeyError, ImportError) as err:
            bench.rows.append(_skipped("c", f"plain {name}", _failure(err)))
            continue
        if bench.measure(f"plain {name}", experts_implementation=runs) and working is None:
            working = name
    # wrap checks each block against the original's output: give it one that runs.
    set_experts_implementation(model, working or "eager")
    print("[c] adaptive_moe.wrap ...", flush=True)
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")  # by design
    am.wrap(model)
    bench.measure("adaptive_moe.wrap")
    # The same wrap with each layer's batch-1 decode step replayed as a CUDA graph.
    am.wrap(am.unwrap(model), inference=am.InferenceConfig(cuda_graph_tokens=1))
    bench.measure("adaptive_moe.wrap, cuda_graph_tokens=1")
    # Each layer's training forward with its grouped_mm experts as one compiled graph.
    am.wrap(am.unwrap(model), compile_experts="inductor")
    bench.measure("adaptive_moe.wrap, compile_experts")
    _ratios_c(bench.rows)
    rows = bench.rows
    del model, bench
    _free(device)
    return rows


class _HFBench:
    """One model, measured under several implementations on the same weights/inputs."""

    def __init__(self, model, ids, prompt, new_tokens, args, device, tokens, flops, dense):
        self.model, self.ids, self.prompt, self.new_tokens = model, ids, prompt, new_tokens
        self.args, self.device = args, device
        self.tokens, self.flops, self.dense = tokens, flops, dense
        self.reference: torch.Tensor | None = None  # the first variant's logits, on the host
        self.rows: list[dict[str, Any]] = []

    def measure(self, variant: str, **extra: Any) -> bool:
        """Append the variant's row (or why it was skipped); True if it ran."""
        print(f"[c] {variant}: logits, {self.args.warmup} warm-up steps, generate ...",
              flush=True)  # fmt: skip
        failure = None
        try:
            rel = self._logits_rel()
            timing = self._train_timing()
            gen = self._generate_tok_s()
        except Exception as err:  # any failure of a third-party implementation is a row
            traceback.print_exc()
            failure = _failure(err)
        self._clear()  # after the except block: the traceback held the failed step's tensors
        if failure is not None:
            self.rows.append(_skipped("c", variant, failure))
            return False
        self.rows.append(_row("c", variant, timing, self.tokens, self.flops, self.dense,
                              logits_rel_diff=rel, generate_tok_s=gen, **extra))  # fmt: skip
        _say("c", self.rows[-1])
        print(f"  [c] {variant}: logits rel diff {rel:.2e}, generate {gen:.1f} tok/s", flush=True)
        return True

    @torch.no_grad()
    def _logits_rel(self) -> float:
        self.model.eval()
        logits = self.model(input_ids=self.ids[:1], use_cache=False).logits  # [1, T, V]
        logits = logits.float().cpu()  # kept off the device: no variant's peak includes it
        self.model.train()
        if self.reference is None:
            self.reference = logits
        return float((logits - self.reference).norm() / self.reference.norm())

    def _train_timing(self) -> Timing:
        self.model.train()

        def step() -> None:
            self.model(input_ids=self.ids, labels=self.ids, use_cache=False).loss.backward()

        return time_steps(step, self.device, self.args.warmup, self.args.steps, self._clear)

    @torch.no_grad()
    def _generate_tok_s(self) -> float:
        self.model.eval()
        n = self.new_tokens
        kwargs = dict(do_sample=False, min_new_tokens=n, max_new_tokens=n, pad_token_id=0)
        self.model.generate(self.prompt, **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4})
        _sync(self.device)
        started = time.perf_counter()
        out = self.model.generate(self.prompt, **kwargs)  # [1, P + n]
        _sync(self.device)
        seconds = time.perf_counter() - started
        self.model.train()
        if out.shape[1] - self.prompt.shape[1] != n:
            raise RuntimeError(f"generate produced {out.shape[1] - self.prompt.shape[1]} tokens")
        return n / seconds

    def _clear(self) -> None:
        for p in self.model.parameters():
            p.grad = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _ratios_c(rows: list[dict[str, Any]]) -> None:
    """Step and generate ratios against the fastest plain implementation of each."""
    plain = [r for r in rows if "skipped" not in r and r["variant"].startswith("plain")]
    if not plain:
        return
    step = min(r["step_ms"] for r in plain)
    gen = max(r["generate_tok_s"] for r in plain)
    for r in rows:
        if "skipped" not in r:
            r["x_ref"] = step / r["step_ms"]
            r["x_ref_generate"] = r["generate_tok_s"] / gen


# ---- the run -----------------------------------------------------------------------------


def _ratios_ab(rows: list[dict[str, Any]]) -> None:
    """tokens/s of each (a) and (b) row over (b)'s with the same mode."""
    base = {r["variant"].rsplit(", ", 1)[1]: r["tokens_per_s"]
            for r in rows if r["part"] == "b" and "skipped" not in r}  # fmt: skip
    for r in rows:
        if r["part"] in "ab" and "skipped" not in r:
            mode = r["variant"].rsplit(", ", 1)[1]
            r["x_ref"] = r["tokens_per_s"] / base[mode] if mode in base else None


def _cell(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def print_tables(rows: list[dict[str, Any]], header: str) -> None:
    print(f"\n{header}")
    print("| part | variant | step ms | tokens/s | model TFLOP/s | MFU | peak GiB | x ref "
          "| logits rel diff | generate tok/s | x ref (generate) |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        head = f"| {r['part']} | {r['variant']} "
        if "skipped" in r:
            print(head + f"| skipped: {r['skipped']} |" + " |" * 9)
            continue
        print(head + f"| {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['model_tflops']:.3g} "
              f"| {100 * r['mfu']:.1f}% | {_cell(r['peak_gib'], '.2f')} "
              f"| {_cell(r.get('x_ref'), '.2f')} | {_cell(r.get('logits_rel_diff'), '.2e')} "
              f"| {_cell(r.get('generate_tok_s'), '.1f')} "
              f"| {_cell(r.get('x_ref_generate'), '.2f')} |")  # fmt: skip
    print(
        "x ref: (a), (b) tokens/s over (b)'s with the same mode; (c) the fastest plain "
        "step ms (and generate tok/s) over the row's"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="a,b,c", help="a (trainer), b (baseline), c (transformers)")
    p.add_argument("--preset", choices=PRESET_NAMES, default=None,
                   help="model of (a) and (b) (default gpu-1b; tiny with --smoke)")  # fmt: skip
    p.add_argument("--modes", default="eager,compile", help="(a), (b): eager, compile")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="(a): bf16, fp32")
    p.add_argument("--batch-size", type=int, default=None,
                   help="(a), (b): sequences per step (default 8; 2 with --smoke)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2)")
    p.add_argument("--no-table", action="store_true", help="(a): no table (--smoke: always)")
    p.add_argument("--profile", action="store_true",
                   help="(a), (b): print each variant's top operators by device time")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on a CPU")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    smoke = args.smoke
    for name, full, small in (("preset", "gpu-1b", "tiny"), ("batch_size", 8, 2),
                              ("warmup", 5, 1), ("steps", 10, 2)):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, small if smoke else full)
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 1:  # the first step compiles / measures: never time it
        p.error(f"--warmup must be >= 1, got {args.warmup}")
    args.no_table = args.no_table or smoke
    args.parts = [s for s in args.parts.split(",") if s]
    args.modes = [s for s in args.modes.split(",") if s]
    args.precisions = [s for s in args.precisions.split(",") if s]
    for flag, given, valid in (("--parts", args.parts, PARTS), ("--modes", args.modes, MODES),
                               ("--precisions", args.precisions, PRECISIONS)):  # fmt: skip
        bad = [v for v in given if v not in valid]
        if bad or not given:
            p.error(f"{flag}: {bad or 'nothing'} given; valid: {','.join(valid)}")
    missing = trainer_interface_missing() if "a" in args.parts else []
    if missing:
        p.error(f"--parts a drives {', '.join(missing)} (issue 28 items 1-3), which this "
                f"checkout lacks; run --parts b,c until they are merged")  # fmt: skip
    if not (smoke or torch.cuda.is_available()):
        p.error("no CUDA device: the benchmark runs on one GPU (--smoke runs on a CPU)")
    return args


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    started = time.perf_counter()
    n = SMOKE_DENSE_N if args.smoke else DENSE_N
    dense = dense_tflops(device, n)
    print(f"{name}: dense {n}^3 matmul {dense:.1f} TFLOP/s", flush=True)
    parts = {"a": part_trainer, "b": part_baseline, "c": part_transformers}
    rows: list[dict[str, Any]] = []
    elapsed = {}
    for part in PARTS:
        if part in args.parts:
            begun = time.perf_counter()
            rows += parts[part](args, device, dense)
            elapsed[part] = time.perf_counter() - begun
            print(f"[{part}] done in {elapsed[part]:.0f} s", flush=True)
    _ratios_ab(rows)
    date = datetime.date.today().isoformat()
    header = (f"{date}, {name}, torch {torch.__version__}, transformers "
              f"{_transformers_version()}, preset {args.preset}, batch "
              f"{args.batch_size}, median of {args.steps} steps after {args.warmup}; dense "
              f"{n}^3 matmul {dense:.1f} TFLOP/s (MFU's denominator); "
              f"{time.perf_counter() - started:.0f} s in all")  # fmt: skip
    print_tables(rows, header)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": date, "device": name, "torch": torch.__version__,
                       "transformers": _transformers_version(), "dense_tflops": dense,
                       "settings": vars(args), "part_seconds": elapsed, "rows": rows},
                      f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()

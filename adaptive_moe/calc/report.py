"""Human-readable tables (aligned, with units) and JSON payloads of the calculators."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from adaptive_moe.calc.flops import FlopCount, InferenceFlops, RunEstimate
from adaptive_moe.calc.memory import GIB, InferenceMemory, Parallel, TrainingMemory
from adaptive_moe.calc.model import ModelSpec
from adaptive_moe.calc.params import ParamCount

Row = tuple[str, str, str]  # label, value, note


def fmt_count(n: float) -> str:
    """A parameter count with a B/M/K suffix: ``46.70 B``."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def fmt_flops(x: float) -> str:
    """FLOPs in GFLOP below a PFLOP, else in scientific notation."""
    if abs(x) < 1e15:
        return f"{x / 1e9:.3f} GFLOP"
    return f"{x:.3e} FLOP"


def fmt_bytes(n: float) -> str:
    """Bytes in GiB (MiB below 1 GiB)."""
    if abs(n) < GIB:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / GIB:.2f} GiB"


def fmt_seconds(s: float) -> str:
    for scale, unit in ((86400.0, "days"), (3600.0, "h"), (60.0, "min")):
        if s >= scale:
            return f"{s / scale:.2f} {unit}"
    return f"{s:.3g} s"


def render(title: str, rows: Sequence[Row], footer: Sequence[str] = ()) -> str:
    """An aligned table: labels left, values right, notes after."""
    width = max(len(label) for label, _, _ in rows)
    vwidth = max(len(value) for _, value, _ in rows)
    lines = [title, "-" * len(title)]
    lines += [
        f"{label:<{width}}  {value:>{vwidth}}  {note}".rstrip() for label, value, note in rows
    ]
    return "\n".join([*lines, *footer])


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:5.1f} %" if whole else ""


def spec_dict(spec: ModelSpec) -> dict[str, object]:
    return {**dataclasses.asdict(spec), "name": spec.name}


def params_rows(count: ParamCount) -> list[Row]:
    parts = [
        ("embeddings", count.embedding),
        ("attention", count.attention),
        ("dense FFN", count.dense_ffn),
        ("routed experts", count.experts),
        ("shared experts", count.shared_experts),
        ("router", count.router),
        ("norms", count.norms),
        ("LM head", count.lm_head),
    ]
    rows = [(label, fmt_count(n), _share(n, count.total)) for label, n in parts if n]
    rows.append(("total", fmt_count(count.total), f"{count.total:,}"))
    rows.append(("active per token", fmt_count(count.active), _share(count.active, count.total)))
    if count.buffers:
        rows.append(("buffers (not params)", fmt_count(count.buffers), "score-correction bias"))
    return rows


def flops_rows(fwd: FlopCount, train_per_token: float, tokens: float | None) -> list[Row]:
    parts = [
        ("QKV projections", fwd.qkv),
        ("attention scores", fwd.attn_scores),
        ("attention over values", fwd.attn_values),
        ("output projection", fwd.out_proj),
        ("dense FFN", fwd.dense_ffn),
        ("routed experts", fwd.experts),
        ("shared experts", fwd.shared_experts),
        ("router", fwd.router),
        ("LM head", fwd.lm_head),
    ]
    rows = [(label, fmt_flops(x), _share(x, fwd.total)) for label, x in parts if x]
    rows.append(("forward / token", fmt_flops(fwd.total), "= inference / token"))
    rows.append(("training / token", fmt_flops(train_per_token), "fwd + bwd"))
    if tokens is not None:
        total = fmt_flops(train_per_token * tokens)
        rows.append(("training, all tokens", total, f"{tokens:.3g} tokens"))
    return rows


def inference_flops_rows(inf: InferenceFlops) -> list[Row]:
    rows = [
        ("prefill", fmt_flops(inf.prefill), _share(inf.prefill, inf.total)),
        ("decode", fmt_flops(inf.decode), _share(inf.decode, inf.total)),
        ("total", fmt_flops(inf.total), ""),
    ]
    if inf.per_output_token:
        rows.append(("per generated token", fmt_flops(inf.per_output_token), "decode average"))
    return rows


def _rate(device_flops: float, gpus: int) -> str:
    return f"{device_flops / 1e12:.0f} TFLOP/s x {gpus} GPU"


def time_row(run: RunEstimate) -> Row:
    note = f"at MFU {run.mfu:.0%}, {_rate(run.device_flops, run.gpus)}"
    return ("estimated time", fmt_seconds(run.seconds), note)


def mfu_row(value: float, device_flops: float, gpus: int) -> Row:
    return ("MFU of that throughput", f"{value:.1%}", _rate(device_flops, gpus))


def layout_text(par: Parallel) -> str:
    text = (
        f"dp={par.dp} tp={par.tp} pp={par.pp} ep={par.ep} ZeRO-{par.zero_stage} "
        f"experts r={par.expert_r} {par.expert_kernel}"
    )
    if par.sequence_parallel:
        text += " sequence-parallel"
    if par.zero3_live_params is not None:
        text += f" live-params {fmt_count(par.zero3_live_params)}"
    return text


def training_rows(mem: TrainingMemory, pp: int = 1) -> list[Row]:
    return [
        ("weights", fmt_bytes(mem.weights), ""),
        ("gradients", fmt_bytes(mem.gradients), "" if mem.keep_grads else "from the backward on"),
        ("optimizer states", fmt_bytes(mem.optimizer_states), "incl. fp32 master copy"),
        ("activations (saved)", fmt_bytes(mem.activations), ""),
        ("working (transient)", fmt_bytes(mem.working), "largest: loss or one block's bwd"),
        ("  of it communication", fmt_bytes(mem.communication), "gathered experts, a2a buffers"),
        ("optimizer step temp", fmt_bytes(mem.optimizer_step), ""),
        ("forward/backward high", fmt_bytes(mem.backward), "activations + working at once"),
        *_misc_row(mem.misc),
        ("peak", fmt_bytes(mem.peak), _stage_note(mem.stage, pp)),
    ]


def _stage_note(stage: int, pp: int) -> str:
    """Which pipeline stage the peak is on; nothing to say without a pipeline."""
    return f"pipeline stage {stage} of {pp}" if pp > 1 else ""


def _misc_row(misc: int) -> list[Row]:
    return [("miscellaneous", fmt_bytes(misc), "fixed allowance")] if misc else []


def inference_rows(mem: InferenceMemory, pp: int = 1) -> list[Row]:
    return [
        ("weights", fmt_bytes(mem.weights), ""),
        ("KV cache", fmt_bytes(mem.kv_cache), ""),
        ("working (prefill)", fmt_bytes(mem.working), "one block + last logits"),
        *_misc_row(mem.misc),
        ("peak", fmt_bytes(mem.peak), _stage_note(mem.stage, pp)),
    ]


def fits_line(peak: int, gib: float) -> str:
    if peak <= gib * GIB:
        return f"fits on {gib:g} GiB: yes ({(gib * GIB - peak) / GIB:.2f} GiB to spare)"
    return f"does NOT fit on {gib:g} GiB: needs {peak / GIB:.2f} GiB"

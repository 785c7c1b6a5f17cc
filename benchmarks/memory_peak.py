"""What is alive at the peak of one training step of the package's model (CUDA only).

Runs the configurations of ``benchmarks/calc_memory_check.py``: a warm-up step, then one
step recorded with ``torch.cuda.memory._record_memory_history``. Replaying the recorded
allocations and frees gives the live bytes over time; at the peak of each phase (forward,
backward, optimizer step) it prints the tensors alive that were allocated during the
step, grouped by where they were allocated (the innermost frame of this repository and
the innermost torch frame), largest first. Tensors that existed before the step
(weights, gradients, optimizer states) are one line, "resident".

    python -m benchmarks.memory_peak --only mixtral-like
    python -m benchmarks.memory_peak --only fine --top 25 --json $OUT/peak.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys

import torch

from adaptive_moe.training.model import MoETransformer
from benchmarks.calc_memory_check import CONFIGS, DTYPES, _loss

MIB = 1 << 20


@dataclasses.dataclass
class PhasePeak:
    """Live bytes at the highest point of one phase, by allocation site."""

    phase: str
    peak: int
    sites: list[tuple[str, int, int]]  # (site, bytes, tensors), largest first


def _site(frames: list[dict]) -> str:
    """Innermost frame of this repository plus the innermost frame of anything else."""
    ours = next(
        (f for f in frames if "adaptive_moe/" in f["filename"] or "benchmarks/" in f["filename"]),
        None,
    )
    other = next((f for f in frames if f is not ours and "/torch/" in f["filename"]), None)
    parts = []
    if ours is not None:
        parts.append(f"{ours['filename'].split('/')[-1]}:{ours['line']} {ours['name']}")
    if other is not None:
        parts.append(f"[{other['filename'].split('/')[-1]}:{other['line']} {other['name']}]")
    return " ".join(parts) or "?"


def _replay(trace: list[dict], marks: list[int], resident: int) -> list[PhasePeak]:
    """Replay ``trace``; ``marks`` are the trace lengths at the end of each phase."""
    names = ["forward", "backward", "optimizer step"]
    live: dict[int, dict] = {}
    total = resident
    peaks: list[PhasePeak] = []
    best, best_live = -1, {}
    phase = 0
    for i, event in enumerate(trace):
        while phase < len(marks) and i >= marks[phase]:
            peaks.append(_summarize(names[phase], best, best_live, resident))
            best, best_live, phase = -1, {}, phase + 1
        action = event["action"]
        if action == "alloc":
            live[event["addr"]] = event
            total += event["size"]
        elif action == "free_requested" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
        if total > best:
            best, best_live = total, dict(live)
    if phase < len(names):
        peaks.append(_summarize(names[phase], best, best_live, resident))
    return peaks


def _summarize(phase: str, peak: int, live: dict[int, dict], resident: int) -> PhasePeak:
    by_site: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    by_site["resident (before the step)"] = [resident, 0]
    for event in live.values():
        entry = by_site[_site(event.get("frames", []))]
        entry[0] += event["size"]
        entry[1] += 1
    sites = sorted(((s, b, n) for s, (b, n) in by_site.items()), key=lambda x: -x[1])
    return PhasePeak(phase, peak, sites)


def trace_step(name: str, dtype: torch.dtype, device: torch.device) -> tuple[list[PhasePeak], int]:
    """The phase peaks of one traced step and ``max_memory_allocated`` over it (both
    beyond what was allocated before the model was built)."""
    cfg, batch, seq_len = CONFIGS[name]
    base = torch.cuda.memory_allocated(device)
    model = MoETransformer(cfg, device=device).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)

    def step(marks: list[int] | None = None) -> None:
        opt.zero_grad(set_to_none=False)
        loss = _loss(model, tokens)
        _mark(marks)
        loss.backward()
        _mark(marks)
        opt.step()

    step()
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device) - base
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    torch.cuda.reset_peak_memory_stats(device)
    marks: list[int] = []
    step(marks)
    torch.cuda.synchronize(device)
    allocator_peak = torch.cuda.max_memory_allocated(device) - base
    snapshot = torch.cuda.memory._snapshot(device)
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][device.index or 0]
    # marks hold trace lengths; the trace was empty when recording began
    return _replay(trace, marks, resident), allocator_peak


def _mark(marks: list[int] | None) -> None:
    if marks is None:
        return
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    marks.append(len(snap["device_traces"][torch.cuda.current_device()]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(CONFIGS), action="append")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--top", type=int, default=20, help="sites to print per phase")
    parser.add_argument("--json", help="also write every phase's sites here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs CUDA (torch.cuda.memory._record_memory_history)")
    device = torch.device("cuda", torch.cuda.current_device())
    out = {}
    for name in args.only or sorted(CONFIGS):
        peaks, allocator_peak = trace_step(name, DTYPES[args.dtype], device)
        out[name] = {
            "max_memory_allocated": allocator_peak,
            "phases": [dataclasses.asdict(p) for p in peaks],
        }
        print(f"== {name}: max_memory_allocated {allocator_peak / MIB:.1f} MiB")
        for p in peaks:
            print(f"   {p.phase}: peak {p.peak / MIB:.1f} MiB")
            for site, nbytes, count in p.sites[: args.top]:
                print(f"     {nbytes / MIB:9.1f} MiB  {count:4d}  {site}")
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

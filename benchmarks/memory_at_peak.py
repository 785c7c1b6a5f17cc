"""What is alive at the peak of one training step: replays the CUDA caching allocator's
history and groups the live bytes at the peak by the innermost adaptive_moe (or
torch.nn) source line that allocated them.

    python benchmarks/memory_at_peak.py --only mixtral-like
"""

from __future__ import annotations

import argparse
import collections

import torch

from adaptive_moe.model import MoETransformer
from benchmarks.calc_memory_check import CONFIGS, DTYPES, _loss


def _site(frames: list[dict]) -> str:
    for f in frames:
        name = f.get("filename", "")
        if "adaptive_moe" in name or "csrc_triton" in name or "torch/nn/" in name:
            return f"{name.split('/')[-1]}:{f.get('line')} {f.get('name')}"
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="mixtral-like", choices=sorted(CONFIGS))
    p.add_argument("--rows", type=int, default=18)
    args = p.parse_args()
    cfg, batch, seq_len = CONFIGS[args.only]
    device = torch.device("cuda")
    model = MoETransformer(cfg, device=device).to(DTYPES["bf16"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)
    for record in (False, True):
        if record:
            torch.cuda.memory._record_memory_history(max_entries=200000)
        opt.zero_grad(set_to_none=True)
        _loss(model, tokens).backward()
        opt.step()
    torch.cuda.synchronize()
    trace = torch.cuda.memory._snapshot()["device_traces"][0]
    live, total, peak, at_peak = {}, 0, 0, {}
    for ev in trace:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            total += ev["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])["size"]
    by_site = collections.Counter()
    for ev in at_peak.values():
        by_site[_site(ev.get("frames", []))] += ev["size"]
    print(f"{args.only}: peak of the recorded step {peak / 2**20:.1f} MiB above its start")
    for site, size in by_site.most_common(args.rows):
        print(f"{size / 2**20:10.1f} MiB  {site}")


if __name__ == "__main__":
    main()

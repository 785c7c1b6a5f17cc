"""One process: ``torch.compile``, activation checkpointing, an EMA copy and bf16.

    python examples/ecosystem_compile_checkpoint.py

- ``copy.deepcopy`` works at any time (here: an EMA of the weights after a training
  forward); the copy shares the process groups, not the weights.
- ``.to(torch.bfloat16)`` converts the experts; the router stays fp32 (it scores in fp32).
- ``torch.compile(model)`` runs; the layer's host-side decisions (routing counts,
  strategy lookup) stay graph breaks (README). Compile and warm-up runs are counted in
  ``stats()`` but not timed.
- ``torch.utils.checkpoint`` (``use_reentrant=False``): the recomputation replays the
  strategy the forward chose and is not counted again.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch.utils.checkpoint import checkpoint

import adaptive_moe as am

D, H, E = 32, 64, 4


def main() -> None:
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    torch.manual_seed(0)
    layer = am.MoELayer(D, H, E, top_k=2)
    ema = None
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    compiled = torch.compile(layer, backend="aot_eager")  # "inductor" on GPU
    for _ in range(8):  # the first calls compile (counted, not timed)
        x = torch.randn(64, D)
        y = checkpoint(compiled, x, use_reentrant=False)
        if ema is None:
            ema = copy.deepcopy(layer)  # after a forward, with its graph pending
        (y.square().mean() + 0.01 * layer.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), layer.parameters()):
                e.lerp_(p, 0.1)
    for strategy, s in layer.stats().items():
        print(f"{strategy}: {s['count']} forwards, {s['timed']} timed, mean {s['mean_ms']:.2f} ms")
    ema.to(torch.bfloat16)
    print(
        "EMA copy in bf16: experts",
        ema.experts.gate_up_proj.dtype,
        "router",
        ema.router.weight.dtype,
    )
    print("EMA output", tuple(ema(torch.randn(8, D).bfloat16()).shape))


if __name__ == "__main__":
    main()

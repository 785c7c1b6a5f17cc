"""Profile one MoE layer, save its strategy table, and train with automatic switching.

    python examples/profile_and_switch.py                       # 2 spawned gloo CPU ranks
    torchrun --nproc-per-node 8 examples/profile_and_switch.py  # GPUs, NCCL

Every rank builds the same layer (the expert weights are sharded by the fixed layout),
measures every strategy on synthetic routing, and then runs a few optimizer steps in
which the routing skew changes; each forward looks its strategy up in the table.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import adaptive_moe as am
from adaptive_moe.core.launch import external_world_size, launch
from adaptive_moe.profiling.profiler import profile_layer
from adaptive_moe.runtime.experts import is_expert_param


def main(rank: int, world: int, table_dir: str) -> None:
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    torch.manual_seed(0)
    layer = am.MoELayer(d_model=64, d_ff=128, num_experts=8, top_k=2, device=device)

    # 1. Profile (collective: every rank gets the same table) and save it.
    table = profile_layer(layer, tokens=128, num_buckets=3, repeats=3, warmup=1, progress=rank == 0)
    path = Path(table_dir) / "layer.msgpack"
    if rank == 0:
        table.save(path)
    dist.barrier()

    # 2. Train with the table: the layer picks a strategy per forward, moving nothing.
    layer.use_table(path)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    for step in range(12):
        x = torch.randn(128, 64, device=device)
        x[:, 0] += 3.0 * (step // 4)  # growing skew: one expert gets ever more tokens
        y = layer(x)
        loss = y.square().mean() + 0.01 * layer.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in layer.parameters():  # data-parallel gradients: replicated params only
            if not is_expert_param(p):
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        if rank == 0:
            print(
                f"step {step:2d}  busiest expert {layer.last_max_tokens:4d} rows  "
                f"ran {layer.last_strategy}"
            )
    if rank == 0:
        for strategy, s in layer.stats().items():
            print(f"{strategy!s:<28} ran {s['count']:3d}x, mean {s['mean_ms']:.2f} ms")


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    with tempfile.TemporaryDirectory() as tmp:
        launch(main, external_world_size() or 2, (tmp,), timeout_s=300)

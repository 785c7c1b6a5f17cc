"""DDP and FSDP2 over a model holding ``MoELayer``s, experts handled.

    python examples/ecosystem_ddp_fsdp2.py --mode ddp          # 2 spawned gloo CPU ranks
    python examples/ecosystem_ddp_fsdp2.py --mode fsdp2 --nproc 4
    torchrun --nproc-per-node 8 examples/ecosystem_ddp_fsdp2.py --mode ddp   # GPUs (NCCL)

``adaptive_moe.parallelize`` puts DDP (experts in its ignore list) or ``fully_shard``
(experts in ``ignored_params``) on the model and makes every layer divide its expert
gradients by the data-parallel size, as the wrapper divides the dense ones. A plain
``DistributedDataParallel(model)`` works too after ``adaptive_moe.exclude_experts_from_ddp
(model)``; without it the first forward stops with an error instead of training on
rank 0's broadcast experts. Prints the mean loss of each step (the same on every rank).
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.distributed as dist
from torch import nn

import adaptive_moe as am
from adaptive_moe.core.launch import external_world_size, launch

D, H, E = 32, 64, 4


class Block(nn.Module):
    def __init__(self, device: torch.device):
        super().__init__()
        self.norm = nn.LayerNorm(D, device=device)
        self.moe = am.MoELayer(D, H, E, top_k=2, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.moe(self.norm(x))


class Net(nn.Module):
    def __init__(self, device: torch.device):
        super().__init__()
        self.inp = nn.Linear(D, D, device=device)
        self.blocks = nn.ModuleList([Block(device) for _ in range(2)])
        self.out = nn.Linear(D, 1, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x if block is not self.blocks[0] else self.inp(x))
        return self.out(x)  # [N, 1]


def run(rank: int, world: int, mode: str, steps: int) -> list[float]:
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    device = (
        torch.device("cuda", rank % torch.cuda.device_count())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    torch.manual_seed(0)  # the dense weights must start equal on every rank
    net = Net(device)
    model = am.parallelize(net, mode=mode)
    opt = torch.optim.AdamW(am.param_groups(net), lr=1e-2)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own share of the batch
    losses = []
    for _ in range(steps):
        x = torch.randn(64, D, generator=g).to(device)
        loss = (model(x) - x.sum(-1, keepdim=True)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    if rank == 0:
        print(f"{mode}: " + " ".join(f"{v:.4f}" for v in losses))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["ddp", "fsdp2"], default="ddp")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    launch(run, external_world_size() or args.nproc, (args.mode, args.steps))


if __name__ == "__main__":
    main()

"""Every strategy on NCCL against the float64 single-process reference of the global
batch (the check of tests/test_strategies.py, on GPUs, bf16, every kernel):

    torchrun --nproc-per-node 8 -m tests.nccl_equivalence --ranks-per-node 4

bf16 tolerance: relative Frobenius error <= 3e-2 for outputs, losses and gradients.
Exits 1 and prints the failing (config, strategy) pairs if any.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import warnings

import torch
import torch.distributed as dist

from tests.test_strategies import _configs, _worker

BF16_TOL = 3e-2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks-per-node", type=int, default=None)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    configs = [(*c[:-1], None) for c in _configs(world, every_pair=True)]  # every kernel
    failures = _worker(
        rank, world, configs, args.ranks_per_node, device="cuda", dtype=torch.bfloat16, tol=BF16_TOL
    )
    every = [None] * world
    dist.all_gather_object(every, failures)
    dist.destroy_process_group()
    if rank == 0:
        flat = [f for fs in every for f in fs]
        print(
            f"{len(configs)} configurations x every strategy on {world} ranks (nccl, bf16): "
            f"{len(flat)} failures"
        )
        print("\n".join(flat[:40]))
        return 1 if flat else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the multi-rank layer benchmarks share: their flags, building the layer on this
rank's device, and running a worker on every rank (torchrun or spawned CPU ranks) with
rank 0's JSON result written to --out."""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable

import torch

from adaptive_moe.core.launch import external_world_size, launch
from adaptive_moe.runtime.layer import MoELayer


def add_layer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-ff", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--nproc", type=int, default=2, help="CPU ranks to spawn (not under torchrun)")
    p.add_argument("--ranks-per-node", type=int, default=None)
    p.add_argument("--out", default=None, help="write rank 0's result here as JSON")


def build_layer(args: argparse.Namespace) -> MoELayer:
    """The layer of the flags on this rank's GPU (or the CPU), same seed on every rank."""
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    torch.manual_seed(0)
    return MoELayer(args.d_model, args.d_ff, args.experts, args.top_k,
                    ranks_per_node=args.ranks_per_node, dtype=getattr(torch, args.dtype),
                    device=device)  # fmt: skip


def run_job(worker: Callable[..., dict | None], args: argparse.Namespace, timeout_s: float) -> None:
    """worker(rank, world, args) on every rank; rank 0's result to ``args.out``."""
    world = external_world_size() or args.nproc
    results = launch(
        worker, world, (args,), timeout_s=timeout_s, ranks_per_node=args.ranks_per_node
    )
    if args.out and results[0] is not None:
        with open(args.out, "w") as f:
            json.dump(results[0], f, indent=1)

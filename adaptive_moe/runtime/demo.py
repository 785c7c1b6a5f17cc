"""``adaptive-moe demo``: one MoE layer, every valid strategy, forward + backward, and
proof that they all compute the same function (max difference to the default)."""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from adaptive_moe.core import cli_types as arg
from adaptive_moe.core.sizes import check_fits
from adaptive_moe.runtime.layer import MoELayer


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cpu, cuda or cuda:N")
    return device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--d-model", type=arg.positive_int, default=64)
    parser.add_argument("--d-ff", type=arg.positive_int, default=128)
    parser.add_argument("--experts", type=arg.positive_int, default=8)
    parser.add_argument("--top-k", type=arg.positive_int, default=2)
    parser.add_argument("--tokens", type=arg.count, default=256)
    parser.add_argument(
        "--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu"
    )


def run(args: argparse.Namespace) -> int:
    """``adaptive-moe demo``; 2 with a message for settings this machine cannot run."""
    try:
        return _run(args)
    except ValueError as err:  # a device it lacks, sizes that cannot fit, a bad shape
        print(f"adaptive-moe demo: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    torch.manual_seed(0)
    device = args.device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}: CUDA is not available on this machine "
            "(torch.cuda.is_available() is False); valid here: cpu"
        )
    # x, the reference, y and its gradient: four float32 [tokens, d_model] tensors
    what = f"--tokens {args.tokens} --d-model {args.d_model}"
    check_fits(4 * 4 * args.tokens * args.d_model, device, what)
    layer = MoELayer(args.d_model, args.d_ff, args.experts, args.top_k, device=device)
    x = torch.randn(args.tokens, args.d_model, device=device)
    reference = layer(x, strategy=layer.default_strategy).detach()
    print(
        f"MoELayer d={args.d_model} h={args.d_ff} E={args.experts} k={args.top_k}, "
        f"{args.tokens} tokens on {device}"
    )
    print(f"{'strategy':<28} {'fwd+bwd ms':>10} {'max |y - y_default|':>20}")
    for strategy in layer.strategies():
        xs = x.clone().requires_grad_(True)
        start = time.perf_counter()
        y = layer(xs, strategy=strategy)
        y.square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ms = (time.perf_counter() - start) * 1e3
        diff = (y.detach() - reference).abs().max().item()
        print(f"{strategy!s:<28} {ms:>10.2f} {diff:>20.2e}")
    print(f"balance loss {layer.aux_loss.item():.4f}, z-loss {layer.z_loss.item():.4f}")
    return 0

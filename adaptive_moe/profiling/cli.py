"""``adaptive-moe profile``: the profiler on the command line, under ``torchrun`` or on
``--nproc`` spawned gloo CPU workers (``add_arguments`` / ``run``)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from adaptive_moe.calc.layer_memory import layer_memory
from adaptive_moe.core import cli_types as arg
from adaptive_moe.core.checks import check_ranks_per_node
from adaptive_moe.core.config import (
    ACTIVATIONS,
    ExpertConfig,
    check_capacity_factor,
    check_top_k,
)
from adaptive_moe.core.dtypes import DTYPES, TORCH_DTYPES
from adaptive_moe.core.launch import (
    external_world_size,
    launch,
    launched_externally,
    ranks_on_this_host,
)
from adaptive_moe.core.sizes import PROCESS_BYTES, check_fits
from adaptive_moe.core.strategy import DEGREES, KERNELS, Strategy
from adaptive_moe.profiling.profiler import check_sweep, plan_sweep, profile_layer, summary
from adaptive_moe.profiling.shape_args import shape_fields
from adaptive_moe.runtime.layer import MoELayer
from adaptive_moe.tuning.table import Fingerprint, LayerShape
from adaptive_moe.tuning.workload import BUCKET_MODES, Buckets


@dataclasses.dataclass(frozen=True)
class ProfileSpec:
    """Everything one profiling run needs; built on the launching process, validated
    before any worker starts, and sent to every worker."""

    d_model: int
    d_ff: int
    experts: int
    top_k: int
    glu: bool
    activation: str
    dtype: str | None  # None: float32 on CPU, bfloat16 on CUDA
    capacity_factor: float
    tokens: int | None  # None: 4096 on CUDA, 256 on CPU
    device: str
    ranks_per_node: int | None
    buckets: Buckets
    num_buckets: int
    repeats: int
    warmup: int
    kernels: tuple[str, ...] | None
    max_degree: int | None
    seed: int
    out: str | None

    def __post_init__(self) -> None:
        ExpertConfig(self.d_model, self.d_ff, self.experts, self.glu, self.activation)
        check_top_k(self.top_k, self.experts)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        check_capacity_factor(self.capacity_factor)
        check_sweep(self.tokens, self.num_buckets, self.repeats, self.warmup)
        bad = sorted(set(self.kernels or ()) - set(KERNELS))
        if bad or self.kernels == ():
            raise ValueError(f"kernels must be a non-empty subset of {KERNELS}, got {bad}")
        if self.max_degree is not None and self.max_degree < 1:
            raise ValueError(f"max_degree must be >= 1, got {self.max_degree}")

    def wanted(self, strategy: Strategy) -> bool:
        """Whether the --kernels / --max-degree filters keep ``strategy``."""
        return (self.kernels is None or strategy.kernel in self.kernels) and (
            self.max_degree is None or strategy.degree <= self.max_degree
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``adaptive-moe profile``."""
    shape = parser.add_argument_group("layer shape (flags override --config)")
    shape.add_argument(
        "--config",
        type=arg.input_file,
        help="a transformers config.json to read the "
        "shape from (hidden_size, moe_intermediate_size or intermediate_size, "
        "num_local_experts / num_experts / n_routed_experts, num_experts_per_tok)",
    )
    shape.add_argument("--d-model", type=arg.positive_int, help="d, the model width")
    shape.add_argument("--d-ff", type=arg.positive_int, help="h, the hidden size of one expert")
    shape.add_argument("--experts", type=arg.positive_int, help="E, routed experts")
    shape.add_argument("--top-k", type=arg.positive_int, help="k, experts per token")
    shape.add_argument(
        "--glu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="gated experts (default) or plain FFN",
    )
    shape.add_argument("--activation", choices=ACTIVATIONS, default=None, help="default silu")
    shape.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="default: the config's dtype, else float32 on CPU, bfloat16 on GPU",
    )
    shape.add_argument(
        "--capacity-factor",
        type=arg.capacity_factor,
        default=0.0,
        help="the run's capacity factor; nonzero caps the sweep at the capacity",
    )
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument(
        "--tokens",
        type=arg.count,
        default=None,
        help="tokens per rank (default 4096 on GPU, 256 on CPU)",
    )
    sweep.add_argument("--buckets", type=arg.count, default=6, help="most buckets to measure")
    sweep.add_argument("--bucket-mode", choices=BUCKET_MODES, default="geometric")
    sweep.add_argument("--bucket-ratio", type=float, default=2.0, help="geometric bucket ratio")
    sweep.add_argument("--bucket-window", type=arg.count, default=128, help="linear bucket width")
    sweep.add_argument("--repeats", type=arg.count, default=10, help="timed passes (median kept)")
    sweep.add_argument(
        "--warmup", type=arg.non_negative_count, default=3, help="untimed passes before them"
    )
    sweep.add_argument(
        "--kernels",
        type=arg.comma_list,
        default=None,
        help=f"comma-separated subset of {','.join(KERNELS)}",
    )
    sweep.add_argument(
        "--max-degree",
        type=int,
        choices=DEGREES,
        default=None,
        help="skip pipelining degrees above this",
    )
    sweep.add_argument("--seed", type=arg.seed, default=0)
    launching = parser.add_argument_group("launch")
    launching.add_argument(
        "--nproc",
        type=arg.count,
        default=2,
        help="gloo CPU workers to spawn when not under torchrun (default 2)",
    )
    launching.add_argument(
        "--ranks-per-node",
        type=arg.count,
        default=None,
        help="default: LOCAL_WORLD_SIZE under torchrun, else all ranks",
    )
    launching.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA under an NCCL process group, else CPU",
    )
    launching.add_argument(
        "--timeout",
        type=arg.seconds,
        default=3600.0,
        help="seconds before spawned workers are stopped",
    )
    parser.add_argument(
        "--out",
        type=arg.output_file,
        default=None,
        help="table path (default profiles/<device>-<backend>-<nodes>x"
        "<ranks per node>-<shape>.msgpack)",
    )


def spec_from_args(args: argparse.Namespace) -> ProfileSpec:
    """The validated ``ProfileSpec`` of parsed ``adaptive-moe profile`` flags."""
    found = shape_fields(args, ("activation", "dtype"))
    return ProfileSpec(
        d_model=found["d_model"],
        d_ff=found["d_ff"],
        experts=found["experts"],
        top_k=found["top_k"],
        glu=True if args.glu is None else args.glu,
        activation=found.get("activation", "silu"),
        dtype=found.get("dtype"),
        capacity_factor=args.capacity_factor,
        tokens=args.tokens,
        device=args.device,
        ranks_per_node=args.ranks_per_node,
        buckets=Buckets(args.bucket_mode, args.bucket_ratio, args.bucket_window),
        num_buckets=args.buckets,
        repeats=args.repeats,
        warmup=args.warmup,
        kernels=args.kernels,
        max_degree=args.max_degree,
        seed=args.seed,
        out=None if args.out is None else str(args.out),
    )


def default_path(fingerprint: Fingerprint, shape: LayerShape) -> Path:
    """``profiles/<device>-<backend>-<nodes>x<ranks per node>-<shape>.msgpack``."""
    device = re.sub(r"[^a-z0-9]+", "-", fingerprint.device.lower()).strip("-")
    launch = f"{fingerprint.nodes}x{fingerprint.ranks_per_node}"
    return Path("profiles") / f"{device}-{fingerprint.backend}-{launch}-{shape.label()}.msgpack"


def check_device(device: str, world: int, nccl: bool) -> None:
    """ValueError naming --device and what is valid here, for ``--device cuda`` where
    CUDA cannot run it (``nccl``: the ranks' process group is NCCL's)."""
    if device != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(
            "--device cuda: CUDA is not available on this machine "
            "(torch.cuda.is_available() is False); valid here: auto, cpu"
        )
    if not nccl and world > 1:
        raise ValueError(
            "--device cuda with several ranks needs torchrun (NCCL); the "
            "spawned workers of --nproc run gloo on CPU: pass --nproc 1, or --device auto/cpu"
        )


def _on_gpu(device: str, nccl: bool) -> bool:
    return device == "cuda" or (device == "auto" and nccl)


def _device(spec: ProfileSpec) -> torch.device:
    nccl = dist.get_backend() == "nccl"
    check_device(spec.device, dist.get_world_size(), nccl)
    if not _on_gpu(spec.device, nccl):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _dtype_and_tokens(spec: ProfileSpec, on_gpu: bool) -> tuple[str, int]:
    return spec.dtype or ("bfloat16" if on_gpu else "float32"), spec.tokens or (
        4096 if on_gpu else 256
    )


def check_launch(spec: ProfileSpec, world: int) -> None:
    """What can be refused before a worker starts: ``--device``, ``--ranks-per-node``,
    and a layer whose cheapest strategy (EP, any kernel) cannot fit the device."""
    nccl = launched_externally() and torch.cuda.is_available()  # as ``launch`` chooses
    check_device(spec.device, world, nccl)
    check_ranks_per_node(spec.ranks_per_node, world, "--ranks-per-node")
    on_gpu = _on_gpu(spec.device, nccl)
    dtype, tokens = _dtype_and_tokens(spec, on_gpu)
    shape = {"d_model": spec.d_model, "d_ff": spec.d_ff, "num_experts": spec.experts}
    bytes_ = TORCH_DTYPES[dtype].itemsize
    need = min(  # the weights stay; the peak is what one forward + backward adds
        (m.weights + m.peak)
        for m in (
            layer_memory(**shape, top_k=spec.top_k, glu=spec.glu, dtype_bytes=bytes_,
                         tokens=tokens, world=world, strategy=Strategy(1, kernel=kernel))
            for kernel in KERNELS
        )
    )  # fmt: skip
    what = (
        f"--d-model {spec.d_model} --d-ff {spec.d_ff} --experts {spec.experts} "
        f"--tokens {tokens} ({dtype}) on {world} rank{'s' * (world > 1)}"
    )
    if on_gpu:
        check_fits(need, "cuda", what)
    else:
        check_fits(need + PROCESS_BYTES, "cpu", what, ranks=ranks_on_this_host(world))


def _worker(rank: int, world: int, spec: ProfileSpec) -> str:
    """One rank of the CLI run; rank 0 writes the table and returns the summary."""
    device = _device(spec)
    dtype, tokens = _dtype_and_tokens(spec, device.type == "cuda")
    torch.manual_seed(spec.seed)
    layer = MoELayer(
        spec.d_model,
        spec.d_ff,
        spec.experts,
        spec.top_k,
        glu=spec.glu,
        activation=spec.activation,
        capacity_factor=spec.capacity_factor,
        ranks_per_node=spec.ranks_per_node,
        dtype=TORCH_DTYPES[dtype],
        device=device,
    )
    chosen = [s for s in layer.strategies() if spec.wanted(s)]
    if not chosen:
        raise ValueError(
            f"--kernels/--max-degree leave no strategy of {[str(s) for s in layer.strategies()]}"
        )
    sweep = {
        "buckets": spec.buckets,
        "num_buckets": spec.num_buckets,
        "strategies": chosen,
        "capacity_factor": spec.capacity_factor,
    }
    if rank == 0:
        print(f"measuring {plan_sweep(layer, tokens, **sweep).describe()}", flush=True)
    notes: list[str] = []
    table = profile_layer(
        layer,
        tokens,
        repeats=spec.repeats,
        warmup=spec.warmup,
        seed=spec.seed,
        report=notes.append,
        **sweep,
    )
    if rank != 0:
        return ""
    out = Path(spec.out) if spec.out else default_path(table.fingerprint, table.shape)
    table.save(out)
    fp = table.fingerprint
    runs = sum(len(entry.times_ms) for entry in table.entries.values())
    return (
        f"measured {runs} runs ({len(table.entries)} buckets) on "
        f"{fp.world_size} x {fp.device} ({fp.backend}), {tokens} tokens per rank\n"
        + "".join(f"{note}\n" for note in notes)
        + f"{summary(table, layer.default_strategy)}\nwrote {out}"
    )


def run(args: argparse.Namespace) -> int:
    """``adaptive-moe profile``: sweep, write the table, print the summary."""
    world = external_world_size() or args.nproc  # torchrun decides when it launched us
    try:
        spec = spec_from_args(args)
        check_launch(spec, world)
    except ValueError as err:
        print(f"adaptive-moe profile: error: {err}", file=sys.stderr)
        return 2
    try:
        results = launch(
            _worker, world, args=(spec,), timeout_s=args.timeout, ranks_per_node=spec.ranks_per_node
        )
    except ValueError as err:  # bad settings, found by launch or by the layer
        print(f"adaptive-moe profile: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if launched_externally():  # raised by this very rank: keep its traceback
            raise
        # a spawned rank failed; the message carries its traceback
        print(f"adaptive-moe profile: {err}", file=sys.stderr)
        return 1
    for text in results:
        if text:
            print(text)
    return 0

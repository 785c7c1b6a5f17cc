"""``adaptive-moe plan``: predict a strategy table for a cluster that was not measured.

    adaptive-moe plan --config config.json --world 64 --ranks-per-node 8 \\
        --kernel-profile profiles/kernels-nvidia-h200-bf16.json --links h200-ndr
    adaptive-moe plan --d-model 2048 --d-ff 1024 --experts 64 --top-k 8 --world 256 \\
        --roofline h100 --links h100-ndr --inter-gbps 45 --out predicted.msgpack

Writes the table (``StrategyTable``, ``predicted`` set to the model's inputs), prints
per bucket the predicted best strategy and its margin over the next, and draws the
predicted time of every strategy family against world size (16 ... 2048 by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from adaptive_moe.calc.hf import from_hf_config
from adaptive_moe.calc.model import ModelSpec
from adaptive_moe.calc.presets import PRESETS as MODEL_PRESETS
from adaptive_moe.calc.presets import preset as model_preset
from adaptive_moe.core import cli_types
from adaptive_moe.core.checks import check_ranks_per_node
from adaptive_moe.core.dtype_names import DTYPES
from adaptive_moe.core.fileio import read_json
from adaptive_moe.core.strategy import DEGREES, KERNELS
from adaptive_moe.planning.cost_model import Cluster, LayerSpec, cpu_overlap
from adaptive_moe.planning.kernel_profile import ROOFLINES, ComputeModel, KernelProfile, roofline
from adaptive_moe.planning.links import PRESETS, Link, LinkModel, fit_links, preset
from adaptive_moe.planning.planner import margins, plan_table
from adaptive_moe.planning.plot import best_map, plot_best_map, plot_scaling, scaling_curves
from adaptive_moe.profiling.shape_args import shape_fields, shape_from_config
from adaptive_moe.tuning.workload import BUCKET_MODES, Buckets

if TYPE_CHECKING:
    # planning.calibrate runs collectives (torch): loaded only by --calibrate/--calibration,
    # so that the plain planning path never imports torch.
    from adaptive_moe.planning.calibrate import Calibration

DEFAULT_WORLDS = (16, 32, 64, 128, 256, 512, 1024, 2048)
DEFAULT_MAP_TOKENS = (256, 1024, 4096, 16384)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``adaptive-moe plan``."""
    shape = parser.add_argument_group("layer (flags override --config)")
    shape.add_argument("--config", type=cli_types.input_file, help="a transformers config.json")
    shape.add_argument(
        "--preset",
        choices=sorted(MODEL_PRESETS),
        default=None,
        help="a named model (adaptive-moe calc's presets) instead of --config",
    )
    shape.add_argument(
        "--moe-layers",
        type=int,
        default=None,
        help="MoE layers per step, for the step time (default: the preset's or config's)",
    )
    shape.add_argument("--d-model", type=cli_types.count, help="d, the model width")
    shape.add_argument("--d-ff", type=cli_types.count, help="h, the hidden size of one expert")
    shape.add_argument("--experts", type=cli_types.count, help="E, routed experts")
    shape.add_argument("--top-k", type=cli_types.count, help="k, experts per token")
    shape.add_argument("--glu", action=argparse.BooleanOptionalAction, default=True)
    shape.add_argument("--bias", action="store_true", help="experts have biases")
    shape.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="default: the kernel profile's, else the config's, else bfloat16",
    )
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument(
        "--world", type=cli_types.count, required=True, help="W, ranks in the expert group"
    )
    cluster.add_argument(
        "--ranks-per-node",
        type=cli_types.count,
        default=None,
        help="m (default 8, or W when W < 8)",
    )
    cluster.add_argument(
        "--links",
        choices=sorted(PRESETS),
        default="h100-ndr",
        help="published link figures to start from (README: Scale planner)",
    )
    cluster.add_argument(
        "--links-file",
        type=cli_types.input_file,
        nargs="+",
        default=None,
        help="benchmarks/alltoall.py --out JSON file(s) to fit the links to",
    )
    cluster.add_argument(
        "--links-one-level",
        action="store_true",
        help="--links-file runs share one physical link (gloo ranks of one host with "
        "simulated nodes): fit one link to their linear and 2DH rows",
    )
    for level in ("intra", "inter"):
        cluster.add_argument(
            f"--{level}-alpha-us",
            type=float,
            default=None,
            help=f"per-message latency of the {level}-node link",
        )
        cluster.add_argument(
            f"--{level}-gbps",
            type=float,
            default=None,
            help=f"per-direction GB/s of the {level}-node link, per rank",
        )
    cluster.add_argument("--call-us", type=float, default=None, help="cost of one collective call")
    cluster.add_argument("--copy-gbps", type=float, default=None, help="device memory GB/s")
    cluster.add_argument(
        "--overlap",
        type=float,
        default=None,
        help="share of what pipelining could hide that it does hide (default 1: GPUs; "
        "with a gloo --calibration, what the calibrated host's cores leave: "
        "cost_model.cpu_overlap)",
    )
    compute = parser.add_argument_group("compute (one of)")
    compute.add_argument(
        "--kernel-profile",
        type=cli_types.input_file,
        default=None,
        help="a kernel profile JSON of one device (benchmarks/plan_validation.py "
        "or adaptive_moe.planning.measure_kernel_profile)",
    )
    compute.add_argument(
        "--roofline",
        choices=sorted(ROOFLINES),
        default=None,
        help="published peak figures instead of a measured profile",
    )
    calib = parser.add_argument_group("calibration (measure once, then plan with it)")
    calib.add_argument(
        "--calibrate",
        type=cli_types.output_file,
        default=None,
        metavar="FILE",
        help="measure the all-to-all and the expert kernels on --world ranks of this launch "
        "(spawned gloo CPU ranks, or torchrun's) for the layer, write FILE and stop",
    )
    calib.add_argument(
        "--calibrate-repeats",
        type=cli_types.count,
        default=5,
        help="timed repeats per measured point",
    )
    calib.add_argument(
        "--calibration",
        type=cli_types.input_file,
        default=None,
        metavar="FILE",
        help="a --calibrate FILE: its fitted links and kernel profile replace --links and "
        "--kernel-profile / --roofline",
    )
    sweep = parser.add_argument_group("workloads")
    sweep.add_argument(
        "--tokens", type=cli_types.count, default=4096, help="tokens per rank (default 4096)"
    )
    sweep.add_argument("--buckets", type=cli_types.count, default=6, help="most buckets to predict")
    sweep.add_argument("--bucket-mode", choices=BUCKET_MODES, default="geometric")
    sweep.add_argument("--bucket-ratio", type=float, default=2.0)
    sweep.add_argument("--bucket-window", type=cli_types.count, default=128)
    sweep.add_argument("--capacity-factor", type=cli_types.capacity_factor, default=0.0)
    sweep.add_argument(
        "--kernels",
        type=lambda v: tuple(v.split(",")),
        default=None,
        help=f"comma-separated subset of {','.join(KERNELS)}",
    )
    sweep.add_argument("--max-degree", type=int, choices=DEGREES, default=None)
    sweep.add_argument("--backend", default=None, help="fingerprint backend (default nccl on GPU)")
    sweep.add_argument(
        "--torch-version",
        default=None,
        help="fingerprint torch major.minor (default: the kernel profile's, else this torch)",
    )
    sweep.add_argument(
        "--measure-host",
        action="store_true",
        help="add the executor's per-forward host planning (build_plan, plan_exchange), "
        "timed on this machine for the target world (not in the plot's sweep)",
    )
    sweep.add_argument(
        "--max-memory-gb",
        type=cli_types.gib,
        default=None,
        help="refuse a plan estimated to need more (default: half of this machine's memory)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out",
        type=cli_types.output_file,
        default=None,
        help="table path (default profiles/predicted/<device>-<backend>-<nodes>x"
        "<ranks per node>-<shape>.msgpack)",
    )
    out.add_argument(
        "--plot", type=cli_types.output_file, default=None, help="PNG (default: --out with .png)"
    )
    out.add_argument("--no-plot", action="store_true", help="skip the world-size sweep")
    out.add_argument(
        "--map",
        type=cli_types.output_file,
        default=None,
        help="PNG of the best strategy over (--plot-worlds, --map-tokens)",
    )
    out.add_argument(
        "--map-tokens",
        type=cli_types.count_list,
        default=DEFAULT_MAP_TOKENS,
        help="tokens per rank of the --map (default 256,1024,4096,16384)",
    )
    out.add_argument(
        "--plot-worlds",
        type=cli_types.count_list,
        default=DEFAULT_WORLDS,
        help="world sizes of the plot (default 16,32,...,2048)",
    )


def _model(args: argparse.Namespace) -> ModelSpec | None:
    """The whole model of ``--preset`` or ``--config`` (None for flags alone, or a
    config ``adaptive-moe calc`` cannot read: its layer shape still comes from
    ``shape_from_config``)."""
    if args.preset is not None:
        if args.config is not None:
            raise ValueError("give at most one of --preset and --config")
        return model_preset(args.preset)
    if args.config is None:
        return None
    try:
        return from_hf_config(read_json(args.config, "--config"))
    except (ValueError, OSError, json.JSONDecodeError):
        return None


def _preset_shape(model: ModelSpec) -> dict[str, int]:
    return {
        "d_model": model.hidden,
        "d_ff": model.moe_ffn or model.ffn,
        "experts": model.num_experts,
        "top_k": model.top_k,
    }


def _layer(args: argparse.Namespace, compute_dtype: str | None) -> LayerSpec:
    if args.preset is not None:
        found = _preset_shape(model_preset(args.preset))
        for field in found:
            if getattr(args, field) is not None:
                found[field] = getattr(args, field)
    else:
        found = shape_fields(args)
    dtype = args.dtype or compute_dtype or found.get("dtype") or "bfloat16"
    return LayerSpec(
        found["d_model"],
        found["d_ff"],
        found["experts"],
        found["top_k"],
        glu=args.glu,
        bias=args.bias,
        dtype=dtype,
    )


def links_from_args(args: argparse.Namespace, calibration: Calibration | None = None) -> LinkModel:
    """The preset, fitted or calibrated links with any per-figure flag applied on top."""
    if calibration is not None:
        if args.links_file:
            raise ValueError("give at most one of --calibration and --links-file")
        links = calibration.links(args.copy_gbps)
    elif args.links_file:
        links = fit_links(args.links_file, one_level=args.links_one_level)
    else:
        links = preset(args.links)
    changed = []
    for level in ("intra", "inter"):
        link: Link = getattr(links, level)
        alpha, gbps = getattr(args, f"{level}_alpha_us"), getattr(args, f"{level}_gbps")
        if alpha is not None or gbps is not None:
            link = Link(
                link.alpha_us if alpha is None else alpha,
                link.bandwidth_GBps if gbps is None else gbps,
                link.issue_us,
            )
            links = dataclasses.replace(links, **{level: link})
            changed.append(level)
    if args.call_us is not None:
        links = dataclasses.replace(links, call_us=args.call_us)
        changed.append("call")
    if args.copy_gbps is not None:
        links = dataclasses.replace(links, copy_GBps=args.copy_gbps)
        changed.append("copy")
    if changed:
        links = dataclasses.replace(links, name=f"{links.name}+flags({','.join(changed)})")
    return links


def _compute(
    args: argparse.Namespace, d_model_hint: int | None, calibration: Calibration | None
) -> ComputeModel:
    if calibration is not None:
        if args.kernel_profile is not None or args.roofline is not None:
            raise ValueError(
                "--calibration brings its kernel profile: drop --kernel-profile/--roofline"
            )
        return calibration.profile
    if (args.kernel_profile is None) == (args.roofline is None):
        raise ValueError("give exactly one of --kernel-profile FILE and --roofline DEVICE")
    if args.kernel_profile is not None:
        return KernelProfile.load(args.kernel_profile, "--kernel-profile")
    if d_model_hint is None:
        raise ValueError("--roofline needs the layer's d_model (--d-model or --config)")
    return roofline(args.roofline, d_model_hint, args.glu, args.dtype or "bfloat16")


def default_path(device: str, backend: str, world: int, m: int, label: str) -> Path:
    dev = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return Path("profiles") / "predicted" / f"{dev}-{backend}-{world // m}x{m}-{label}.msgpack"


def run(args: argparse.Namespace) -> int:
    """``adaptive-moe plan``: predict, write the table and the plot, print the margins."""
    if args.calibrate is not None:
        return _calibrate(args)
    try:
        calibration = None
        if args.calibration:
            from adaptive_moe.planning.calibrate import Calibration

            calibration = Calibration.load(args.calibration, "--calibration")
        model = _model(args)
        hint = args.d_model
        if hint is None and args.preset:
            hint = model_preset(args.preset).hidden
        if hint is None and args.config:
            hint = shape_from_config(args.config).get("d_model")
        compute = _compute(args, hint, calibration)
        layer = _layer(args, compute.dtype)
        if isinstance(compute, KernelProfile):
            _check_profile(compute, layer)
        links = links_from_args(args, calibration)
        m = _ranks_per_node(args)
        overlap = args.overlap
        if overlap is None:
            overlap = _calibrated_overlap(calibration) if calibration is not None else 1.0
        cluster = Cluster(args.world, m, links, overlap=overlap)
        buckets = Buckets(args.bucket_mode, args.bucket_ratio, args.bucket_window)
        backend = args.backend or ("gloo" if compute.device == "cpu" else "nccl")
        if backend in ("nccl", "gloo"):  # gloo's reduce-scatter costs an all-reduce
            cluster = dataclasses.replace(cluster, backend=backend)
        table = plan_table(
            layer,
            cluster,
            compute,
            args.tokens,
            buckets=buckets,
            num_buckets=args.buckets,
            capacity_factor=args.capacity_factor,
            kernels=args.kernels,
            max_degree=args.max_degree,
            backend=args.backend,
            torch_version=args.torch_version,
            measure_host=args.measure_host,
            max_bytes=None if args.max_memory_gb is None else int(args.max_memory_gb * 2**30),
        )
    except ValueError as err:
        print(f"adaptive-moe plan: error: {err}", file=sys.stderr)
        return 2
    fp = table.fingerprint
    out = args.out or default_path(
        fp.device, fp.backend, fp.world_size, fp.ranks_per_node, table.shape.label()
    )
    table.save(out)
    n = len(next(iter(table.entries.values())).times_ms) if table.entries else 0
    print(
        f"predicted {n} strategies x {len(table.entries)} buckets for {fp.world_size} x "
        f"{fp.device} ({fp.nodes} nodes of {fp.ranks_per_node}), {args.tokens} tokens per "
        f"rank; links {links.name}, compute {compute.describe()['kind']}"
    )
    moe_layers = args.moe_layers or (model.moe_layers if model is not None else None)
    if moe_layers:
        print(f"MoE/step: the {moe_layers} MoE layers' forward + backward per step")
    print(margins(table, moe_layers))
    print(f"wrote {out}")
    cluster_of = lambda w: dataclasses.replace(cluster, world=w, ranks_per_node=min(m, w))
    if args.map is not None:
        grid, _ = best_map(
            layer,
            cluster_of,
            compute,
            args.plot_worlds,
            args.map_tokens,
            args.kernels,
            args.max_degree,
        )
        if not grid:
            print("adaptive-moe plan: error: no --plot-worlds size fits the layer", file=sys.stderr)
            return 2
        shape = f"d{layer.d_model} h{layer.d_ff} E{layer.num_experts} k{layer.top_k} {layer.dtype}"
        plot_best_map(grid, args.map, f"{shape}, m={m}, {links.name}, {compute.device}")
        print(f"wrote {args.map} (best strategy over world size x tokens per rank)")
    if not args.no_plot:
        curves, skipped = scaling_curves(
            layer,
            cluster_of,
            compute,
            args.plot_worlds,
            args.tokens,
            args.kernels,
            args.max_degree,
        )
        if skipped:
            print(
                f"plot: left out world sizes {skipped} (E={layer.num_experts} or m={m} "
                "does not fit them)"
            )
        if not curves:
            print("adaptive-moe plan: error: no --plot-worlds size fits the layer", file=sys.stderr)
            return 2
        png = args.plot or Path(out).with_suffix(".png")
        title = (
            f"{table.shape.label()}, {args.tokens} tokens/rank, {links.name}, "
            f"{compute.device} ({compute.describe()['kind']})"
        )
        plot_scaling(curves, png, title)
        best = curves["best"]
        print(
            "predicted best per world size: "
            + ", ".join(f"{w}: {best[w][0]} {best[w][1]:.2f} ms" for w in sorted(best))
        )
        print(f"wrote {png}")
    return 0


def _ranks_per_node(args: argparse.Namespace) -> int:
    """m: ``--ranks-per-node``, which must divide ``--world``; default 8, or W when W < 8."""
    if args.ranks_per_node is None:
        return min(8, args.world)
    check_ranks_per_node(args.ranks_per_node, args.world, "--ranks-per-node")
    return args.ranks_per_node


def _calibrated_overlap(calibration: Calibration) -> float:
    """GPUs overlap fully; gloo ranks only with the cores their host has spare."""
    meta = calibration.meta
    if meta["backend"] != "gloo":
        return 1.0
    return cpu_overlap(meta["world"], meta.get("cores") or 1)


def _calibrate(args: argparse.Namespace) -> int:
    """``--calibrate FILE``: measure on this launch, write FILE."""
    from adaptive_moe.planning.calibrate import CalibrationSpec, calibrate

    try:
        layer = _layer(args, None)
        m = _ranks_per_node(args)
        spec = CalibrationSpec(
            layer.d_model,
            layer.d_ff,
            layer.num_experts,
            m,
            glu=layer.glu,
            dtype=args.dtype,
            kernels=args.kernels,
            repeats=args.calibrate_repeats,
        )
        result = calibrate(args.world, spec)
    except ValueError as err:
        print(f"adaptive-moe plan: error: {err}", file=sys.stderr)
        return 2
    if result is None:  # a torchrun rank other than 0
        return 0
    result.save(args.calibrate)
    links = result.links(args.copy_gbps)
    print(
        f"calibrated on {result.meta['world']} x {result.meta['device']} "
        f"({result.meta['backend']}, {result.meta['ranks_per_node']} per node) in "
        f"{result.meta['seconds']} s: call {links.call_us:.1f} us, intra "
        f"{links.intra.alpha_us:.1f} us + {links.intra.bandwidth_GBps:.3g} GB/s, inter "
        f"{links.inter.alpha_us:.1f} us + {links.inter.bandwidth_GBps:.3g} GB/s, ring step "
        f"{'= alpha' if links.step_us is None else f'{links.step_us:.1f} us'}; kernels "
        f"{', '.join(result.profile.kernels)}"
    )
    print(f"wrote {args.calibrate} (plan with --calibration {args.calibrate})")
    return 0


def _check_profile(profile: KernelProfile, layer: LayerSpec) -> None:
    if profile.d_model != layer.d_model or profile.glu != layer.glu:
        raise ValueError(
            f"--kernel-profile was measured for d_model={profile.d_model}, glu={profile.glu}; "
            f"the layer has d_model={layer.d_model}, glu={layer.glu} (measure one for it)"
        )
    if profile.dtype != layer.dtype:
        raise ValueError(
            f"--kernel-profile was measured in {profile.dtype}, the layer is {layer.dtype}"
        )

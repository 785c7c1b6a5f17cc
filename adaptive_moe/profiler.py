"""The offline profiler: time every strategy per workload bucket into a ``StrategyTable``.

For each bucket the sweep builds a synthetic routing whose busiest expert receives
exactly the bucket's workload (``synthetic_routing``), then runs forward+backward of
every valid strategy on it: ``warmup`` untimed passes, ``repeats`` timed ones (CUDA
events on GPU, ``perf_counter`` after a barrier on CPU), the median per rank, and the
maximum of the ranks' medians (one all-reduce) so that every rank stores the same
number. The fastest strategy is the bucket's best.

    x          [T, d]      this rank's synthetic tokens (requires grad, as in training)
    topk_ids   [T, k]      this rank's slice of the global synthetic routing
    weights    [T, k]      fp32 gate weights, positive, summing to 1 per token
    dy         [T, d]      the gradient fed to backward

Python API: ``profile_layer(layer, tokens)`` (every rank of the layer's group calls it).
CLI: ``adaptive-moe profile`` (``add_arguments`` / ``run``), under ``torchrun`` or
spawning ``--nproc`` gloo CPU workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import re
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from adaptive_moe.calc.layer_memory import layer_memory
from adaptive_moe.config import ACTIVATIONS, ExpertConfig, check_top_k
from adaptive_moe.launch import external_world_size, launch, launched_externally
from adaptive_moe.strategy import DEGREES, KERNELS, Strategy
from adaptive_moe.table import DTYPES, Fingerprint, LayerShape, Measurement, StrategyTable
from adaptive_moe.workload import BUCKET_MODES, Buckets

if TYPE_CHECKING:
    from adaptive_moe.layer import MoELayer

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Share of the free device memory a strategy's estimated peak may take (the rest is
# left for the allocator's fragmentation and for what the calculator's model misses).
_MEMORY_MARGIN = 0.8


# ---- workloads ----------------------------------------------------------------------------


def workload_range(
    tokens: int, world: int, num_experts: int, top_k: int, capacity_factor: float = 0.0
) -> tuple[int, int]:
    """(balanced, extreme) ``max_tokens`` of a forward with ``tokens`` per rank: every
    expert equally loaded, and every token of the group choosing the same expert (capped
    by the capacity when ``capacity_factor != 0``)."""
    lo = math.ceil(tokens * world * top_k / num_experts)
    hi = tokens * world
    if capacity_factor:
        per_rank = top_k * math.ceil(abs(capacity_factor) * math.ceil(tokens / num_experts))
        hi = min(hi, world * per_rank)
    return lo, max(lo, hi)


def sweep_keys(buckets: Buckets, lo: int, hi: int, count: int) -> list[tuple[int, int]]:
    """Up to ``count`` (key, max_tokens) pairs spread evenly over the keys from
    ``key(lo)`` to ``key(hi)``, both ends included; max_tokens is the bucket's
    representative clipped to [lo, hi] (so it stays inside its bucket)."""
    first, last = buckets.key(lo), buckets.key(hi)
    n = min(count, last - first + 1)
    keys = sorted({first + round(i * (last - first) / max(1, n - 1)) for i in range(n)})
    out = []
    for key in keys:
        try:
            target = buckets.representative(key)
        except ValueError:  # a geometric bucket with no integer in it: nothing to measure
            continue
        out.append((key, min(max(target, lo), hi)))
    return out


def synthetic_routing(
    tokens: int, world: int, num_experts: int, top_k: int, max_tokens: int, seed: int
) -> torch.Tensor:
    """Global routing [W, T, k] (int64) in which one "hot" expert receives exactly
    ``max_tokens`` rows and the others share the rest as evenly as possible; no token
    picks an expert twice. Deterministic in ``seed``: every rank builds the same tensor
    and keeps its own slice ``[rank]``.

    Construction: the W*T*k choices, sorted by expert, are laid out column by column in
    a [W*T, k] matrix. An expert's run of at most W*T consecutive positions then falls
    on distinct rows, so no row repeats an expert. Rows, slots and expert ids are then
    shuffled."""
    n_tok = tokens * world
    lo, hi = workload_range(tokens, world, num_experts, top_k)
    if not lo <= max_tokens <= hi:
        raise ValueError(
            f"max_tokens must be in [{lo}, {hi}] for T={tokens}, W={world}, "
            f"E={num_experts}, k={top_k}; got {max_tokens}"
        )
    gen = torch.Generator().manual_seed(seed)
    rest, others = n_tok * top_k - max_tokens, num_experts - 1
    counts = torch.full((num_experts,), rest // max(1, others), dtype=torch.int64)
    counts[0] = max_tokens
    counts[1 : 1 + rest % max(1, others)] += 1  # [E], counts[0] is the hot expert
    order = torch.repeat_interleave(torch.arange(num_experts), counts)  # [W*T*k]
    ids = order.view(top_k, n_tok).t()  # [W*T, k], column-major fill
    ids = ids[torch.randperm(n_tok, generator=gen)]
    slot_perm = torch.rand(n_tok, top_k, generator=gen).argsort(dim=1)
    ids = ids.gather(1, slot_perm)
    relabel = torch.randperm(num_experts, generator=gen)
    return relabel[ids].view(world, tokens, top_k).contiguous()


# ---- measuring ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Batch:
    x: torch.Tensor  # [T, d], requires grad
    topk_ids: torch.Tensor  # [T, k]
    weights: torch.Tensor  # [T, k] fp32
    dy: torch.Tensor  # [T, d]


def _make_batch(
    layer: MoELayer, rank: int, world: int, tokens: int, max_tokens: int, seed: int
) -> _Batch:
    shape = layer.layer_shape()
    device, dtype = layer.experts.down_proj.device, _TORCH_DTYPES[shape.dtype]
    ids = synthetic_routing(tokens, world, shape.num_experts, shape.top_k, max_tokens, seed)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    weights = torch.rand(tokens, shape.top_k, generator=gen) + 0.1  # [T, k]
    x = torch.randn(tokens, shape.d_model, generator=gen)  # [T, d]
    dy = torch.randn(tokens, shape.d_model, generator=gen)  # [T, d]
    return _Batch(
        x=x.to(device, dtype).requires_grad_(True),
        topk_ids=ids[rank].to(device),
        weights=(weights / weights.sum(1, keepdim=True)).to(device),
        dy=dy.to(device, dtype),
    )


def _sync(layer: MoELayer) -> None:
    """Finish this rank's queued device work and line the ranks up."""
    device = layer.experts.down_proj.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if layer.mesh is not None and layer.mesh.world > 1:
        # A one-element all-reduce on the layer's device works for gloo and NCCL alike.
        dist.all_reduce(torch.zeros(1, device=device), group=layer.mesh.group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _one_pass(layer: MoELayer, batch: _Batch, strategy: Strategy) -> None:
    layer.zero_grad(set_to_none=True)
    batch.x.grad = None
    y = layer.forward_routed(batch.x, batch.topk_ids, batch.weights, strategy)  # [T, d]
    y.backward(batch.dy)


def _median_ms(
    layer: MoELayer, batch: _Batch, strategy: Strategy, warmup: int, repeats: int
) -> float:
    """This rank's median forward+backward time of ``strategy`` in ms."""
    on_gpu = layer.experts.down_proj.device.type == "cuda"
    for _ in range(warmup):
        _one_pass(layer, batch, strategy)
    times = []
    for _ in range(repeats):
        _sync(layer)
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _one_pass(layer, batch, strategy)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            _one_pass(layer, batch, strategy)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _group_reduce(layer: MoELayer, values: list[float], op: dist.ReduceOp) -> list[float]:
    """Element-wise reduction of ``values`` over the layer's group (identity alone)."""
    if layer.mesh is None or layer.mesh.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=layer.experts.down_proj.device)
    dist.all_reduce(t, op=op, group=layer.mesh.group)
    return t.tolist()


def _fits(layer: MoELayer, tokens: int, skew: float, strategy: Strategy) -> bool:
    """Whether the calculator expects ``strategy`` to fit in this rank's free device
    memory when the busiest expert gets ``skew`` times its balanced load (CPU memory is
    not checked)."""
    device = layer.experts.down_proj.device
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    # blocks the caching allocator holds but does not use are free for our purpose
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    shape = layer.layer_shape()
    need = layer_memory(
        d_model=shape.d_model,
        d_ff=shape.d_ff,
        num_experts=shape.num_experts,
        top_k=shape.top_k,
        glu=shape.glu,
        dtype_bytes=_TORCH_DTYPES[shape.dtype].itemsize,
        tokens=tokens,
        world=layer.layout.world,
        strategy=strategy,
        capacity_factor=max(1.0, skew),
    ).peak
    return need <= _MEMORY_MARGIN * free


def profile_layer(
    layer: MoELayer,
    tokens: int,
    *,
    buckets: Buckets | None = None,
    num_buckets: int = 6,
    repeats: int = 10,
    warmup: int = 3,
    strategies: Sequence[Strategy] | None = None,
    capacity_factor: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> StrategyTable:
    """Measure every strategy of ``layer`` on synthetic routing and return the table.

    Collective: every rank of the layer's group calls it with the same arguments and
    gets the same table. The sweep covers up to ``num_buckets`` buckets from a balanced
    routing of ``tokens`` tokens per rank up to every token choosing one expert.

    Args:
        layer: the MoE layer (its weights are used, its gradients are cleared).
        tokens: T, tokens per rank of the synthetic batch.
        buckets: bucketing of the table (default ``Buckets()``: geometric, ratio 2).
        num_buckets: most buckets to measure.
        repeats, warmup: timed and untimed passes per strategy.
        strategies: a subset of ``layer.strategies()`` to measure (default all).
        capacity_factor: the run's capacity factor; a nonzero one caps the sweep at the
            capacity, which no workload can exceed.
        seed: of the synthetic routing and tokens.
        progress: show a progress bar on rank 0 (stderr).
    """
    _check_sweep(tokens, num_buckets, repeats, warmup)
    candidates = _candidates(layer, strategies)
    buckets = buckets or Buckets()
    shape, world = layer.layer_shape(), layer.layout.world
    lo, hi = workload_range(tokens, world, shape.num_experts, shape.top_k, capacity_factor)
    sweep = sweep_keys(buckets, lo, hi, num_buckets)
    balanced = tokens * world * shape.top_k / shape.num_experts
    timer = "cuda-events" if layer.experts.down_proj.device.type == "cuda" else "perf_counter"
    table = StrategyTable(layer.fingerprint(), shape, buckets)
    bar = tqdm(
        total=len(sweep) * len(candidates),
        unit="run",
        desc="profile",
        disable=not progress or layer.layout.rank != 0,
        dynamic_ncols=True,
    )
    with bar:
        for key, max_tokens in sweep:
            batch = _make_batch(layer, layer.layout.rank, world, tokens, max_tokens, seed + key)
            bar.set_description(f"bucket {key} ({max_tokens} rows)")
            times, stamp = _measure_bucket(
                layer, batch, candidates, max_tokens / balanced, warmup, repeats, bar
            )
            if not times:
                warnings.warn(f"bucket {key}: no strategy fits in device memory", stacklevel=2)
                continue
            date = datetime.datetime.fromtimestamp(stamp, datetime.UTC)
            how = Measurement(
                repeats,
                warmup,
                timer,
                tokens,
                max_tokens,
                max_tokens / balanced,
                date.isoformat(timespec="seconds"),
            )
            table.add_bucket(key, times, how)
    layer.zero_grad(set_to_none=True)
    layer.reset_stats()  # the measurement runs are not the user's
    return table


def _measure_bucket(
    layer: MoELayer,
    batch: _Batch,
    candidates: list[Strategy],
    skew: float,
    warmup: int,
    repeats: int,
    bar: tqdm,
) -> tuple[dict[Strategy, float], float]:
    """Group-wide median ms of every candidate that fits on all ranks, and a timestamp
    (the same on every rank)."""
    tokens = batch.x.shape[0]
    fits = _group_reduce(
        layer, [float(_fits(layer, tokens, skew, s)) for s in candidates], dist.ReduceOp.MIN
    )
    medians = []
    for strategy, ok in zip(candidates, fits):
        bar.set_postfix_str(str(strategy))
        medians.append(_median_ms(layer, batch, strategy, warmup, repeats) if ok else 0.0)
        bar.update()
    # The slowest rank's median is the time of the step; the timestamp rides along.
    reduced = _group_reduce(layer, [*medians, time.time()], dist.ReduceOp.MAX)
    return {s: ms for s, ms, ok in zip(candidates, reduced, fits) if ok}, reduced[-1]


def _check_sweep(tokens: int | None, num_buckets: int, repeats: int, warmup: int) -> None:
    """ValueError naming the first bad sweep setting (``tokens`` None: chosen later)."""
    for name, value, least in (
        ("tokens", tokens, 1),
        ("num_buckets", num_buckets, 1),
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
    ):
        if value is None and name == "tokens":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _candidates(layer: MoELayer, strategies: Sequence[Strategy] | None) -> list[Strategy]:
    valid = layer.strategies()
    if strategies is None:
        return valid
    invalid = [s for s in strategies if s not in valid]
    if invalid or not strategies:
        raise ValueError(
            f"strategies must be a non-empty subset of layer.strategies() "
            f"{[str(s) for s in valid]}; got invalid {[str(s) for s in invalid]}"
        )
    return list(dict.fromkeys(strategies))


def summary(table: StrategyTable, default: Strategy) -> str:
    """One line per bucket: best strategy, its time, the default's time, the speed-up."""
    head = (
        f"{'bucket':>6} {'max rows':>9} {'skew':>6}  {'best strategy':<24} "
        f"{'best ms':>9} {'default ms':>10} {'speed-up':>8}"
    )
    lines = [head]
    for key, entry in sorted(table.entries.items()):
        best_ms = entry.times_ms[entry.best]
        default_ms = entry.times_ms.get(default)
        ref = f"{default_ms:10.3f}" if default_ms else f"{'-':>10}"
        speedup = f"{default_ms / best_ms:7.2f}x" if default_ms else f"{'-':>8}"
        lines.append(
            f"{key:>6} {entry.how.max_tokens:>9} {entry.how.skew:>5.1f}x  "
            f"{entry.best!s:<24} {best_ms:9.3f} {ref} {speedup}"
        )
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------

# transformers config.json keys, in order of preference, for each shape field.
_CONFIG_KEYS = {
    "d_model": ("hidden_size",),
    "d_ff": ("moe_intermediate_size", "intermediate_size"),
    "experts": ("num_local_experts", "num_experts", "n_routed_experts"),
    "top_k": ("num_experts_per_tok",),
}


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
        if not math.isfinite(self.capacity_factor):
            raise ValueError(f"capacity_factor must be finite, got {self.capacity_factor!r}")
        _check_sweep(self.tokens, self.num_buckets, self.repeats, self.warmup)
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
        type=Path,
        help="a transformers config.json to read the "
        "shape from (hidden_size, moe_intermediate_size or intermediate_size, "
        "num_local_experts / num_experts / n_routed_experts, num_experts_per_tok)",
    )
    shape.add_argument("--d-model", type=int, help="d, the model width")
    shape.add_argument("--d-ff", type=int, help="h, the hidden size of one expert")
    shape.add_argument("--experts", type=int, help="E, routed experts")
    shape.add_argument("--top-k", type=int, help="k, experts per token")
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
        type=float,
        default=0.0,
        help="the run's capacity factor; nonzero caps the sweep at the capacity",
    )
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument(
        "--tokens", type=int, default=None, help="tokens per rank (default 4096 on GPU, 256 on CPU)"
    )
    sweep.add_argument("--buckets", type=int, default=6, help="most buckets to measure")
    sweep.add_argument("--bucket-mode", choices=BUCKET_MODES, default="geometric")
    sweep.add_argument("--bucket-ratio", type=float, default=2.0, help="geometric bucket ratio")
    sweep.add_argument("--bucket-window", type=int, default=128, help="linear bucket width")
    sweep.add_argument("--repeats", type=int, default=10, help="timed passes (median kept)")
    sweep.add_argument("--warmup", type=int, default=3, help="untimed passes before them")
    sweep.add_argument(
        "--kernels",
        type=lambda v: tuple(v.split(",")),
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
    sweep.add_argument("--seed", type=int, default=0)
    launching = parser.add_argument_group("launch")
    launching.add_argument(
        "--nproc",
        type=int,
        default=2,
        help="gloo CPU workers to spawn when not under torchrun (default 2)",
    )
    launching.add_argument(
        "--ranks-per-node",
        type=int,
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
        "--timeout", type=float, default=3600.0, help="seconds before spawned workers are stopped"
    )
    parser.add_argument(
        "--out",
        type=str,
        default=None,
        help="table path (default profiles/<device>-<backend>-<nodes>x"
        "<ranks per node>-<shape>.msgpack)",
    )


def _from_config(path: Path) -> dict[str, Any]:
    """Shape fields found in a transformers config.json."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--config {path}: cannot read a JSON config ({err})") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"--config {path}: expected a JSON object")
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    found: dict[str, Any] = {}
    for field, keys in _CONFIG_KEYS.items():
        value = next((cfg[k] for k in keys if type(cfg.get(k)) is int), None)
        if value is not None:
            found[field] = value
    if cfg.get("hidden_act") in ACTIVATIONS:
        found["activation"] = cfg["hidden_act"]
    dtype = cfg.get("dtype", cfg.get("torch_dtype"))
    if dtype in DTYPES:
        found["dtype"] = dtype
    return found


def spec_from_args(args: argparse.Namespace) -> ProfileSpec:
    """The validated ``ProfileSpec`` of parsed ``adaptive-moe profile`` flags."""
    found = _from_config(args.config) if args.config else {}
    for field in ("d_model", "d_ff", "experts", "top_k", "activation", "dtype"):
        if getattr(args, field) is not None:
            found[field] = getattr(args, field)
    missing = [f for f in ("d_model", "d_ff", "experts", "top_k") if f not in found]
    if missing:
        flags = ", ".join("--" + f.replace("_", "-") for f in missing)
        raise ValueError(f"the layer shape needs {flags} (or a --config that has them)")
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
        out=args.out,
    )


def default_path(fingerprint: Fingerprint, shape: LayerShape) -> Path:
    """``profiles/<device>-<backend>-<nodes>x<ranks per node>-<shape>.msgpack``."""
    device = re.sub(r"[^a-z0-9]+", "-", fingerprint.device.lower()).strip("-")
    launch = f"{fingerprint.nodes}x{fingerprint.ranks_per_node}"
    return Path("profiles") / f"{device}-{fingerprint.backend}-{launch}-{shape.label()}.msgpack"


def _device(spec: ProfileSpec) -> torch.device:
    nccl = dist.get_backend() == "nccl"
    if spec.device == "cpu" or (spec.device == "auto" and not nccl):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available")
    if not nccl and dist.get_world_size() > 1:
        raise ValueError(
            "--device cuda with several ranks needs torchrun (NCCL); the "
            "spawned workers of --nproc run gloo on CPU"
        )
    return torch.device("cuda", torch.cuda.current_device())


def _worker(rank: int, world: int, spec: ProfileSpec) -> str:
    """One rank of the CLI run; rank 0 writes the table and returns the summary."""
    from adaptive_moe.layer import MoELayer  # the CLI half sits above the layer

    device = _device(spec)
    on_gpu = device.type == "cuda"
    dtype = spec.dtype or ("bfloat16" if on_gpu else "float32")
    tokens = spec.tokens or (4096 if on_gpu else 256)
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
        dtype=_TORCH_DTYPES[dtype],
        device=device,
    )
    chosen = [s for s in layer.strategies() if spec.wanted(s)]
    if not chosen:
        raise ValueError(
            f"--kernels/--max-degree leave no strategy of {[str(s) for s in layer.strategies()]}"
        )
    table = profile_layer(
        layer,
        tokens,
        buckets=spec.buckets,
        num_buckets=spec.num_buckets,
        repeats=spec.repeats,
        warmup=spec.warmup,
        strategies=chosen,
        capacity_factor=spec.capacity_factor,
        seed=spec.seed,
    )
    if rank != 0:
        return ""
    out = Path(spec.out) if spec.out else default_path(table.fingerprint, table.shape)
    table.save(out)
    fp = table.fingerprint
    return (
        f"measured {len(chosen)} strategies x {len(table.entries)} buckets on "
        f"{fp.world_size} x {fp.device} ({fp.backend}), {tokens} tokens per rank\n"
        f"{summary(table, layer.default_strategy)}\nwrote {out}"
    )


def run(args: argparse.Namespace) -> int:
    """``adaptive-moe profile``: sweep, write the table, print the summary."""
    try:
        spec = spec_from_args(args)
    except ValueError as err:
        print(f"adaptive-moe profile: error: {err}", file=sys.stderr)
        return 2
    world = external_world_size() or args.nproc  # torchrun decides when it launched us
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

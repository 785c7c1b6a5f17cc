"""Measure the links and the expert kernels of the current launch once, for the planner.

    adaptive-moe plan --calibrate cal.json --world 8 --ranks-per-node 2 --d-model 64 \\
        --d-ff 128 --experts 4 --top-k 2          # spawns 8 gloo CPU ranks
    torchrun --nproc-per-node 8 -m adaptive_moe plan --calibrate cal.json ...  # NCCL
    adaptive-moe plan --calibration cal.json --world 2048 ...   # predict with it

Every rank at once (the cores and links are shared as in a step):

  1. times the linear and 2DH ``exchange`` of equal splits at a few sizes, the
     ``benchmarks/alltoall.py`` measurement (median of the repeats, slowest rank),
     and the all-gather of the weight gathers;
  2. measures the expert kernels (``measure_kernel_profile``) on the shapes the
     strategies of this world compute with, keeping the slowest rank's time of every
     grid point.

The file holds both raw measurements; ``Calibration.links`` fits the link model to the
exchanges (``links.fit_links``; one link for gloo ranks of one host, whose simulated
nodes share its memory) and ``Calibration.profile`` is the kernel profile.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from adaptive_moe.comm import build_mesh, exchange, plan_exchange
from adaptive_moe.comm.gather import all_gather_rows
from adaptive_moe.comm.mesh import Mesh
from adaptive_moe.core.checks import positive_int
from adaptive_moe.core.dtypes import DTYPES, TORCH_DTYPES
from adaptive_moe.core.fileio import read_json
from adaptive_moe.core.launch import launch, launched_externally, ranks_on_this_host
from adaptive_moe.core.rounds import STATISTICS, timed_rounds
from adaptive_moe.core.sizes import check_fits
from adaptive_moe.planning.kernel_profile import (
    KernelProfile,
    measure_kernel_profile,
    needed_shapes,
)
from adaptive_moe.planning.links import LinkModel, fit_links

FORMAT_NAME = "adaptive_moe.calibration"
FORMAT_VERSION = 1
ROWS_GRID = (1, 4, 16, 64, 256, 1024, 4096)
A2A_ROWS = (64, 256, 1024, 4096, 16384)


def time_alltoall(
    mesh: Mesh,
    d_model: int,
    rows: Sequence[int],
    repeats: int,
    device: torch.device,
    dtype: torch.dtype,
    statistic: Literal["median", "min"] = "median",
) -> list[dict[str, Any]]:
    """The median (``statistic``, or the fastest) of ``repeats`` linear (and, with
    several nodes of several ranks, 2DH) exchanges of ``rows`` rows per rank in equal
    splits, slowest rank, as ``benchmarks/alltoall.py`` results. With them,
    ``allgather`` rows: the all-gather over the whole group of a [rows / W, d] shard per
    rank (``bytes``: the shard), the collective of the weight and count gathers, whose
    steps wait on each other (``LinkModel.step_us``). Every point gets two untimed
    passes, then ``repeats`` rounds time one call of each, so that a change in the
    machine's load shifts every point alike (the fit's call, per-message and per-byte
    terms come from their differences)."""
    w = mesh.world
    algos = ["linear", "2dh"] if 1 < mesh.ranks_per_node < w else ["linear"]
    points = []  # (bytes, method, one call)
    for n in rows:
        per = max(1, n // w)
        x = torch.randn(per * w, d_model, device=device).to(dtype)  # [W * per, d]
        nbytes = x.numel() * x.element_size()
        for algo in algos:
            plan = plan_exchange([[per] * w for _ in range(w)], mesh, algo, x.device)
            points.append((nbytes, algo, functools.partial(exchange, x, plan, mesh)))
        shard = x[:per]  # [per, d]
        points.append(
            (nbytes // w, "allgather", functools.partial(all_gather_rows, shard, mesh.group))
        )

    def timed(call: Any) -> float:
        _sync(device)
        t0 = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {tuple(STATISTICS)}, got {statistic!r}")
    timers = [functools.partial(timed, call) for _, _, call in points]
    pick = STATISTICS[statistic]
    times = [pick(t) for t in timed_rounds(timers, 2, repeats)]  # two untimed passes each
    worst = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return [
        {"bytes": nbytes, "method": method, "time_us": t * 1e6}
        for (nbytes, method, _), t in zip(points, worst.tolist())
    ]


def _sync(device: torch.device) -> None:
    """Finish queued device work and line the ranks up."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def slowest_profile(profile: KernelProfile, device: torch.device) -> KernelProfile:
    """The profile with every grid point the slowest rank's (the slowest rank gates
    every step); a collective: every rank calls it."""
    flat = [t for k in profile.kernels for g in profile.times_ms[k] for row in g for t in row]
    worst = torch.tensor(flat, dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    it = iter(worst.tolist())
    times = {
        k: [[[next(it) for _ in row] for row in g] for g in profile.times_ms[k]]
        for k in profile.kernels
    }
    return dataclasses.replace(profile, times_ms=times)


@dataclasses.dataclass(frozen=True)
class CalibrationSpec:
    """What to measure: the layer form of the kernels, the launch's nodes, the grids.

    Attributes:
        d_model, d_ff, num_experts: the layer (the kernels' shapes follow from them and W).
        ranks_per_node: m of the launch (simulated nodes for spawned CPU ranks).
        glu, dtype: the kernels' form (dtype default: float32 on CPU, bfloat16 on GPUs).
        kernels: expert kernels to profile (default: ``loop`` and ``bmm`` on CPU, every
            available one on GPUs).
        a2a_rows, rows: rows per rank of the exchanges; rows per expert of the kernels.
        repeats: timed repeats of every point (the median is kept: the statistic of
            the profiler the planner stands in for; on ranks sharing cores the fastest
            is a step the scheduler happened not to interrupt, which only steps shorter
            than its time slice get, so it bends the kernel times upwards there).
    """

    d_model: int
    d_ff: int
    num_experts: int
    ranks_per_node: int
    glu: bool = True
    dtype: str | None = None
    kernels: tuple[str, ...] | None = None
    a2a_rows: tuple[int, ...] = A2A_ROWS
    rows: tuple[int, ...] = ROWS_GRID
    repeats: int = 5

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "ranks_per_node", "repeats"):
            positive_int(f"CalibrationSpec.{name}", getattr(self, name))
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"CalibrationSpec.dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("a2a_rows", "rows"):
            axis = getattr(self, name)
            if not axis or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in axis
            ):
                raise ValueError(f"CalibrationSpec.{name} must be positive integers, got {axis!r}")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The measurements of one launch (see module docstring).

    Attributes:
        meta: world, ranks_per_node, backend, device, dtype, cores (of the host), date
            (UTC ISO 8601), and the seconds the measurement took.
        alltoall: ``benchmarks/alltoall.py`` result rows (bytes, method, time_us).
        profile: the expert kernels, slowest rank per grid point.
    """

    meta: dict[str, Any]
    alltoall: list[dict[str, Any]]
    profile: KernelProfile

    def links(self, copy_GBps: float | None = None) -> LinkModel:
        """The link model fitted to the exchanges: one link for gloo (every simulated
        node is the same host), per level otherwise. ``copy_GBps`` of the 2DH reorders:
        default 5 GB/s on CPU (a memcpy of one core), 2000 on GPUs."""
        gloo = self.meta["backend"] == "gloo"
        copy = copy_GBps if copy_GBps is not None else (5.0 if gloo else 2000.0)
        data = {"meta": self.meta, "results": self.alltoall}
        return fit_links([data], copy_GBps=copy, one_level=gloo)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "meta": self.meta,
            "alltoall": self.alltoall,
            "profile": self.profile.to_dict(),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str], flag: str = "calibration") -> Calibration:
        """Read a file ``save`` wrote; ValueError naming ``flag`` and the file otherwise."""
        data = read_json(path, flag)
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ValueError(
                f"{path}: not a calibration (no format {FORMAT_NAME!r}; write one with "
                "adaptive-moe plan --calibrate FILE)"
            )
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: calibration version {data.get('version')!r}, expected 1")
        try:
            profile = KernelProfile.from_dict(data["profile"])
            return cls(dict(data["meta"]), list(data["alltoall"]), profile)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: invalid calibration: {err}") from err


def measure_rank(rank: int, world: int, spec: CalibrationSpec) -> dict[str, Any] | None:
    """What every rank of the launch runs (a process group is up); rank 0 returns the
    ``Calibration.to_dict``, the others None."""
    t0 = time.time()
    nccl = dist.get_backend() == "nccl"  # under torchrun on GPUs
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    dtype = spec.dtype or ("bfloat16" if nccl else "float32")
    m = min(spec.ranks_per_node, world)
    mesh = build_mesh(dist.group.WORLD, m, 1)
    a2a = time_alltoall(
        mesh, spec.d_model, spec.a2a_rows, spec.repeats, device, TORCH_DTYPES[dtype]
    )
    hidden, experts = needed_shapes(spec.num_experts, spec.d_ff, [world])
    kernels = spec.kernels or (None if nccl else ("loop", "bmm"))
    profile = measure_kernel_profile(
        spec.d_model,
        hidden,
        experts,
        spec.rows,
        glu=spec.glu,
        dtype=dtype,
        device=device,
        kernels=kernels,
        warmup=1,
        repeats=spec.repeats,
        concurrent=world,
        progress=rank == 0,
    )
    profile = slowest_profile(profile, device)
    if rank != 0:
        return None
    meta = {
        "world": world,
        "ranks_per_node": m,
        "backend": "nccl" if nccl else "gloo",
        "device": profile.device,
        "dtype": dtype,
        "cores": os.cpu_count(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.time() - t0, 1),
    }
    return Calibration(meta, a2a, profile).to_dict()


def _check_memory(world: int, spec: CalibrationSpec) -> None:
    """The kernels are timed on each rank's share of the experts' matrices (at least):
    refuse shapes whose share cannot fit, before a rank allocates them."""
    on_gpu = launched_externally() and torch.cuda.is_available()  # NCCL, as ``launch``
    dtype = TORCH_DTYPES[spec.dtype or ("bfloat16" if on_gpu else "float32")]
    share = (3 if spec.glu else 2) * spec.d_model * spec.d_ff * spec.num_experts // world
    what = (
        f"calibrating d_model={spec.d_model} (--d-model), d_ff={spec.d_ff} (--d-ff), "
        f"num_experts={spec.num_experts} (--experts) on {world} rank(s)"
    )
    device = "cuda" if on_gpu else "cpu"
    check_fits(share * dtype.itemsize, device, what, 1 if on_gpu else ranks_on_this_host(world))


def calibrate(
    world: int, spec: CalibrationSpec, *, timeout_s: float = 1800.0
) -> Calibration | None:
    """Measure on ``world`` ranks: spawned gloo CPU ranks, or the ranks of the external
    launcher (torchrun), where only rank 0 gets the result (None elsewhere)."""
    positive_int("world", world)
    m = min(spec.ranks_per_node, world)
    if world % m:
        raise ValueError(f"ranks_per_node={m} must divide world={world}")
    _check_memory(world, spec)
    result = launch(measure_rank, world, (spec,), timeout_s=timeout_s, ranks_per_node=m)[0]
    if result is None:
        return None
    return Calibration(
        result["meta"], result["alltoall"], KernelProfile.from_dict(result["profile"])
    )

"""How long the expert kernels take on one device: the compute term of the cost model.

A profile answers ``time_ms(kernel, experts, rows_per_expert, hidden)``: forward plus
backward of ``kernels.expert_mlp`` over ``experts`` experts of hidden size ``hidden``
(the h of the weights the strategy computes with: h for r = 0 and s = 1, h / r for
EP+MP blocks), each receiving ``rows_per_expert`` rows, with the layer's d_model, GLU
form, activation and dtype.

    KernelProfile   measured on a grid (``measure_kernel_profile``), saved as JSON:
                    times[kernel][hidden][experts][rows] in ms, rows ragged where the
                    largest products were skipped. Between grid points the time is
                    interpolated linearly in log(time) over log(rows), log(experts),
                    log(hidden); beyond the largest point it grows proportionally (the
                    work does), below the smallest it stays at that point (the fixed
                    cost of launching the kernels).
    Roofline        published peak figures instead of a measurement: max(FLOPs / (peak
                    * efficiency), bytes / HBM bandwidth) + kernel launches; used for
                    devices that have not been measured (the A100/H100 trend checks).
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from tqdm import tqdm

from adaptive_moe.core.dtype_names import DTYPES, ITEMSIZES
from adaptive_moe.core.fileio import read_json
from adaptive_moe.core.rounds import STATISTICS, timed_rounds
from adaptive_moe.core.strategy import KERNELS
from adaptive_moe.tuning.table import device_name, torch_version

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "adaptive_moe.kernel_profile"
FORMAT_VERSION = 1


class ComputeModel(Protocol):
    """What the cost model asks of a device (``KernelProfile`` or ``Roofline``)."""

    device: str
    dtype: str
    kernels: tuple[str, ...]

    def time_ms(self, kernel: str, experts: int, rows_per_expert: float, hidden: int) -> float: ...

    def describe(self) -> dict[str, Any]: ...


def _axis(q: float, axis: Sequence[int]) -> tuple[int, int, float, float]:
    """(i0, i1, weight of i1, proportional scale) of ``q`` on a sorted grid axis."""
    if q >= axis[-1]:
        return len(axis) - 1, len(axis) - 1, 0.0, q / axis[-1]
    if q <= axis[0]:
        return 0, 0, 0.0, 1.0
    i = bisect.bisect_right(axis, q) - 1
    w = (math.log(q) - math.log(axis[i])) / (math.log(axis[i + 1]) - math.log(axis[i]))
    return i, i + 1, w, 1.0


@dataclasses.dataclass(frozen=True)
class KernelProfile:
    """Measured expert-kernel times of one device (see module docstring).

    Attributes:
        device: ``table.device_name`` of the device (``"cpu"``, ``"NVIDIA H200"``).
        dtype, d_model, glu, activation: the layer form measured.
        torch_version: ``major.minor`` of the torch measured with.
        date: UTC ISO 8601.
        kernels, hidden, experts, rows: the grid axes (increasing).
        times_ms: kernel -> ``[hidden][experts][rows up to the largest measured]`` ms.
        concurrent: processes measuring at the same time on the device (CPU runs share
            cores the way the gloo ranks of a step do).
    """

    device: str
    dtype: str
    d_model: int
    glu: bool
    activation: str
    torch_version: str
    date: str
    kernels: tuple[str, ...]
    hidden: tuple[int, ...]
    experts: tuple[int, ...]
    rows: tuple[int, ...]
    times_ms: dict[str, list[list[list[float]]]]
    concurrent: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"KernelProfile.dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("hidden", "experts", "rows"):
            axis = getattr(self, name)
            if not axis or any(not isinstance(v, int) or v < 1 for v in axis):
                raise ValueError(f"KernelProfile.{name} must be positive integers, got {axis!r}")
            if list(axis) != sorted(set(axis)):
                raise ValueError(f"KernelProfile.{name} must be increasing, got {axis!r}")
        bad = [k for k in self.kernels if k not in KERNELS]
        if bad or not self.kernels or set(self.times_ms) != set(self.kernels):
            raise ValueError(
                f"KernelProfile.kernels must be a non-empty subset of {KERNELS} with a "
                f"times_ms grid each; got kernels {self.kernels}, grids {sorted(self.times_ms)}"
            )
        for k, grid in self.times_ms.items():
            ok = len(grid) == len(self.hidden) and all(len(g) == len(self.experts) for g in grid)
            ok = ok and all(
                1 <= len(row) <= len(self.rows)
                and all(isinstance(t, (int, float)) and t > 0 for t in row)
                for g in grid
                for row in g
            )
            if not ok:
                raise ValueError(
                    f"KernelProfile.times_ms[{k!r}] must be [hidden][experts][rows] with at "
                    "least one positive time per (hidden, experts)"
                )

    def time_ms(self, kernel: str, experts: int, rows_per_expert: float, hidden: int) -> float:
        """Forward + backward ms (see module docstring for the interpolation)."""
        if kernel not in self.times_ms:
            raise ValueError(f"kernel {kernel!r} is not in this profile (has {self.kernels})")
        grid = self.times_ms[kernel]
        hi0, hi1, hw, hscale = _axis(hidden, self.hidden)
        ei0, ei1, ew, escale = _axis(experts, self.experts)
        logt = 0.0
        for hi, wh in ((hi0, 1 - hw), (hi1, hw)):
            for ei, we in ((ei0, 1 - ew), (ei1, ew)):
                if wh * we:
                    logt += wh * we * math.log(self._rows_ms(grid[hi][ei], rows_per_expert))
        return math.exp(logt) * hscale * escale

    def _rows_ms(self, measured: list[float], rows: float) -> float:
        axis = self.rows[: len(measured)]
        i0, i1, w, scale = _axis(max(rows, 1.0), axis)
        return math.exp((1 - w) * math.log(measured[i0]) + w * math.log(measured[i1])) * scale

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "measured",
            "device": self.device,
            "dtype": self.dtype,
            "d_model": self.d_model,
            "torch_version": self.torch_version,
            "date": self.date,
            "concurrent": self.concurrent,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, **dataclasses.asdict(self)}

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str], flag: str = "kernel profile") -> KernelProfile:
        """Read a profile written by ``save``; ValueError naming ``flag`` and the file
        otherwise (not a regular file, too large, too deep, not JSON, not a profile)."""
        data = read_json(path, flag)
        return cls.from_dict(data, f"{flag} {path}")

    @classmethod
    def from_dict(cls, data: Any, where: str = "kernel profile") -> KernelProfile:
        """The profile of a ``to_dict`` map; ValueError naming ``where`` otherwise."""
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ValueError(f"{where}: not a kernel profile (no format {FORMAT_NAME!r})")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{where}: kernel profile version {data.get('version')!r}, this adaptive_moe "
                f"reads {FORMAT_VERSION}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        body = {k: v for k, v in data.items() if k not in ("format", "version")}
        if set(body) - fields or {f for f in fields if f != "concurrent"} - set(body):
            raise ValueError(f"{where}: kernel profile fields must be {sorted(fields)}")
        for name in ("kernels", "hidden", "experts", "rows"):
            body[name] = tuple(body[name])
        try:
            return cls(**body)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: invalid kernel profile: {err}") from err


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Expert-kernel time from published peak figures (see module docstring).

    Attributes:
        device: the device named (e.g. ``"NVIDIA A100-SXM4-80GB"``).
        dtype, d_model, glu: the layer form.
        peak_TFLOPS: dense peak of the dtype (A100 bf16 312, H100/H200 SXM bf16 989).
        hbm_GBps: memory bandwidth (A100-80GB 2039, H100 SXM 3350, H200 4800).
        efficiency: share of the peak a large grouped GEMM reaches.
        launch_us: cost of one kernel launch; ``loop`` launches 6 per expert (2 GEMMs
            forward, 4 backward), the grouped kernels 6 in all.
        kernels: the kernels it answers for (default ``scatter``, the GPU default).
    """

    device: str
    dtype: str
    d_model: int
    glu: bool
    peak_TFLOPS: float
    hbm_GBps: float
    efficiency: float = 0.6
    launch_us: float = 8.0
    # The roofline cannot tell the grouped kernels apart: one stands for them all.
    kernels: tuple[str, ...] = ("scatter",)

    def time_ms(self, kernel: str, experts: int, rows_per_expert: float, hidden: int) -> float:
        d, b = self.d_model, ITEMSIZES[self.dtype]
        mats = 3 if self.glu else 2  # (gate, up, down) or (up, down) matrices of h x d
        rows = experts * rows_per_expert
        flops = 3 * 2 * rows * d * mats * hidden  # forward once, backward twice
        # weights read forward and backward, gradients written; activations in and out
        weight_bytes = 3 * experts * mats * hidden * d * b
        act_bytes = 3 * rows * (2 * d + (mats + 1) * hidden) * b
        work = max(
            flops / (self.peak_TFLOPS * 1e12 * self.efficiency),
            (weight_bytes + act_bytes) / (self.hbm_GBps * 1e9),
        )
        launches = 6 * experts if kernel == "loop" else 6
        return (work + launches * self.launch_us * 1e-6) * 1e3

    def describe(self) -> dict[str, Any]:
        return {"kind": "roofline", **dataclasses.asdict(self), "kernels": list(self.kernels)}


ROOFLINES: dict[str, dict[str, Any]] = {
    "a100": {"device": "NVIDIA A100-SXM4-80GB", "peak_TFLOPS": 312.0, "hbm_GBps": 2039.0},
    "h100": {"device": "NVIDIA H100 80GB HBM3", "peak_TFLOPS": 989.0, "hbm_GBps": 3350.0},
    "h200": {"device": "NVIDIA H200", "peak_TFLOPS": 989.0, "hbm_GBps": 4800.0},
}


def roofline(name: str, d_model: int, glu: bool = True, dtype: str = "bfloat16") -> Roofline:
    """The ``Roofline`` of a published device (``ROOFLINES``: a100, h100, h200)."""
    if name not in ROOFLINES:
        raise ValueError(f"roofline device must be one of {sorted(ROOFLINES)}, got {name!r}")
    return Roofline(dtype=dtype, d_model=d_model, glu=glu, **ROOFLINES[name])


# ---- measuring ------------------------------------------------------------------------------


def needed_shapes(
    num_experts: int, d_ff: int, worlds: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(hidden sizes, expert counts) the strategies of ``worlds`` compute with: r = 0
    runs E experts of h; s = 1 runs E / W of h; s > 1 runs one expert of h / r."""
    hidden, experts = {d_ff}, {num_experts}
    for w in worlds:
        if w <= num_experts:
            experts.add(num_experts // w)
        else:
            s = w // num_experts
            experts.add(1)
            hidden.update(d_ff // r for r in range(1, s + 1) if s % r == 0)
    return tuple(sorted(hidden)), tuple(sorted(experts))


def _time_ms(
    fns: Sequence[Any], device: torch.device, warmup: int, repeats: int, statistic: str
) -> list[float]:
    """ms of every ``fns`` step: each one's warm-up, then ``repeats`` rounds of one
    timed call of each (``core.rounds.timed_rounds``: a change in the machine's load
    during the point shifts every kernel alike instead of the one timed while it lasted)."""
    from adaptive_moe.core import timing

    def timer(fn: Any) -> Callable[[], float]:
        def timed() -> float:
            start = timing.mark(device)
            fn()
            return timing.elapsed_ms(start, timing.mark(device))

        return timed

    pick = STATISTICS[statistic]
    return [pick(t) for t in timed_rounds([timer(fn) for fn in fns], warmup, repeats)]


def measure_kernel_profile(
    d_model: int,
    hidden: Sequence[int],
    experts: Sequence[int],
    rows: Sequence[int],
    *,
    glu: bool = True,
    activation: str = "silu",
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    kernels: Sequence[str] | None = None,
    max_total_rows: int = 1 << 16,
    warmup: int = 2,
    repeats: int = 5,
    concurrent: int = 1,
    statistic: Literal["median", "min"] = "median",
    monotone: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> KernelProfile:
    """Time forward + backward of ``expert_mlp`` on every grid point (balanced rows:
    every expert gets ``rows`` rows) and return the profile. At each point every
    kernel runs on the same inputs, its warm-up first, then ``repeats`` rounds of one
    timed step of each kernel: the kernels are compared under the same load.

    Points with more than ``max_total_rows`` rows in all are skipped (the profile then
    grows proportionally from the largest measured one). ``kernels`` defaults to every
    kernel available on the device for every hidden size of the grid.

    ``statistic``: the median of ``repeats`` (default), or their minimum (a machine
    shared with other work adds time, never removes it). ``monotone``: make the times
    non-decreasing in rows (each point becomes the minimum of itself and every larger
    row count: more rows never cost less, so a smaller value above is the truer one)."""
    # The measuring half of this module loads torch and the kernels where it runs, so
    # that planning from a profile or a roofline stays torch-free.
    import torch

    from adaptive_moe.core.dtypes import TORCH_DTYPES
    from adaptive_moe.runtime.experts.kernels import available_kernels

    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {tuple(STATISTICS)}, got {statistic!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    device = torch.device(device)
    tdtype = TORCH_DTYPES[dtype]
    hidden, experts, rows = (tuple(sorted(set(a))) for a in (hidden, experts, rows))
    for name, axis in (("hidden", hidden), ("experts", experts), ("rows", rows)):
        if not axis or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in axis):
            raise ValueError(f"{name} must be positive integers, got {axis!r}")
    usable = [set(available_kernels(device, tdtype, d_model=d_model, hidden=h)) for h in hidden]
    common = tuple(k for k in KERNELS if all(k in u for u in usable))
    kernels = tuple(kernels) if kernels is not None else common
    bad = [k for k in kernels if k not in common]
    if bad or not kernels:
        raise ValueError(f"kernels must be a non-empty subset of {common} here, got {kernels}")
    if min(rows) * min(experts) > max_total_rows:
        raise ValueError(f"max_total_rows={max_total_rows} leaves no grid point to measure")
    # Drawn on the device: a CPU draw of the largest points' inputs (GBs) would take
    # longer than timing them.
    gen = torch.Generator(device=device).manual_seed(seed)
    halves = 2 if glu else 1
    times: dict[str, list[list[list[float]]]] = {k: [] for k in kernels}
    total = len(hidden) * sum(1 for n in experts for r in rows if n * r <= max_total_rows)
    bar = tqdm(total=total, unit="pt", desc="kernels", disable=not progress, dynamic_ncols=True)
    with bar:
        for h in hidden:
            per_h: dict[str, list[list[float]]] = {k: [] for k in kernels}
            for n in experts:
                w1 = torch.randn(n, halves * h, d_model, generator=gen, device=device)
                w2 = torch.randn(n, d_model, h, generator=gen, device=device)
                w1, w2 = w1 / math.sqrt(d_model), w2 / math.sqrt(h)
                w1 = w1.to(device, tdtype).requires_grad_(True)  # [n, halves*h, d]
                w2 = w2.to(device, tdtype).requires_grad_(True)  # [n, d, h]
                lines: dict[str, list[float]] = {k: [] for k in kernels}
                for r in rows:
                    if n * r > max_total_rows:
                        break
                    bar.set_postfix_str(f"h={h} experts={n} rows={r}")
                    steps = _point_steps(kernels, w1, w2, r, glu, activation, gen)
                    for k, ms in zip(kernels, _time_ms(steps, device, warmup, repeats, statistic)):
                        lines[k].append(ms)
                    bar.update()
                for k, line in lines.items():
                    if monotone:
                        line = [min(line[i:]) for i in range(len(line))]
                    per_h[k].append(line)
            for k in kernels:
                times[k].append(per_h[k])
    return KernelProfile(
        device=device_name(device),
        dtype=dtype,
        d_model=d_model,
        glu=glu,
        activation=activation,
        torch_version=torch_version(),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        kernels=kernels,
        hidden=hidden,
        experts=experts,
        rows=rows,
        times_ms=times,
        concurrent=concurrent,
    )


def _point_steps(
    kernels: Sequence[str],
    w1: torch.Tensor,
    w2: torch.Tensor,
    rows: int,
    glu: bool,
    activation: str,
    gen: torch.Generator,
) -> list[Any]:
    """One forward + backward step per kernel on the same inputs: ``rows`` rows for
    each of the n experts of ``w1`` [n, halves*h, d] and ``w2`` [n, d, h]."""
    import torch

    from adaptive_moe.runtime.experts.grouping import group_by_expert
    from adaptive_moe.runtime.experts.kernels import expert_mlp

    n, _, d = w1.shape
    device = w1.device
    x = torch.randn(n * rows, d, generator=gen, device=device).to(w1.dtype).requires_grad_(True)
    dy = torch.randn(n * rows, d, generator=gen, device=device).to(w1.dtype)  # [n*rows, d]
    expert = torch.arange(n, device=device).repeat_interleave(rows)  # [n*rows], grouped
    grouped = group_by_expert(expert, n, 1, [rows] * n)

    def step(kernel: str) -> Any:
        def run() -> None:
            x.grad = w1.grad = w2.grad = None
            y = expert_mlp(x, grouped, w1, None, w2, glu=glu, activation=activation, kernel=kernel)
            y.backward(dy)

        return run

    return [step(k) for k in kernels]

"""Alpha-beta model of the links one rank talks over, per level.

A message of b bytes to one peer costs ``alpha + b / bandwidth`` on its level (``intra``:
another rank of the same node, ``inter``: a rank of another node). One collective call
costs ``call_us`` on top (launch, host work, the barrier-like end of a collective). An
all_to_all_single posts one message per peer, all at once (NCCL groups every send and
receive; gloo posts them all before waiting), so their latencies overlap: the last of
n messages leaves ``(n - 1) * issue`` after the first and lands ``alpha`` later. A rank
spends

    call_us + sum_level (alpha_level + (peers_level - 1) * issue_level)
            + max_level (max(sent, received)_level / bw_level)

with the two levels' bytes moving at the same time (NVLink and the NIC are separate
links). ``issue_us = None`` means ``issue = alpha`` (messages in series): what
``fit_links`` fits, since a per-peer slope cannot tell the two apart. A ring all-gather
over G ranks costs ``call_us + (G - 1) * (step + shard / bw)`` on its slowest level:
each step waits for the last, so a step is a round trip, not a message posted beside
others (``step_us``, fitted to timed all-gathers; ``None``: the level's alpha).
``copy_GBps`` is the device memory bandwidth used for the 2DH reorders (read + write
of every row).

Defaults (``PRESETS``) are published peak figures, not measurements; where you can,
measure with ``benchmarks/alltoall.py --out a2a.json`` and ``fit_links``:

    a100-ndv4   Azure ND96amsr_A100_v4 (Tutel's testbed): NVLink3 600 GB/s per GPU both
                directions = 300 GB/s per direction; 8 x HDR InfiniBand 200 Gb/s per
                node, one NIC per GPU = 25 GB/s; A100-80GB HBM2e 2.0 TB/s.
    h100-ndr    DGX H100: NVLink4 900 GB/s both directions = 450 GB/s per direction;
                8 x NDR 400 Gb/s per node, one per GPU = 50 GB/s; H100 SXM HBM3 3.35 TB/s.
    h200-ndr    HGX H200: as h100-ndr with HBM3e 4.8 TB/s.

The per-message alphas (2 us NVLink, 3 us InfiniBand: a half-bandwidth message of
alpha * bw = 75 KB over HDR) and the 20 us call latency are the least documented
figures; they set where many small messages stop paying, i.e. where 2DH overtakes the
linear all-to-all. The presets leave ``issue_us`` at the alpha: the library's
all-to-all is NCCL's, and Tutel's NCCL measurements (2DH ahead of linear from 64 GPUs
at 8 MiB per rank, and at 128 MiB from 256-512) need a per-peer cost near the alpha;
an issue interval of 1 us already loses both. GPU-initiated RDMA (DeepEP) behaves
like ~0.25 us (``benchmarks/plan_trends.py``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adaptive_moe.core.fileio import read_json


def _positive(owner: str, name: str, value: object, *, zero_ok: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero_ok):
        what = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{owner}.{name} must be a finite number {what}, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Link:
    """One link level: per-message latency (us), per-direction bandwidth (GB/s) and the
    time between two messages a rank posts at once (``issue_us``; ``None``: the
    latency, i.e. the messages go one after the other)."""

    alpha_us: float
    bandwidth_GBps: float
    issue_us: float | None = None

    def __post_init__(self) -> None:
        _positive("Link", "alpha_us", self.alpha_us, zero_ok=True)
        _positive("Link", "bandwidth_GBps", self.bandwidth_GBps)
        if self.issue_us is not None:
            _positive("Link", "issue_us", self.issue_us, zero_ok=True)

    def seconds(self, messages: float, nbytes: float) -> float:
        """``messages`` messages one after the other, carrying ``nbytes`` in all."""
        return messages * self.alpha_us * 1e-6 + nbytes / (self.bandwidth_GBps * 1e9)

    def posted_seconds(self, messages: np.ndarray) -> np.ndarray:
        """Latency of ``messages`` messages to distinct peers posted at once (one
        all_to_all_single): the last is issued after ``(n - 1) * issue`` and lands
        ``alpha`` later; 0 for none. With ``issue_us=None`` this is ``n * alpha``."""
        issue = self.alpha_us if self.issue_us is None else self.issue_us
        n = np.asarray(messages, dtype=np.float64)
        return np.where(n > 0, self.alpha_us + (n - 1) * issue, 0.0) * 1e-6


@dataclasses.dataclass(frozen=True)
class LinkModel:
    """The links of one cluster (see module docstring).

    Attributes:
        intra: between ranks of one node.
        inter: between nodes (per rank: its own NIC's share).
        call_us: fixed cost of one collective call.
        copy_GBps: device memory bandwidth for local copies (2DH reorders, self-sends).
        name: where the figures come from (recorded in predicted tables).
        step_us: latency of one step of a ring collective (the weight and count
            all-gathers, their backward), fitted to timed all-gathers of the whole
            group; ``None``: the alpha of the level the ring crosses. An all-to-all's
            per-message alpha is a message posted beside the others; a ring step
            waits for the previous one, which on ranks sharing cores includes the peer
            being scheduled, so the one does not predict the other.
    """

    intra: Link
    inter: Link
    call_us: float = 20.0
    copy_GBps: float = 2000.0
    name: str = "custom"
    step_us: float | None = None

    def __post_init__(self) -> None:
        for level in ("intra", "inter"):
            if not isinstance(getattr(self, level), Link):
                raise ValueError(f"LinkModel.{level} must be a Link, got {getattr(self, level)!r}")
        _positive("LinkModel", "call_us", self.call_us, zero_ok=True)
        _positive("LinkModel", "copy_GBps", self.copy_GBps)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"LinkModel.name must be a non-empty string, got {self.name!r}")
        if self.step_us is not None:
            _positive("LinkModel", "step_us", self.step_us, zero_ok=True)

    def ring_step_seconds(self, link: Link, shard_bytes: float) -> float:
        """One step of a ring collective on ``link``: its latency and one shard."""
        step = link.alpha_us if self.step_us is None else self.step_us
        return step * 1e-6 + shard_bytes / (link.bandwidth_GBps * 1e9)

    def copy_seconds(self, nbytes: float) -> float:
        """A device copy: every byte read once and written once."""
        return 2 * nbytes / (self.copy_GBps * 1e9)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinkModel:
        try:
            return cls(
                intra=Link(**data["intra"]),
                inter=Link(**data["inter"]),
                call_us=data["call_us"],
                copy_GBps=data["copy_GBps"],
                name=data["name"],
                step_us=data.get("step_us"),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a LinkModel map ({err}): {data!r}") from err


PRESETS: dict[str, LinkModel] = {
    "a100-ndv4": LinkModel(Link(2.0, 300.0), Link(3.0, 25.0), 20.0, 2000.0, "a100-ndv4"),
    "h100-ndr": LinkModel(Link(2.0, 450.0), Link(3.0, 50.0), 20.0, 3350.0, "h100-ndr"),
    "h200-ndr": LinkModel(Link(2.0, 450.0), Link(3.0, 50.0), 20.0, 4800.0, "h200-ndr"),
}


def preset(name: str) -> LinkModel:
    """The published figures ``name`` (one of ``PRESETS``)."""
    if name not in PRESETS:
        raise ValueError(f"links preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


# ---- measured links -----------------------------------------------------------------------


def load_alltoall(path: str | os.PathLike[str], flag: str = "--links-file") -> dict[str, Any]:
    """A ``benchmarks/alltoall.py --out`` file (``check_alltoall``)."""
    return check_alltoall(read_json(path, flag), f"{flag} {path}")


def check_alltoall(data: Any, where: str) -> dict[str, Any]:
    """``{"meta": {world, ranks_per_node, ...}, "results": [{"bytes", "method",
    "time_us", ...}]}``, checked; ValueError naming ``where`` otherwise."""
    ok = isinstance(data, dict) and isinstance(data.get("meta"), dict)
    ok = ok and isinstance(data.get("results"), list) and bool(data["results"])
    if not ok:
        raise ValueError(
            f"{where}: expected {{'meta': {{...}}, 'results': [...]}} as written by "
            "benchmarks/alltoall.py --out"
        )
    for key in ("world", "ranks_per_node"):
        if not isinstance(data["meta"].get(key), int) or data["meta"][key] < 1:
            raise ValueError(f"{where}: meta.{key} must be a positive integer")
    for i, r in enumerate(data["results"]):
        if not isinstance(r, dict) or not {"bytes", "method", "time_us"} <= set(r):
            raise ValueError(f"{where}: results[{i}] needs bytes, method and time_us")
    return data


def fit_links(
    paths: Sequence[str | os.PathLike[str] | dict[str, Any]],
    *,
    copy_GBps: float = 2000.0,
    method: str = "linear",
    one_level: bool = False,
) -> LinkModel:
    """Fit a ``LinkModel`` to ``benchmarks/alltoall.py`` results (equal splits, the
    ``method`` rows, default ``linear``).

    One rank of W sends S / W bytes to every rank: W - 1 messages of S / W, of which
    ``W - m`` cross nodes. Each file is one (W, m); the fit is a least-squares plane per
    level through ``time = calls * call + messages * alpha + bytes / bw`` over all
    sizes and files:

      * files with one node (m = W) fit the intra level;
      * files with m = 1 (every peer on another node) fit the inter level;
      * files with 1 < m < W fit the level whose bytes dominate (inter); the intra
        level then takes the intra fit if there is one, else the same figures.

    ``one_level``: every rank shares one physical link (gloo ranks of one host with
    simulated nodes): one link is fitted for both levels, to the ``linear`` rows (one
    call, W - 1 messages) and the ``2dh`` rows (two calls, m - 1 + N - 1 messages, the
    intra and inter stages' bytes, less the two reorders at ``copy_GBps``) of every file.

    With files of a single (W, m) and one method, call and alpha are not separable:
    ``call_us`` is set to 0 and the intercept is spread over the messages.

    ``allgather`` rows (``bytes``: one rank's shard, gathered over the file's whole
    world, as ``calibrate.time_alltoall`` writes them) fit ``step_us`` once the rest is
    fitted: the least-squares step of ``time = call + (W - 1) * (step + shard / bw)``
    with the bandwidth of the level the ring crosses (clipped to >= 0). Without them
    ``step_us`` stays ``None`` (the alpha).
    """
    if not paths:
        raise ValueError("fit_links needs at least one benchmarks/alltoall.py JSON file")
    rows: dict[str, list[tuple[float, float, float, float]]] = {"intra": [], "inter": []}
    shapes: dict[str, set[tuple[int, int, str]]] = {"intra": set(), "inter": set()}
    methods = ("linear", "2dh") if one_level else (method,)
    gathers: list[tuple[int, bool, float, float]] = []  # ranks, crosses nodes, bytes, s
    for i, path in enumerate(paths):
        data = (
            check_alltoall(path, f"results {i}") if isinstance(path, dict) else load_alltoall(path)
        )
        w, m = data["meta"]["world"], data["meta"]["ranks_per_node"]
        if w < 2:
            raise ValueError(f"{path}: world {w}: one rank moves nothing over a link")
        level = "intra" if (m == w or one_level) else "inter"
        for r in data["results"]:
            if r["method"] == "allgather":
                gathers.append((w, level == "inter", r["bytes"], r["time_us"] * 1e-6))
            if r["method"] not in methods:
                continue
            t, nbytes = r["time_us"] * 1e-6, r["bytes"]
            if r["method"] == "2dh" and 1 < m < w:
                n = w // m
                moved = nbytes * (m - 1) / m + nbytes * (n - 1) / n
                t -= 2 * 2 * nbytes / (copy_GBps * 1e9)  # two reorders, read + write
                rows[level].append((2, (m - 1) + (n - 1), moved, t))
            else:
                peers = (w - 1) if (m == w or one_level) else (w - m)
                rows[level].append((1, peers, nbytes * peers / w, t))
            shapes[level].add((w, m, r["method"]))
    if not rows["intra"] and not rows["inter"]:
        raise ValueError(f"no {'/'.join(methods)} rows in {len(paths)} all-to-all result set(s)")
    fits = {lvl: _fit(rows[lvl], len(shapes[lvl]) > 1) for lvl in rows if rows[lvl]}
    intra = fits.get("intra", fits.get("inter"))
    inter = fits.get("inter", intra)
    assert intra is not None and inter is not None
    call = min(intra[0], inter[0])
    name = "fit:" + ",".join("measured" if isinstance(p, dict) else Path(p).name for p in paths)
    # (steps, seconds left for them) of every timed all-gather
    steps = [
        (
            g - 1,
            t - call - (g - 1) * nbytes / ((inter if crosses else intra)[1].bandwidth_GBps * 1e9),
        )
        for g, crosses, nbytes, t in gathers
        if g > 1
    ]
    step_us = None
    if steps:
        n, left = np.array(steps, dtype=np.float64).T
        step_us = max(0.0, float(n @ left / (n @ n))) * 1e6
    return LinkModel(intra[1], inter[1], call * 1e6, copy_GBps, name, step_us)


def _fit(rows: list[tuple[float, float, float, float]], separable: bool) -> tuple[float, Link]:
    """(call seconds, Link) of the least-squares ``t = calls*call + messages*alpha +
    bytes/bw`` with every coefficient clipped to >= 0 (and a floor on 1/bw so bw stays
    finite); a clipped coefficient is dropped and the rest refitted."""
    a = np.array(rows, dtype=np.float64)  # [n, 4]: calls, messages, bytes, seconds
    t = a[:, 3]
    active = [0, 1, 2] if separable else [1, 2]
    coef = np.zeros(3)
    while active:
        sol = np.linalg.lstsq(a[:, active], t, rcond=None)[0]
        coef[:] = 0.0
        coef[active] = sol
        negative = [i for i, c in zip(active, sol) if c < 0]
        if not negative:
            break
        active = [i for i in active if i not in negative]
    call, alpha, inv_bw = (max(0.0, float(c)) for c in coef)
    inv_bw = max(inv_bw, 1e-15)  # at most 1 PB/s: a flat fit still has a bandwidth
    return call, Link(alpha * 1e6, 1.0 / inv_bw / 1e9)

"""The predicted forward + backward time of one ``Strategy`` on one workload.

    time = count all-gather
         + weight all-gathers (r = 0: every expert over the group; EP+MP, 1 <= r < s:
           the h/r block over its s/r ranks) and their backward reduce-scatters
         + the token exchange and expert compute of every chunk, forward and backward
           (4 all-to-alls per chunk: dispatch, return, and their reverses), pipelined
           on a device with a communication stream, in line on CPU
         + the down-projection bias all-gather (bias=True)
         + the host's per-forward planning, when measured (``measure_host_ms``)

Message sizes are exactly the executor's: the [W, W] row matrices of every chunk are
``runtime.dispatch.build_plan``'s (``dispatch_sizes`` computes them for every rank at once,
for the world sizes where building every rank's plan would take minutes; a test holds
the two equal), and the stages of linear and 2DH exchanges split them as
``comm.alltoall.plan_exchange`` does (``exchange_stages``). Weight shards are the
``Experts`` parameter shapes of the ``ShardLayout``.

Each collective's time is the slowest rank's (see ``links``); each chunk's compute is the
slowest rank's kernel time (``kernel_profile``). Pipelining (degree d) is modelled as
the executor issues it on NCCL and gloo alike: every dispatch started first (the
asynchronous first stage of ``exchange_start``, queued in order), chunk i's experts
when its dispatch has arrived and its in-line rest (2DH's second stage) has run, its
return started after them; backward mirrors it. Not modelled: interference between
NCCL kernels and compute (or, on CPU, gloo's threads and compute sharing cores),
congestion beyond each rank's own link share, the router, autograd and the index work
around the kernels. On gloo the backward reduce-scatter is an all-reduce (``Cluster.backend``).

    counts   [W, E]   kept rows per (source rank, expert), as the layer exchanges them
    sizes    [W, W]   rows each source sends each destination in one chunk
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Literal

import numpy as np

import adaptive_moe.planning.grouped as grouped
import adaptive_moe.planning.reference as reference
from adaptive_moe.core.checks import positive_int
from adaptive_moe.core.dtype_names import DTYPES, ITEMSIZES
from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.planning.grouped import Runs
from adaptive_moe.planning.kernel_profile import ComputeModel
from adaptive_moe.planning.links import Link, LinkModel
from adaptive_moe.planning.stages import Exchanges

Level = Literal["intra", "inter"]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """The MoE layer (notation in ``config``): d, h, E, k, GLU, bias, dtype."""

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    glu: bool = True
    bias: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            positive_int(f"LayerSpec.{name}", getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(f"LayerSpec.top_k={self.top_k} must be <= num_experts")
        if self.dtype not in DTYPES:
            raise ValueError(f"LayerSpec.dtype must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def itemsize(self) -> int:
        return ITEMSIZES[self.dtype]

    def layout(self, world: int, rank: int = 0) -> ShardLayout:
        """The fixed layout on ``world`` ranks (ValueError when E and W do not fit)."""
        return ShardLayout(world, rank, self.num_experts, self.d_ff)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """W ranks, m per node (node-contiguous ranks, as torchrun numbers them), links,
    and the backend: gloo runs ``reduce_scatter_tensor`` as an all-reduce and a chunk
    (``comm.gather``), twice the ring's steps and bytes of NCCL's reduce-scatter.

    ``overlap`` in [0, 1] is the share of what pipelining could hide that it does hide:
    1 on GPUs (NCCL moves data while the SMs compute); 0 for CPU ranks that have no
    spare core, where gloo's communication threads need the cores the experts use
    (``cpu_overlap``)."""

    world: int
    ranks_per_node: int
    links: LinkModel
    backend: Literal["nccl", "gloo"] = "nccl"
    overlap: float = 1.0

    def __post_init__(self) -> None:
        ok = isinstance(self.overlap, (int, float)) and not isinstance(self.overlap, bool)
        if not (ok and 0.0 <= self.overlap <= 1.0):
            raise ValueError(f"Cluster.overlap must be a number in [0, 1], got {self.overlap!r}")
        if self.backend not in ("nccl", "gloo"):
            raise ValueError(f"Cluster.backend must be 'nccl' or 'gloo', got {self.backend!r}")
        positive_int("Cluster.world", self.world)
        positive_int("Cluster.ranks_per_node", self.ranks_per_node)
        if self.world % self.ranks_per_node:
            raise ValueError(
                f"Cluster.ranks_per_node={self.ranks_per_node} must divide world={self.world}"
            )

    @property
    def nodes(self) -> int:
        return self.world // self.ranks_per_node


def cpu_overlap(ranks_per_host: int, cores: int) -> float:
    """``Cluster.overlap`` of CPU ranks: the share of a core each rank has beyond the
    one its compute uses, clipped to [0, 1] (0 when there are no more cores than ranks)."""
    positive_int("ranks_per_host", ranks_per_host)
    positive_int("cores", cores)
    return min(1.0, max(0.0, cores / ranks_per_host - 1.0))


# ---- workloads -------------------------------------------------------------------------------


def _part_len(n: np.ndarray, parts: int, i: np.ndarray | int) -> np.ndarray:
    """Length of part i of ``parts`` balanced parts of n rows (``runtime.dispatch.part``)."""
    base, extra = np.divmod(n, parts)
    return base + (np.asarray(i) < extra)


def workload_runs(world: int, num_experts: int, top_k: int, tokens: int, max_tokens: int) -> Runs:
    """counts [W, E] of the profiler's synthetic workload as runs of equal rows, without
    drawing it: expert 0 gets ``max_tokens`` rows, the others share the rest as evenly
    as possible, and every expert's rows come from the ranks in balanced parts (what the
    profiler's shuffled routing gives on average). Expert e's part of rank a is
    ``n_e // W + (a < n_e % W)``, so the rows change only at the thresholds
    ``n_e % W``: at most 4 runs."""
    total = world * tokens * top_k
    if not -(-total // num_experts) <= max_tokens <= world * tokens:
        raise ValueError(
            f"max_tokens must be in [{-(-total // num_experts)}, {world * tokens}] for "
            f"tokens={tokens}, world={world}, E={num_experts}, k={top_k}; got {max_tokens}"
        )
    others = max(1, num_experts - 1)
    rest = total - max_tokens
    per_expert = np.full(num_experts, rest // others, dtype=np.int64)
    per_expert[0] = max_tokens
    per_expert[1 : 1 + rest % others] += 1
    if num_experts == 1:
        per_expert[0] = total
    starts = np.unique(np.concatenate([[0, world], per_expert % world]))  # [K + 1]
    first = starts[:-1, None]  # [K, 1]: each run's first rank
    return Runs(starts, _part_len(per_expert[None, :], world, first))  # rows [K, E]


def workload_counts(
    world: int, num_experts: int, top_k: int, tokens: int, max_tokens: int
) -> np.ndarray:
    """counts [W, E] of ``workload_runs``, dense."""
    return workload_runs(world, num_experts, top_k, tokens, max_tokens).dense()


def _dispatch_rows(
    rows: np.ndarray, layout: ShardLayout, r: int, degree: int
) -> Iterator[np.ndarray]:
    """Per chunk, [K, W]: what a source with counts row rows[k] ([K, E]) sends each
    destination (a rank's row depends only on its own counts)."""
    w, s = layout.world, layout.shards
    if s == 1:
        blocks = rows.reshape(len(rows), w, layout.experts_per_rank)  # [src, dst, local expert]
        for i in range(degree):
            yield _part_len(blocks, degree, i).sum(-1)
        return
    q = s // r
    dst = np.arange(w)
    mine = rows[:, dst // s]  # [src, dst]: rows of dst's expert
    block = _part_len(mine, q, (dst % s) % q)  # part m of q of those rows
    for i in range(degree):
        yield _part_len(block, degree, i)


def _check_exchange(layout: ShardLayout, r: int, width: int) -> None:
    if r < 1 or layout.shards % r:
        raise ValueError(f"r={r} is not an exchange strategy for shard count {layout.shards}")
    if width != layout.num_experts:
        raise ValueError(f"counts must have E={layout.num_experts} columns, got {width}")


def dispatch_sizes(
    counts: np.ndarray, layout: ShardLayout, r: int, degree: int
) -> Iterator[np.ndarray]:
    """The [W, W] row matrix of every chunk of strategy (r >= 1, degree): chunk i's
    ``build_plan(...).chunks[i].sizes``, computed for all ranks at once."""
    counts = np.asarray(counts, dtype=np.int64)
    _check_exchange(layout, r, counts.shape[1])
    if counts.shape[0] != layout.world:
        raise ValueError(f"counts must be [W={layout.world}, E], got {counts.shape}")
    return _dispatch_rows(counts, layout, r, degree)


def dispatch_runs(counts: Runs, layout: ShardLayout, r: int, degree: int) -> Iterator[Runs]:
    """``dispatch_sizes`` of every chunk as runs: the counts' runs of ranks, each with
    the row it sends."""
    _check_exchange(layout, r, counts.rows.shape[1])
    for rows in _dispatch_rows(counts.rows, layout, r, degree):
        yield counts.with_rows(rows)


def plan_bytes(layer: LayerSpec, world: int, ranks_per_node: int, runs: int = 4) -> int:
    """An upper estimate of the planner's peak memory for one bucket: about a dozen
    int64 arrays of [runs, W] and [runs, E] (a chunk's rows and the closed forms'
    temporaries) and [W, m] (the intra stages), live at once."""
    return 8 * 16 * (runs * (world + layer.num_experts) + world * ranks_per_node)


def check_memory(nbytes: int, limit: int | None, what: str) -> None:
    """ValueError with the estimate when ``nbytes`` would exceed ``limit`` (default:
    half of this machine's physical memory)."""
    if limit is None:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    if nbytes > limit:
        raise ValueError(
            f"{what} needs about {nbytes / 2**30:.1f} GiB, more than the "
            f"{limit / 2**30:.1f} GiB allowed (half of this machine's memory unless "
            "max_bytes / --max-memory-gb says otherwise)"
        )


# ---- collectives ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Gather:
    """One all-gather (and, in backward, its reduce-scatter) of a parameter shard.

    Attributes:
        name: the tensor (``w1``, ``b1``, ``down_proj``, ``down_proj_bias``).
        shard_bytes: bytes of this rank's shard.
        ranks: G, the gather group's size.
        level: the slowest link the group's ring crosses.
        backward: whether its backward reduce-scatter runs (weights; not the counts).
    """

    name: str
    shard_bytes: int
    ranks: int
    level: Level
    backward: bool = True

    def seconds(self, links: LinkModel) -> float:
        if self.ranks == 1:
            return 0.0
        link: Link = getattr(links, self.level)
        return links.call_us * 1e-6 + (self.ranks - 1) * links.ring_step_seconds(
            link, self.shard_bytes
        )


def _block_level(q: int, m: int, world: int) -> Level:
    """Whether every block of q consecutive ranks stays inside one node of m."""
    starts = np.arange(0, world, q)
    crosses = (starts // m) != ((starts + q - 1) // m)
    return "inter" if crosses.any() else "intra"


def weight_gathers(layer: LayerSpec, cluster: Cluster, r: int) -> list[Gather]:
    """The parameter all-gathers strategy r issues (``Executor._gather`` and
    ``_full_down_bias``), with the shard shapes of ``experts.Experts``."""
    w, m = cluster.world, cluster.ranks_per_node
    if w == 1:
        return []
    lay = layer.layout(w)
    e_l, h_l, d, b = lay.experts_per_rank, lay.hidden_per_rank, layer.d_model, layer.itemsize
    halves = 2 if layer.glu else 1
    out = []
    group = None
    if r == 0:
        group = (e_l, w, "inter" if cluster.nodes > 1 else "intra")
    elif lay.shards // r > 1:
        q = lay.shards // r
        group = (1, q, _block_level(q, m, w))
    if group is not None:
        n, ranks, level = group
        out.append(Gather("w1", n * halves * h_l * d * b, ranks, level))
        if layer.bias:
            out.append(Gather("b1", n * halves * h_l * b, ranks, level))
        out.append(Gather("down_proj", n * d * h_l * b, ranks, level))
    if layer.bias:
        level = "inter" if cluster.nodes > 1 else "intra"
        out.append(Gather("down_proj_bias", e_l * (d // lay.shards) * b, w, level))
    return out


def count_gather(layer: LayerSpec, cluster: Cluster) -> Gather:
    """The layer's per-forward exchange of kept and demanded counts ([2E] int64)."""
    level = "inter" if cluster.nodes > 1 else "intra"
    return Gather("counts", 2 * layer.num_experts * 8, cluster.world, level, backward=False)


# ---- the strategy's time ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CostBreakdown:
    """Predicted ms of one strategy: its parts (serial sums) and the total after overlap.

    Attributes:
        compute_ms: expert kernels, forward + backward (slowest rank per chunk).
        a2a_ms: token exchanges, 4 per chunk.
        gather_ms: weight all-gathers + reduce-scatters, count and bias gathers.
        hidden_ms: what pipelining hides (0 with degree 1 or ``Cluster.overlap`` 0).
        total_ms: compute + a2a + gather + host - hidden.
        host_ms: the host's per-forward planning when the caller gave it (``host_ms``).
    """

    compute_ms: float
    a2a_ms: float
    gather_ms: float
    hidden_ms: float
    total_ms: float
    host_ms: float = 0.0


def _pipeline(
    first: list[tuple[float, float]], compute: list[float], second: list[tuple[float, float]]
) -> float:
    """Makespan of the executor's schedule for one direction. Exchanges are (started
    part, in-line part): every ``first`` exchange's started part is queued in order on
    the communication queue; chunk i waits for its own, runs the in-line part and its
    compute, then starts its ``second`` exchange (queued behind everything already on
    the queue); at the end every ``second`` is waited for in order, in-line parts too."""
    comm, arrived = 0.0, []
    for started, _ in first:
        comm += started
        arrived.append(comm)
    t, back = 0.0, []
    for (_, inline), c, (started, _), ready in zip(first, compute, second, arrived):
        t = max(t, ready) + inline + c
        comm = max(comm, t) + started
        back.append(comm)
    for (_, inline), ready in zip(second, back):
        t = max(t, ready) + inline
    return t


def kernel_ms(compute: ComputeModel, kernel: str, rows: np.ndarray, hidden: int) -> float:
    """One rank's kernel time for ``rows`` [n] per local expert, as each kernel handles
    uneven experts (the profile is measured with even ones): ``bmm`` pads every expert
    to the largest; ``loop`` runs them one by one (each 1/n of an n-expert run at its
    rows); the grouped kernels (``scatter``, ``grouped_mm``) cost as their mean."""
    n = len(rows)
    if kernel == "bmm":
        return compute.time_ms(kernel, n, float(rows.max()), hidden)
    if kernel == "loop":
        return sum(compute.time_ms(kernel, n, float(r), hidden) for r in rows) / n
    return compute.time_ms(kernel, n, float(rows.mean()), hidden)


def _compute_ms(compute: ComputeModel, kernel: str, rows: np.ndarray, hidden: int) -> float:
    """The slowest rank's kernel time; ``rows`` [W, n] per rank and local expert."""
    # one local expert (s > 1): a 1-D unique, far cheaper than unique rows
    distinct = np.unique(rows[:, 0])[:, None] if rows.shape[1] == 1 else np.unique(rows, axis=0)
    return max(kernel_ms(compute, kernel, r, hidden) for r in distinct)


def expert_rows(
    counts: np.ndarray | Runs, layout: ShardLayout, r: int, degree: int
) -> list[np.ndarray]:
    """Per chunk: [W, n] rows every rank receives for each of its n local experts
    (the ``recv_counts`` of ``build_plan``'s chunks, for all ranks at once)."""
    runs = counts if isinstance(counts, Runs) else Runs.of(counts)
    w, s, lens = layout.world, layout.shards, runs.lengths
    if s == 1:
        blocks = runs.rows.reshape(-1, w, layout.experts_per_rank)  # [run, dst, local expert]
        return [np.tensordot(lens, _part_len(blocks, degree, i), 1) for i in range(degree)]
    return [(lens @ c.rows)[:, None] for c in dispatch_runs(runs, layout, r, degree)]


def strategy_cost(
    layer: LayerSpec,
    cluster: Cluster,
    compute: ComputeModel,
    strategy: Strategy,
    counts: np.ndarray | Runs,
    *,
    chunk_sizes: list[np.ndarray] | None = None,
    host_ms: float = 0.0,
    cache: dict[tuple[int, int, str], Exchanges] | None = None,
) -> CostBreakdown:
    """Predicted forward + backward time of ``strategy`` for ``counts`` [W, E] (dense,
    or its ``Runs``).

    ``chunk_sizes`` (r >= 1): the chunks' [W, W] row matrices when the caller has them
    (e.g. from ``build_plan``), evaluated densely (``reference``); default the rank
    classes of ``grouped``, the same numbers in O(W) memory. ``cache``: a dict shared by
    calls with the same layer, cluster and counts, so the exchanges of one (r, degree,
    algorithm) are computed once for every kernel. ``host_ms``: the host's planning time
    of this strategy per forward (``measure_host_ms``), added in line: the forward waits
    for its plan."""
    w = cluster.world
    lay = layer.layout(w)
    if strategy.r not in lay.valid_r():
        raise ValueError(f"strategy {strategy}: r must be one of {lay.valid_r()} on W={w}")
    runs = counts if isinstance(counts, Runs) else Runs.of(counts)
    links = cluster.links
    gathers = weight_gathers(layer, cluster, strategy.r)
    backward = 3 if cluster.backend == "gloo" else 2  # all-gather + reduce-scatter
    gather_s = sum(g.seconds(links) * (backward if g.backward else 1) for g in gathers)
    gather_s += count_gather(layer, cluster).seconds(links) if w > 1 else 0.0
    if strategy.r == 0 or w == 1:
        # every rank runs all E experts on its own rows: counts [W, E], one row per run
        comp = _compute_ms(compute, strategy.kernel, runs.rows, layer.d_ff)
        total = comp + gather_s * 1e3 + host_ms
        return CostBreakdown(comp, 0.0, gather_s * 1e3, 0.0, total, host_ms)
    key = (strategy.r, strategy.degree, strategy.a2a)
    ex = cache.get(key) if cache is not None and chunk_sizes is None else None
    if ex is None:
        ex = _exchanges(layer, cluster, strategy, runs, chunk_sizes)
        if cache is not None and chunk_sizes is None:
            cache[key] = ex
    hidden = layer.d_ff if lay.shards == 1 else layer.d_ff // strategy.r
    comp = [_compute_ms(compute, strategy.kernel, rows, hidden) for rows in ex.recv_rows]
    # Forward: dispatch (go), compute, return (back). Backward: the return's reverse,
    # which is the dispatch plan again (go), the kernels' backward, then the dispatch's
    # reverse (back).
    fwd_share, bwd_share = 1 / 3, 2 / 3  # forward ~1/3 of the kernel FLOPs, backward 2/3
    comp_f = [c * fwd_share for c in comp]
    comp_b = [c * bwd_share for c in comp]
    serial_a2a = 2 * sum(a + b for a, b in [*ex.go, *ex.back])
    piped = _pipeline(ex.go, comp_f, ex.back) + _pipeline(ex.go, comp_b, ex.back)
    hidden_ms = cluster.overlap * (serial_a2a + sum(comp) - piped)
    piped = serial_a2a + sum(comp) - hidden_ms
    total = piped + gather_s * 1e3 + host_ms
    return CostBreakdown(sum(comp), serial_a2a, gather_s * 1e3, hidden_ms, total, host_ms)


def _exchanges(
    layer: LayerSpec,
    cluster: Cluster,
    strategy: Strategy,
    runs: Runs,
    chunk_sizes: list[np.ndarray] | None,
) -> Exchanges:
    """Every chunk's dispatch and return: dense when the chunks are given, else on the
    rank classes of ``runs``."""
    lay, m, links = layer.layout(cluster.world), cluster.ranks_per_node, cluster.links
    row_bytes, algo = layer.d_model * layer.itemsize, strategy.a2a
    recv = expert_rows(runs, lay, strategy.r, strategy.degree)
    if chunk_sizes is not None:
        dense = reference.dense_exchanges(chunk_sizes, m, links, algo, row_bytes)
        return dataclasses.replace(dense, recv_rows=recv)
    parts = [
        grouped.exchange_ms(c, m, links, algo, row_bytes)
        for c in dispatch_runs(runs, lay, strategy.r, strategy.degree)
    ]
    return Exchanges([go for go, _ in parts], [back for _, back in parts], recv)


def measure_host_ms(
    layer: LayerSpec,
    cluster: Cluster,
    counts: np.ndarray | Runs,
    strategy: Strategy,
    repeats: int = 3,
) -> float:
    """This host's time (median ms) of the executor's per-forward planning for rank 0:
    ``build_plan`` and, per chunk, ``prepare_exchange`` (the dispatch and its return).
    O(W^2) Python in ``build_plan``: seconds per forward at W in the thousands."""
    # The executor's modules load torch: imported here, so planning without
    # measuring the host stays torch-free.
    import torch

    from adaptive_moe.comm.alltoall import prepare_exchange
    from adaptive_moe.comm.mesh import Mesh
    from adaptive_moe.core.transfer import HostBatch
    from adaptive_moe.runtime.dispatch.plan import build_plan

    w, m = cluster.world, cluster.ranks_per_node
    if strategy.r == 0 or w == 1:
        return 0.0
    lay = layer.layout(w, 0)
    mesh = Mesh(None, w, 0, m, w // m, 0, 0, None, None, lay.shards, {}, ())
    cpu = torch.device("cpu")
    dense = counts.dense() if isinstance(counts, Runs) else np.asarray(counts, dtype=np.int64)
    rows = dense.tolist()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        batch = HostBatch()
        for chunk in build_plan(rows, lay, strategy.r, strategy.degree):
            prepare_exchange(chunk.sizes, mesh, strategy.a2a, batch)
        batch.upload(cpu)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))

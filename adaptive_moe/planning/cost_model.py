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
import time
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

from adaptive_moe.comm.alltoall import prepare_exchange
from adaptive_moe.comm.mesh import Mesh
from adaptive_moe.core.checks import positive_int
from adaptive_moe.core.dtypes import DTYPES, TORCH_DTYPES
from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.core.transfer import HostBatch
from adaptive_moe.planning.kernel_profile import ComputeModel
from adaptive_moe.planning.links import Link, LinkModel
from adaptive_moe.runtime.dispatch import build_plan

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
        return TORCH_DTYPES[self.dtype].itemsize

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


def workload_counts(
    world: int, num_experts: int, top_k: int, tokens: int, max_tokens: int
) -> np.ndarray:
    """counts [W, E] of the profiler's synthetic workload, without drawing it: expert 0
    gets ``max_tokens`` rows, the others share the rest as evenly as possible, and every
    expert's rows come from the ranks in balanced parts (what the profiler's shuffled
    routing gives on average)."""
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
    src = np.arange(world)[:, None]  # [W, 1]
    return _part_len(per_expert[None, :], world, src)  # [W, E]


def dispatch_sizes(
    counts: np.ndarray, layout: ShardLayout, r: int, degree: int
) -> Iterator[np.ndarray]:
    """The [W, W] row matrix of every chunk of strategy (r >= 1, degree): chunk i's
    ``build_plan(...).chunks[i].sizes``, computed for all ranks at once."""
    w, s = layout.world, layout.shards
    if r < 1 or s % r:
        raise ValueError(f"r={r} is not an exchange strategy for shard count {s}")
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape != (w, layout.num_experts):
        raise ValueError(f"counts must be [W={w}, E={layout.num_experts}], got {counts.shape}")
    if s == 1:
        blocks = counts.reshape(w, w, layout.experts_per_rank)  # [src, dst, local expert]
        for i in range(degree):
            yield _part_len(blocks, degree, i).sum(-1)
        return
    q = s // r
    dst = np.arange(w)
    rows = counts[:, dst // s]  # [src, dst]: rows of dst's expert
    block = _part_len(rows, q, (dst % s) % q)  # part m of q of those rows
    for i in range(degree):
        yield _part_len(block, degree, i)


# ---- collectives ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
    """One all_to_all_single of an exchange, on every rank at once.

    Attributes:
        axis: ``"group"`` (all W ranks), ``"intra"`` (my node) or ``"inter"`` (my local
            index on every node), as in ``comm.alltoall``.
        send, recv: [W, G] rows each rank sends to / receives from each rank of its
            axis group (G = W, m or N), in that group's rank order.
        reorder: the stage reorders its rows first (2DH), a device copy.
    """

    axis: str
    send: np.ndarray
    recv: np.ndarray
    reorder: bool


def exchange_stages(sizes: np.ndarray, ranks_per_node: int, algo: str) -> list[Stage]:
    """The stages ``plan_exchange(sizes, mesh, algo)`` runs, for every rank at once."""
    sizes = np.asarray(sizes, dtype=np.int64)
    w, m = sizes.shape[0], ranks_per_node
    if w == 1:
        return []
    if algo == "linear" or not 1 < m < w:
        return [Stage("group", sizes, sizes.T, False)]
    n = w // m
    blocks = sizes.reshape(n, m, n, m)  # [src node, src local, dst node, dst local]
    # stage 1, rank (a, i): to local peer j every chunk for local index j
    send1 = blocks.sum(2).reshape(w, m)  # [a*m+i, j]
    recv1 = blocks.sum(2).transpose(0, 2, 1).reshape(w, m)  # [a*m+l, i]
    # stage 2, rank (a, l): to node b every chunk held for it
    send2 = blocks.sum(1).transpose(0, 2, 1).reshape(w, n)  # [a*m+l, b]
    recv2 = blocks.sum(1).transpose(1, 2, 0).reshape(w, n)  # [b*m+l, a]
    return [Stage("intra", send1, recv1, True), Stage("inter", send2, recv2, True)]


def _split(mat: np.ndarray, axis: str, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per rank of a [W, G] stage matrix: (to itself, to other ranks of its node, to
    ranks of other nodes), each [W]."""
    w = mat.shape[0]
    g = np.arange(w)
    if axis == "intra":
        own = mat[g, g % m]
        return own, mat.sum(1) - own, np.zeros(w, dtype=mat.dtype)
    if axis == "inter":
        own = mat[g, g // m]
        return own, np.zeros(w, dtype=mat.dtype), mat.sum(1) - own
    own = mat[g, g]
    node = mat.reshape(w, w // m, m)[g, g // m].sum(1)  # [W]: to the ranks of my node
    return own, node - own, mat.sum(1) - node


def stage_seconds(stage: Stage, ranks_per_node: int, row_bytes: int, links: LinkModel) -> float:
    """The slowest rank's time of one stage (0 when no rank moves a row)."""
    send, recv = stage.send, stage.recv
    if not send.any():
        return 0.0
    m = ranks_per_node
    own, s_intra, s_inter = _split(send, stage.axis, m)
    _, r_intra, r_inter = _split(recv, stage.axis, m)
    send_nz, recv_nz = (send > 0).astype(np.int64), (recv > 0).astype(np.int64)
    _, n_intra, n_inter = _split(send_nz, stage.axis, m)
    _, nr_intra, nr_inter = _split(recv_nz, stage.axis, m)
    intra, inter = links.intra, links.inter
    latency = (
        np.maximum(n_intra, nr_intra) * intra.alpha_us
        + np.maximum(n_inter, nr_inter) * inter.alpha_us
    ) * 1e-6
    bandwidth = np.maximum(
        np.maximum(s_intra, r_intra) * row_bytes / (intra.bandwidth_GBps * 1e9),
        np.maximum(s_inter, r_inter) * row_bytes / (inter.bandwidth_GBps * 1e9),
    )
    copied = own + (send.sum(1) if stage.reorder else 0)  # self-send, 2DH reorder
    copies = 2 * copied * row_bytes / (links.copy_GBps * 1e9)
    return links.call_us * 1e-6 + float((latency + bandwidth + copies).max())


def exchange_parts(
    sizes: np.ndarray, cluster: Cluster, algo: str, row_bytes: int
) -> tuple[float, float]:
    """(first stage, the rest) of one exchange of ``sizes`` rows, in seconds:
    ``exchange_start`` launches the first stage asynchronously, ``wait`` runs the rest
    (2DH's reorder and inter-node stage) in line."""
    stages = exchange_stages(sizes, cluster.ranks_per_node, algo)
    t = [stage_seconds(s, cluster.ranks_per_node, row_bytes, cluster.links) for s in stages]
    return (t[0], sum(t[1:])) if t else (0.0, 0.0)


def exchange_seconds(sizes: np.ndarray, cluster: Cluster, algo: str, row_bytes: int) -> float:
    """One exchange of ``sizes`` rows (all its stages)."""
    return sum(exchange_parts(sizes, cluster, algo, row_bytes))


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
        return links.call_us * 1e-6 + (self.ranks - 1) * link.seconds(1, self.shard_bytes)


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
    return max(kernel_ms(compute, kernel, r, hidden) for r in np.unique(rows, axis=0))


def expert_rows(counts: np.ndarray, layout: ShardLayout, r: int, degree: int) -> list[np.ndarray]:
    """Per chunk: [W, n] rows every rank receives for each of its n local experts
    (the ``recv_counts`` of ``build_plan``'s chunks, for all ranks at once)."""
    w, s = layout.world, layout.shards
    if s == 1:
        blocks = counts.reshape(w, w, layout.experts_per_rank)  # [src, dst, local expert]
        return [_part_len(blocks, degree, i).sum(0) for i in range(degree)]
    return [c.sum(0)[:, None] for c in dispatch_sizes(counts, layout, r, degree)]


def strategy_cost(
    layer: LayerSpec,
    cluster: Cluster,
    compute: ComputeModel,
    strategy: Strategy,
    counts: np.ndarray,
    *,
    chunk_sizes: list[np.ndarray] | None = None,
    host_ms: float = 0.0,
    cache: dict[tuple[int, int, str], _Exchanges] | None = None,
) -> CostBreakdown:
    """Predicted forward + backward time of ``strategy`` for ``counts`` [W, E].

    ``chunk_sizes`` (r >= 1): the chunks' [W, W] row matrices when the caller has them
    (e.g. from ``build_plan``); default ``dispatch_sizes``. ``cache``: a dict shared by
    calls with the same layer, cluster and counts, so the exchanges of one (r, degree,
    algorithm) are computed once for every kernel. ``host_ms``: the host's planning time
    of this strategy per forward (``measure_host_ms``), added in line: the forward waits
    for its plan."""
    w = cluster.world
    lay = layer.layout(w)
    if strategy.r not in lay.valid_r():
        raise ValueError(f"strategy {strategy}: r must be one of {lay.valid_r()} on W={w}")
    counts = np.asarray(counts, dtype=np.int64)
    links = cluster.links
    gathers = weight_gathers(layer, cluster, strategy.r)
    backward = 3 if cluster.backend == "gloo" else 2  # all-gather + reduce-scatter
    gather_s = sum(g.seconds(links) * (backward if g.backward else 1) for g in gathers)
    gather_s += count_gather(layer, cluster).seconds(links) if w > 1 else 0.0
    if strategy.r == 0 or w == 1:
        # every rank runs all E experts on its own rows: counts [W, E]
        comp = _compute_ms(compute, strategy.kernel, counts, layer.d_ff)
        total = comp + gather_s * 1e3 + host_ms
        return CostBreakdown(comp, 0.0, gather_s * 1e3, 0.0, total, host_ms)
    key = (strategy.r, strategy.degree, strategy.a2a)
    ex = cache.get(key) if cache is not None and chunk_sizes is None else None
    if ex is None:
        if chunk_sizes is None:
            chunk_sizes = list(dispatch_sizes(counts, lay, strategy.r, strategy.degree))
        ex = _exchanges(chunk_sizes, cluster, strategy.a2a, layer.d_model * layer.itemsize)
        ex = dataclasses.replace(
            ex, recv_rows=expert_rows(counts, lay, strategy.r, strategy.degree)
        )
        if cache is not None:
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


def measure_host_ms(
    layer: LayerSpec, cluster: Cluster, counts: np.ndarray, strategy: Strategy, repeats: int = 3
) -> float:
    """This host's time (median ms) of the executor's per-forward planning for rank 0:
    ``build_plan`` and, per chunk, ``prepare_exchange`` (the dispatch and its return).
    O(W^2) Python in ``build_plan``: seconds per forward at W in the thousands."""
    w, m = cluster.world, cluster.ranks_per_node
    if strategy.r == 0 or w == 1:
        return 0.0
    lay = layer.layout(w, 0)
    mesh = Mesh(None, w, 0, m, w // m, 0, 0, None, None, lay.shards, {}, ())
    cpu = torch.device("cpu")
    rows = np.asarray(counts, dtype=np.int64).tolist()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        batch = HostBatch()
        for chunk in build_plan(rows, lay, strategy.r, strategy.degree):
            prepare_exchange(chunk.sizes, mesh, strategy.a2a, batch)
        batch.upload(cpu)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


@dataclasses.dataclass(frozen=True)
class _Exchanges:
    """Per chunk: dispatch and return ms as (started, in line), and every rank's
    received rows per local expert [W, n]."""

    go: list[tuple[float, float]]
    back: list[tuple[float, float]]
    recv_rows: list[np.ndarray]


def _exchanges(chunks: list[np.ndarray], cluster: Cluster, algo: str, row_bytes: int) -> _Exchanges:
    ms = lambda sizes: tuple(t * 1e3 for t in exchange_parts(sizes, cluster, algo, row_bytes))
    go = [ms(c) for c in chunks]
    m, w = cluster.ranks_per_node, cluster.world
    if algo == "linear" or not 1 < m < w:
        back = go  # the model is symmetric in sent / received: the inverse costs the same
    else:
        back = [ms(c.T) for c in chunks]
    return _Exchanges(go, back, [c.sum(0)[:, None] for c in chunks])

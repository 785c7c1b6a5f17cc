"""The exchanges evaluated on rank classes: what the planner runs at any world size.

The profiler's synthetic workload gives rank a the counts row ``base + (a < x_e)``
per expert (``cost_model.workload_runs``): ranks in one run between two thresholds
``x_e`` send the same row. Every chunk's [W, W] row matrix is then K distinct rows
(K <= 5), one per run of ranks (``Runs``), and each stage's per-rank sums (to itself,
its node, other nodes; non-empty messages per level) have closed forms over the runs:
a rank's own row summed per node, or a column weighted by how many ranks of each run
sit on my node. O(K (W + E) + W m) memory and time per chunk instead of O(W^2);
``reference`` builds the dense matrices and a test holds the two equal.

Notation: K runs, cls [W] the run of each rank, m ranks per node, N = W / m nodes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from adaptive_moe.planning.links import LinkModel
from adaptive_moe.planning.stages import Side, stage_seconds


@dataclasses.dataclass(frozen=True)
class Runs:
    """A [W, G] matrix whose rows repeat in runs of consecutive ranks: ranks
    ``starts[k] <= a < starts[k + 1]`` all have row ``rows[k]``.

    Attributes:
        starts: [K + 1] increasing, from 0 to W.
        rows: [K, G].
    """

    starts: np.ndarray
    rows: np.ndarray

    @property
    def world(self) -> int:
        return int(self.starts[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)  # [K]

    def classes(self) -> np.ndarray:
        """cls [W]: the run of every rank."""
        return np.repeat(np.arange(len(self.rows)), self.lengths)

    def dense(self) -> np.ndarray:
        return np.repeat(self.rows, self.lengths, axis=0)  # [W, G]

    def with_rows(self, rows: np.ndarray) -> Runs:
        """The same runs of ranks with other rows (e.g. the chunk a counts row sends)."""
        return Runs(self.starts, rows)

    @classmethod
    def of(cls, mat: np.ndarray) -> Runs:
        """The runs of equal consecutive rows of a dense [W, G] matrix."""
        mat = np.asarray(mat, dtype=np.int64)
        change = np.flatnonzero((np.diff(mat, axis=0) != 0).any(axis=1)) + 1
        starts = np.concatenate([[0], change, [len(mat)]])
        return cls(starts, mat[starts[:-1]])


def _rows_side(p: np.ndarray, c: np.ndarray, axis: str, m: int) -> Side:
    """The ``Side`` of a stage matrix X [W, G] with X[a] = p[c[a]] (p [C, G])."""
    w = c.shape[0]
    a = np.arange(w)
    nz = (p > 0).astype(np.int64)
    tot, ntot = p.sum(1)[c], nz.sum(1)[c]
    own_at = {"intra": a % m, "inter": a // m, "group": a}[axis]
    own, own_nz = p[c, own_at], nz[c, own_at]
    zero = np.zeros(w, dtype=np.int64)
    if axis == "intra":
        return Side(own, tot - own, zero, ntot - own_nz, zero)
    if axis == "inter":
        return Side(own, zero, tot - own, zero, ntot - own_nz)
    n = p.shape[1] // m
    node = p.reshape(-1, n, m).sum(2)[c, a // m]  # [W]: to the ranks of my node
    node_nz = nz.reshape(-1, n, m).sum(2)[c, a // m]
    return Side(own, node - own, tot - node, node_nz - own_nz, ntot - node_nz)


def _cols_side_group(q: np.ndarray, c: np.ndarray, m: int) -> Side:
    """The ``Side`` of X [W, W] with X[d, a] = q[c[a], d] (q [C, W]): what rank d
    receives from every rank a, when a's row depends only on a's run."""
    w = c.shape[0]
    d = np.arange(w)
    classes = q.shape[0]
    n = w // m
    lens = np.bincount(c, minlength=classes)  # [C]
    per_node = np.bincount(c * n + d // m, minlength=classes * n).reshape(classes, n)
    mine = per_node[:, d // m]  # [C, W]: ranks of each class on d's node
    nz = (q > 0).astype(np.int64)
    tot, ntot = lens @ q, lens @ nz  # [W]
    node, node_nz = (mine * q).sum(0), (mine * nz).sum(0)
    own, own_nz = q[c, d], nz[c, d]
    return Side(own, node - own, tot - node, node_nz - own_nz, ntot - node_nz)


def _cols_side_inter(q: np.ndarray, c: np.ndarray, m: int) -> Side:
    """The ``Side`` of an inter-axis X [W, N] with X[(B, l), A] = q[c[A m + l], B]
    (q [C, N]): rank (B, l) gets from node A's rank of local index l a value set by
    that rank's class."""
    w = c.shape[0]
    d = np.arange(w)
    classes = q.shape[0]
    local, node = d % m, d // m
    # how many nodes' rank of local index l is of each class
    cnt = np.bincount(c * m + local, minlength=classes * m).reshape(classes, m)  # [C, m]
    # integer einsum, not a BLAS matmul: exact, and no thread pool on a busy host
    tot = np.einsum("cl,cb->lb", cnt, q)[local, node]  # [W]
    ntot = np.einsum("cl,cb->lb", cnt, (q > 0).astype(np.int64))[local, node]
    own, own_nz = q[c, node], (q[c, node] > 0)
    zero = np.zeros(w, dtype=np.int64)
    return Side(own, zero, tot - own, zero, ntot - own_nz)


def _node_mixes(runs: Runs, m: int) -> tuple[np.ndarray, np.ndarray]:
    """([U, K] how many ranks of each run a node holds, [N] which of those U mixes
    each node has). A node inside one run holds m of it; only the nodes a run
    boundary cuts hold several runs, each of those gets a mix of its own."""
    starts, k = runs.starts, len(runs.rows)
    cut = np.unique(starts[1:-1][starts[1:-1] % m != 0] // m)  # nodes with a boundary inside
    of_node = np.repeat(np.arange(k), runs.lengths)[::m].copy()  # each node's first run
    ranks = cut[:, None] * m + np.arange(m)  # [cuts, m]
    held = np.searchsorted(starts, ranks, side="right") - 1  # run of each of their ranks
    mixed = np.zeros((len(cut), k), dtype=np.int64)
    np.add.at(mixed, (np.arange(len(cut))[:, None], held), 1)  # [cuts, K]
    of_node[cut] = k + np.arange(len(cut))
    return np.concatenate([m * np.eye(k, dtype=np.int64), mixed]), of_node


def _swap_local(x: np.ndarray, m: int) -> np.ndarray:
    """[W, m] X[(A, l), i] -> Y[(A, i), l]: what the intra stage's peers receive."""
    w = x.shape[0]
    return x.reshape(w // m, m, m).transpose(0, 2, 1).reshape(w, m)


def exchange_ms(
    sizes: Runs, ranks_per_node: int, links: LinkModel, algo: str, row_bytes: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """The dispatch of ``sizes`` (rows [K, W]: what each run of ranks sends every
    rank) and its return (the transposed exchange), each (first stage, the rest) in
    ms, as ``reference.exchange_parts`` gives them for the dense matrix."""
    w, m = sizes.world, ranks_per_node
    if w == 1:
        return (0.0, 0.0), (0.0, 0.0)
    r, cls = sizes.rows, sizes.classes()
    if algo == "linear" or not 1 < m < w:
        t = stage_seconds(
            _rows_side(r, cls, "group", m), _cols_side_group(r, cls, m), False, row_bytes, links
        )
        # max(sent, received) per rank and level: the return costs the same
        return (t * 1e3, 0.0), (t * 1e3, 0.0)
    n, ranks = w // m, np.arange(w)
    r3 = r.reshape(-1, n, m)  # [K, dst node, dst local]
    # dispatch, stage 1: rank (A, i) sends local peer j all its rows for local index j
    p1 = r3.sum(1)  # [K, m]
    go1 = stage_seconds(
        _rows_side(p1, cls, "intra", m),
        _rows_side(_swap_local(p1[cls], m), ranks, "intra", m),
        True,
        row_bytes,
        links,
    )
    # stage 2: rank (A, l) sends node B what node A holds for (B, l); its rows depend
    # on how many ranks of each run node A has (its mix)
    mixes, mix_of_node = _node_mixes(sizes, m)  # [U, K], [N]
    p2 = np.einsum("uk,kbl->ulb", mixes, r3).reshape(-1, n)  # [U * m, N]
    c2 = mix_of_node[ranks // m] * m + ranks % m
    go2 = stage_seconds(
        _rows_side(p2, c2, "inter", m), _cols_side_inter(p2, c2, m), True, row_bytes, links
    )
    # return (the transposed matrix), stage 1: rank (A, i) sends local peer j what
    # every rank of local index j sent it
    per_local = np.bincount(cls * m + ranks % m, minlength=len(r) * m).reshape(-1, m)  # [K, m]
    x1 = r.T @ per_local  # [W, m]
    back1 = stage_seconds(
        _rows_side(x1, ranks, "intra", m),
        _rows_side(_swap_local(x1, m), ranks, "intra", m),
        True,
        row_bytes,
        links,
    )
    # stage 2: rank (A, l) sends node B what rank (B, l) sent all of node A
    to_node = r3.sum(2)  # [K, N]
    back2 = stage_seconds(
        _cols_side_inter(to_node, cls, m),
        _rows_side(to_node, cls, "inter", m),
        True,
        row_bytes,
        links,
    )
    return (go1 * 1e3, go2 * 1e3), (back1 * 1e3, back2 * 1e3)

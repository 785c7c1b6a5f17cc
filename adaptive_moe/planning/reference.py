"""The exchanges evaluated on dense [W, W] row matrices: the slow reference.

Every stage's send and receive matrix is built for every rank (``exchange_stages``
equals ``comm.alltoall.plan_exchange`` rank by rank, a test holds them equal), then
split per rank into its own, node and other-node rows (``split``). O(W^2) memory and
time per chunk; ``grouped`` computes the same numbers from rank classes and is
tested against this module at small W.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from adaptive_moe.planning.links import LinkModel
from adaptive_moe.planning.stages import Exchanges, Side, stage_seconds


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


def split(mat: np.ndarray, axis: str, m: int) -> Side:
    """Per rank of a [W, G] stage matrix: its ``Side``."""
    w = mat.shape[0]
    g = np.arange(w)
    nz = (mat > 0).astype(np.int64)
    zero = np.zeros(w, dtype=np.int64)
    if axis == "intra":
        own = mat[g, g % m]
        return Side(own, mat.sum(1) - own, zero, nz.sum(1) - nz[g, g % m], zero)
    if axis == "inter":
        own = mat[g, g // m]
        return Side(own, zero, mat.sum(1) - own, zero, nz.sum(1) - nz[g, g // m])
    own = mat[g, g]
    node = mat.reshape(w, w // m, m)[g, g // m].sum(1)  # [W]: to the ranks of my node
    node_nz = nz.reshape(w, w // m, m)[g, g // m].sum(1)
    return Side(own, node - own, mat.sum(1) - node, node_nz - nz[g, g], nz.sum(1) - node_nz)


def exchange_parts(
    sizes: np.ndarray, ranks_per_node: int, links: LinkModel, algo: str, row_bytes: int
) -> tuple[float, float]:
    """(first stage, the rest) of one exchange of ``sizes`` rows, in seconds:
    ``exchange_start`` launches the first stage asynchronously, ``wait`` runs the rest
    (2DH's reorder and inter-node stage) in line."""
    m = ranks_per_node
    t = [
        stage_seconds(
            split(s.send, s.axis, m), split(s.recv, s.axis, m), s.reorder, row_bytes, links
        )
        for s in exchange_stages(sizes, m, algo)
    ]
    return (t[0], sum(t[1:])) if t else (0.0, 0.0)


def exchange_seconds(
    sizes: np.ndarray, ranks_per_node: int, links: LinkModel, algo: str, row_bytes: int
) -> float:
    """One exchange of ``sizes`` rows (all its stages)."""
    return sum(exchange_parts(sizes, ranks_per_node, links, algo, row_bytes))


def dense_exchanges(
    chunks: list[np.ndarray], ranks_per_node: int, links: LinkModel, algo: str, row_bytes: int
) -> Exchanges:
    """Every chunk's dispatch and return from its [W, W] row matrix."""

    def ms(sizes: np.ndarray) -> tuple[float, float]:
        parts = exchange_parts(sizes, ranks_per_node, links, algo, row_bytes)
        return (parts[0] * 1e3, parts[1] * 1e3)

    return Exchanges(
        [ms(c) for c in chunks], [ms(c.T) for c in chunks], [c.sum(0)[:, None] for c in chunks]
    )

"""The time of one all_to_all_single stage from what every rank moves in it.

Both evaluations of the exchanges (``grouped``, the fast one the planner runs, and
``reference``, the dense [W, G] matrices it is tested against) reduce a stage to one
``Side`` per direction and price it here, so the two share one formula.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from adaptive_moe.planning.links import LinkModel


@dataclasses.dataclass(frozen=True)
class Side:
    """What each rank sends (or receives) in one stage, every field [W]: rows to
    itself, to the other ranks of its node, to ranks of other nodes, and the number
    of non-empty messages to each of the two levels."""

    own: np.ndarray
    intra: np.ndarray
    inter: np.ndarray
    n_intra: np.ndarray
    n_inter: np.ndarray

    @property
    def total(self) -> np.ndarray:
        return self.own + self.intra + self.inter


def stage_seconds(send: Side, recv: Side, reorder: bool, row_bytes: int, links: LinkModel) -> float:
    """The slowest rank's time of one stage (0 when no rank moves a row): the call,
    per level the latency of the larger of its sent and received message counts, all
    posted at once (``Link.posted_seconds``: all_to_all_single posts every send and
    receive before waiting, on NCCL and gloo), the bytes (the two levels move at
    once), and the local copies (self-send; 2DH's reorder)."""
    sent = send.total
    if not sent.any():
        return 0.0
    intra, inter = links.intra, links.inter
    latency = intra.posted_seconds(np.maximum(send.n_intra, recv.n_intra)) + inter.posted_seconds(
        np.maximum(send.n_inter, recv.n_inter)
    )
    bandwidth = np.maximum(
        np.maximum(send.intra, recv.intra) * row_bytes / (intra.bandwidth_GBps * 1e9),
        np.maximum(send.inter, recv.inter) * row_bytes / (inter.bandwidth_GBps * 1e9),
    )
    copied = send.own + (sent if reorder else 0)
    copies = 2 * copied * row_bytes / (links.copy_GBps * 1e9)
    return links.call_us * 1e-6 + float((latency + bandwidth + copies).max())


@dataclasses.dataclass(frozen=True)
class Exchanges:
    """Per chunk of one (r, degree, algorithm): the dispatch and its return in ms as
    (started, in line), and every rank's received rows per local expert [W, n]."""

    go: list[tuple[float, float]]
    back: list[tuple[float, float]]
    recv_rows: list[np.ndarray]

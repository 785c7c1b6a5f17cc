"""The training plot: loss and step time over steps, with strategy switches, resumes and
world-size changes marked and the validation losses as points.

Drawn with matplotlib's Agg canvas directly (no pyplot, so no global figure state and
no display needed). Input: the per-step records of ``metrics.jsonl`` (``step``, ``loss``,
``step_ms``, ``strategies``; optional ``skipped``, ``val_loss``, ``resumed``,
``world_size``).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import LogFormatter

# Least room in pixels between two switch labels (so that neighbours do not touch).
_LABEL_GAP_PX = 2.0


def _same_world(prev: dict[str, Any], cur: dict[str, Any]) -> bool:
    return prev.get("world_size") == cur.get("world_size")


def strategy_switches(records: Sequence[dict[str, Any]]) -> list[int]:
    """Steps at which any MoE layer ran a different strategy than at the step before, on
    the same world size (a resume on another world size runs other strategies by
    necessity: it is a world-size change, not a switch)."""
    out = []
    for prev, cur in itertools.pairwise(records):
        if cur["strategies"] != prev["strategies"] and _same_world(prev, cur):
            out.append(cur["step"])
    return out


def world_changes(records: Sequence[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """(step, old world size, new world size) where the world size changed (at a resume)."""
    return [
        (cur["step"], prev["world_size"], cur["world_size"])
        for prev, cur in itertools.pairwise(records)
        if not _same_world(prev, cur) and "world_size" in prev and "world_size" in cur
    ]


def training_figure(records: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """The figure of ``plot_training`` (axes: loss, then step time; laid out and drawn)."""
    if not records:
        raise ValueError("plot_training needs at least one metrics record, got none")
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(9, 6), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax_loss, ax_time = fig.subplots(2, 1, sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in records], color="tab:blue", lw=1.2, label="train loss")
    evals = [r for r in records if r.get("val_loss") is not None]
    if evals:
        ax_loss.plot(
            [r["step"] for r in evals],
            [r["val_loss"] for r in evals],
            "o",
            color="black",
            ms=5,
            label="val loss",
        )
    skipped = [r for r in records if r.get("skipped")]
    if skipped:
        ax_loss.plot(
            [r["step"] for r in skipped],
            [0.0] * len(skipped),
            "x",
            color="tab:red",
            label="skipped (non-finite)",
        )
    ax_loss.set_ylabel("loss (nats / byte)")
    ax_time.plot(steps, [r["step_ms"] for r in records], color="tab:green", lw=1.0)
    ax_time.set_yscale("log")
    # after set_yscale, which installs the scientific-notation formatters ("6x10^1")
    ax_time.yaxis.set_major_formatter(_PlainLogFormatter())
    ax_time.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))
    ax_time.set_ylabel("step time (ms)")
    ax_time.set_xlabel("step")
    _mark_restarts(records, (ax_loss, ax_time))
    switches = _mark_switches(records, (ax_loss, ax_time))
    ax_loss.legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.canvas.draw()  # lays the figure out, so that the switch labels can be placed
    fig.set_layout_engine("none")  # keep that layout: labels are placed against it
    _label_switches(records, switches, ax_time)
    return fig


def plot_training(
    records: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = ""
) -> Figure:
    """Write a PNG of loss and step time vs step (``skipped`` steps are red crosses,
    ``val_loss`` black points); return its figure."""
    fig = training_figure(records, title)
    fig.savefig(os.fspath(path), dpi=110)
    return fig


def _vline(axes: Sequence[Axes], step: int, label: str | None, **style: Any) -> None:
    """One vertical line at ``step`` on every axis; the legend entry on the first only."""
    for ax in axes:
        ax.axvline(step, label=label if ax is axes[0] else None, **style)


def _mark_restarts(records: Sequence[dict[str, Any]], axes: Sequence[Axes]) -> None:
    """Vertical lines where a run resumed (grey) and where the world size changed
    (purple), one legend entry each kind (each change for world sizes)."""
    changed = set()
    for step, old, new in world_changes(records):
        changed.add(step)
        _vline(axes, step, f"world size {old} -> {new}", color="tab:purple", ls="-.", lw=1.2)
    resumes = [r["step"] for r in records if r.get("resumed") and r["step"] not in changed]
    for i, step in enumerate(resumes):
        _vline(axes, step, "resumed" if i == 0 else None, color="tab:gray", ls=":", lw=1.2)


def _mark_switches(records: Sequence[dict[str, Any]], axes: Sequence[Axes]) -> list[int]:
    switches = strategy_switches(records)
    for i, step in enumerate(switches):
        label = f"strategy switch ({len(switches)})" if i == 0 else None
        _vline(axes, step, label, color="tab:orange", ls="--", lw=0.8)
    return switches


def _label_switches(records: Sequence[dict[str, Any]], switches: list[int], ax: Axes) -> None:
    """Name the new strategies at a switch where the label has room: left to right, a
    label overlapping one already placed is left out (its line stays)."""
    by_step = {r["step"]: r["strategies"] for r in records}
    renderer = ax.figure.canvas.get_renderer()
    placed: list[Text] = []
    for step in switches:
        text = ax.annotate(
            " | ".join(_compact(s) for s in by_step[step]),
            (step, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=6,
            va="top",
            ha="right",
            color="tab:orange",
        )
        box = text.get_window_extent(renderer).padded(_LABEL_GAP_PX)
        if any(box.overlaps(other.get_window_extent(renderer)) for other in placed):
            text.remove()
        else:
            placed.append(text)


class _PlainLogFormatter(LogFormatter):
    """Log-axis tick labels as plain decimals (``60``, ``0.5``), labelling the same ticks
    as matplotlib's default log formatter."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return _plain(x) if super().__call__(x, pos) else ""


def _plain(x: float) -> str:
    """``60``, ``2.5``, ``0.05``, ``1500``: enough decimals for two significant digits."""
    if x <= 0:
        return f"{x:g}"
    decimals = max(0, 1 - math.floor(math.log10(x)))
    text = f"{x:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _compact(strategy: str) -> str:
    """``r=1,linear,d=2,bmm`` -> ``r1,d2,bmm`` (``2dh`` is kept)."""
    return strategy.replace("=", "").replace("linear,", "")

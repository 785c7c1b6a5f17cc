"""The training plot: loss and step time over steps, with strategy switches marked.

Drawn with matplotlib's Agg canvas directly (no pyplot, so no global figure state and
no display needed). Input: the per-step records of ``metrics.jsonl``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_MAX_LABELLED_SWITCHES = 12


def strategy_switches(records: Sequence[dict[str, Any]]) -> list[int]:
    """Steps at which any MoE layer ran a different strategy than at the step before."""
    out = []
    for prev, cur in itertools.pairwise(records):
        if cur["strategies"] != prev["strategies"]:
            out.append(cur["step"])
    return out


def plot_training(
    records: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = ""
) -> None:
    """Write a PNG of loss and step time vs step (records need ``step``, ``loss``,
    ``step_ms``, ``strategies``; ``skipped`` steps are drawn as red crosses)."""
    if not records:
        raise ValueError("plot_training needs at least one metrics record, got none")
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(9, 6), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax_loss, ax_time = fig.subplots(2, 1, sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in records], color="tab:blue", lw=1.2, label="train loss")
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
    ax_time.set_ylabel("step time (ms)")
    ax_time.set_xlabel("step")
    _mark_switches(records, (ax_loss, ax_time))
    ax_loss.legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(os.fspath(path), dpi=110)


def _mark_switches(records: Sequence[dict[str, Any]], axes: Sequence[Any]) -> None:
    by_step = {r["step"]: r["strategies"] for r in records}
    switches = strategy_switches(records)
    for i, step in enumerate(switches):
        for ax in axes:
            ax.axvline(
                step,
                color="tab:orange",
                ls="--",
                lw=0.8,
                label="strategy switch" if i == 0 and ax is axes[0] else None,
            )
        if len(switches) <= _MAX_LABELLED_SWITCHES:
            label = " | ".join(_compact(s) for s in by_step[step])
            axes[-1].annotate(
                label,
                (step, 1.0),
                xycoords=("data", "axes fraction"),
                rotation=90,
                fontsize=6,
                va="top",
                ha="right",
                color="tab:orange",
            )


def _compact(strategy: str) -> str:
    """``r=1,linear,d=2,bmm`` -> ``r1,d2,bmm`` (``2dh`` is kept)."""
    return strategy.replace("=", "").replace("linear,", "")

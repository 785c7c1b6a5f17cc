"""Predicted time per strategy family against world size, and the best strategy over
(world size, tokens per rank) (matplotlib Agg, no pyplot).

One line per family, each at its best pipelining degree and kernel: r = 0 (DP), r = 1
(EP+DP) linear and 2DH, r = s (EP+MP, where s > 1) linear and 2DH, and the best of all.
Every world size runs the same layer on a balanced workload of ``tokens`` per rank
(weak scaling, as Tutel's scaling figures).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from tqdm import tqdm

from adaptive_moe.core.strategy import Strategy
from adaptive_moe.planning.cost_model import Cluster, LayerSpec, workload_runs
from adaptive_moe.planning.kernel_profile import ComputeModel
from adaptive_moe.planning.planner import candidate_strategies, predict_bucket

Curves = dict[str, dict[int, tuple[Strategy, float]]]


def _family(strategy: Strategy, shards: int) -> str | None:
    if strategy.r == 0:
        return "r=0 (DP)"
    if strategy.r == 1:
        return f"r=1 (EP+DP) {strategy.a2a}"
    if strategy.r == shards:
        return f"r=s (EP+MP) {strategy.a2a}"
    return None


def scaling_curves(
    layer: LayerSpec,
    cluster_of: Callable[[int], Cluster],
    compute: ComputeModel,
    worlds: Sequence[int],
    tokens: int,
    kernels: Sequence[str] | None = None,
    max_degree: int | None = None,
    progress: bool = True,
) -> tuple[Curves, list[int]]:
    """Family -> world -> (best strategy of the family, its ms), and the world sizes
    left out because the layer's E or the ranks per node do not fit them."""
    curves: Curves = {}
    skipped = []
    kernels = tuple(kernels) if kernels is not None else compute.kernels
    for w in tqdm(worlds, unit="world", desc="scaling", disable=not progress, dynamic_ncols=True):
        e = layer.num_experts
        try:
            cluster = cluster_of(w)  # ValueError when ranks_per_node does not divide w
            layer.layout(w)  # ValueError when E and w do not fit
        except ValueError:
            skipped.append(w)
            continue
        counts = workload_runs(w, e, layer.top_k, tokens, -(-w * tokens * layer.top_k // e))
        costs = predict_bucket(
            layer,
            cluster,
            compute,
            candidate_strategies(layer, cluster, kernels, max_degree),
            counts,
        )
        shards = layer.layout(w).shards
        for s, c in costs.items():
            for fam in (_family(s, shards), "best"):
                if fam is None:
                    continue
                line = curves.setdefault(fam, {})
                if w not in line or c.total_ms < line[w][1]:
                    line[w] = (s, c.total_ms)
    return curves, skipped


def plot_scaling(curves: Curves, path: str | os.PathLike[str], title: str = "") -> None:
    """Write the PNG of ``scaling_curves`` (log-log)."""
    if not curves:
        raise ValueError("plot_scaling needs at least one curve (no world size fits the layer?)")
    fig = Figure(figsize=(8, 5), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for fam, line in sorted(curves.items()):
        worlds = sorted(line)
        style = {"color": "black", "ls": "--", "lw": 2.0} if fam == "best" else {"marker": "o"}
        ax.plot(worlds, [line[w][1] for w in worlds], label=fam, **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPUs (world size)")
    ax.set_ylabel("predicted forward + backward (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(os.fspath(path), dpi=110)


# ---- best strategy over (world size, tokens per rank) -----------------------------------------

BestMap = dict[tuple[int, int], tuple[Strategy, float, float]]


def best_map(
    layer: LayerSpec,
    cluster_of: Callable[[int], Cluster],
    compute: ComputeModel,
    worlds: Sequence[int],
    tokens: Sequence[int],
    kernels: Sequence[str] | None = None,
    max_degree: int | None = None,
    progress: bool = True,
) -> tuple[BestMap, list[int]]:
    """(world, tokens per rank) -> (predicted best strategy, its ms, margin to the
    runner-up as a fraction) on the balanced workload, and the world sizes left out."""
    out: BestMap = {}
    skipped = []
    kernels = tuple(kernels) if kernels is not None else compute.kernels
    cells = [(w, t) for w in worlds for t in tokens]
    for w, t in tqdm(cells, unit="cell", desc="map", disable=not progress, dynamic_ncols=True):
        try:
            cluster = cluster_of(w)
            layer.layout(w)
        except ValueError:
            if w not in skipped:
                skipped.append(w)
            continue
        e = layer.num_experts
        counts = workload_runs(w, e, layer.top_k, t, -(-w * t * layer.top_k // e))
        strategies = candidate_strategies(layer, cluster, kernels, max_degree)
        costs = predict_bucket(layer, cluster, compute, strategies, counts)
        ranked = sorted(costs.items(), key=lambda kv: (kv[1].total_ms, kv[0]))
        best, t0 = ranked[0][0], ranked[0][1].total_ms
        t1 = ranked[1][1].total_ms if len(ranked) > 1 else t0
        out[(w, t)] = (best, t0, t1 / t0 - 1)
    return out, skipped


def _label(s: Strategy) -> str:
    return f"r={s.r} {s.a2a}" if s.r else "r=0 DP"


def plot_best_map(grid: BestMap, path: str | os.PathLike[str], title: str = "") -> None:
    """Write a PNG: one cell per (world size, tokens per rank), coloured by the best
    strategy's (r, algorithm), labelled with its degree, time and margin."""
    if not grid:
        raise ValueError("plot_best_map needs at least one cell (no world size fits the layer?)")
    worlds = sorted({w for w, _ in grid})
    tokens = sorted({t for _, t in grid})
    names = sorted({_label(s) for s, _, _ in grid.values()})
    code = np.full((len(tokens), len(worlds)), np.nan)  # [tokens, worlds]
    for (w, t), (s, _, _) in grid.items():
        code[tokens.index(t), worlds.index(w)] = names.index(_label(s))
    fig = Figure(figsize=(1.2 * len(worlds) + 3, 0.8 * len(tokens) + 2), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab10"].resampled(max(len(names), 1))
    ax.imshow(code, cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, aspect="auto", origin="lower")
    for (w, t), (s, ms, margin) in grid.items():
        text = f"d={s.degree}\n{ms:.3g} ms\n+{margin * 100:.1f}%"
        ax.text(worlds.index(w), tokens.index(t), text, ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(worlds)), [str(w) for w in worlds])
    ax.set_yticks(range(len(tokens)), [str(t) for t in tokens])
    ax.set_xlabel("GPUs (world size)")
    ax.set_ylabel("tokens per rank")
    handles = [Patch(color=cmap(i), label=n) for i, n in enumerate(names)]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title + "\ncell: degree, predicted ms, margin to the runner-up", fontsize=9)
    fig.savefig(os.fspath(path), dpi=110)

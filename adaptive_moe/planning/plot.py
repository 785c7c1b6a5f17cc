"""Predicted time per strategy family against world size (matplotlib Agg, no pyplot).

One line per family, each at its best pipelining degree and kernel: r = 0 (DP), r = 1
(EP+DP) linear and 2DH, r = s (EP+MP, where s > 1) linear and 2DH, and the best of all.
Every world size runs the same layer on a balanced workload of ``tokens`` per rank
(weak scaling, as Tutel's scaling figures).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
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

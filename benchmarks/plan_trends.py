"""The cost model's scaling trends with the default published figures (no measurement).

    python -m benchmarks.plan_trends

Prints (markdown) the token all-to-all time, linear vs 2DH, of Tutel's Fig. 14 layer
(d = h = 2048, 2 experts per GPU, k = 2, bf16, balanced) from 16 to 2048 GPUs with
the A100 (ND96amsr) and H100 (NDR) figures, and the predicted best r for small and
large experts at low and high capacity. ``tests/test_planning_trends.py`` asserts the
same trends.
"""

from __future__ import annotations

import dataclasses

from adaptive_moe.core.strategy import Strategy
from adaptive_moe.planning.cost_model import (
    Cluster,
    LayerSpec,
    dispatch_runs,
    strategy_cost,
    workload_counts,
    workload_runs,
)
from adaptive_moe.planning.grouped import exchange_ms
from adaptive_moe.planning.kernel_profile import roofline
from adaptive_moe.planning.links import PRESETS, LinkModel
from adaptive_moe.planning.planner import candidate_strategies, predict_bucket

WORLDS = (16, 32, 64, 128, 256, 512, 1024, 2048)


def a2a_table() -> str:
    lines = [
        "| figures | tokens/GPU (MiB sent per rank) | "
        + " | ".join(f"W={w}" for w in WORLDS)
        + " |",
        "|---|---|" + "---:|" * len(WORLDS),
    ]
    for preset, dev in (("a100-ndv4", "a100"), ("h100-ndr", "h100")):
        for tokens in (1024, 16384):
            cells = []
            for w in WORLDS:
                layer = LayerSpec(2048, 2048, 2 * w, 2)
                cluster = Cluster(w, 8, PRESETS[preset])
                counts = workload_counts(w, 2 * w, 2, tokens, tokens)
                t = {
                    a: strategy_cost(
                        layer, cluster, roofline(dev, 2048), Strategy(1, a, 1, "scatter"), counts
                    ).a2a_ms
                    for a in ("linear", "2dh")
                }
                mark = "**" if t["2dh"] < t["linear"] else ""
                cells.append(f"{mark}{t['linear']:.1f} / {t['2dh']:.1f}{mark}")
            mib = tokens * 2 * 2048 * 2 / 2**20
            lines.append(f"| {preset} | {tokens} ({mib:.0f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def r_table() -> str:
    lines = [
        "| W (m=8) | E | d x h | tokens/GPU | predicted best | r=0 ms | best r>=1 ms |",
        "|---:|---:|---|---:|---|---:|---:|",
    ]
    cases = [(8, 16, 1024, 256, t) for t in (128, 1024, 8192)]
    cases += [(8, 16, 2048, 2048, 8192), (64, 64, 1024, 256, 8192)]
    cases += [(256, 64, 2048, 8192, t) for t in (128, 8192)]
    for w, e, d, h, tokens in cases:
        layer = LayerSpec(d, h, e, 2)
        cluster = Cluster(w, min(8, w), PRESETS["a100-ndv4"])
        counts = workload_counts(w, e, 2, tokens, -(-w * tokens * 2 // e))
        costs = predict_bucket(
            layer,
            cluster,
            roofline("a100", d),
            candidate_strategies(layer, cluster, ["scatter"]),
            counts,
        )
        best = min(costs, key=lambda s: costs[s].total_ms)
        r0 = min(c.total_ms for s, c in costs.items() if s.r == 0)
        ep = min(c.total_ms for s, c in costs.items() if s.r >= 1)
        lines.append(f"| {w} | {e} | {d} x {h} | {tokens} | {best} | {r0:.2f} | {ep:.2f} |")
    return "\n".join(lines)


def _exchange_ms(
    world: int, m: int, preset: str | LinkModel, algo: str, rows: int, row_bytes: int
) -> float:
    """One balanced exchange (dispatch direction): ``rows`` rows from every rank to
    every rank (one expert per rank); ``preset``: a ``PRESETS`` name or the links."""
    layer = LayerSpec(2048, 2048, world, 1)
    counts = workload_runs(world, world, 1, rows * world, rows * world)
    (chunk,) = dispatch_runs(counts, layer.layout(world), 1, 1)
    links = PRESETS[preset] if isinstance(preset, str) else preset
    go, _ = exchange_ms(chunk, m, links, algo, row_bytes)
    return sum(go)


def tutel_2dh_table() -> str:
    """Tutel Fig. 18: 2DH over linear (NCCL) speedup of one all-to-all by world size at
    1, 32 and 256 MiB per rank (A100 ND96amsr figures, m = 8)."""
    worlds = (64, 256, 1024, 4096)
    lines = [
        "| MiB per rank | " + " | ".join(f"W={w}" for w in worlds) + " | Tutel Fig. 18 |",
        "|---:|" + "---:|" * len(worlds) + "---|",
    ]
    paper = {
        1: "2DH faster from small scale",
        32: "2DH slower at small scale, faster at large",
        256: "2DH slower at small scale, faster at large",
    }
    for mib in (1, 32, 256):
        row_bytes = 4096  # 2048 bf16 values
        cells = []
        for w in worlds:
            rows = max(1, mib * 2**20 // row_bytes // w)  # rows to each rank
            t = {a: _exchange_ms(w, 8, "a100-ndv4", a, rows, row_bytes) for a in ("linear", "2dh")}
            cells.append(f"{t['linear'] / t['2dh']:.2f}x")
        lines.append(f"| {mib} | " + " | ".join(cells) + f" | {paper[mib]} |")
    return "\n".join(lines)


def tutel_r_table() -> str:
    """Tutel Fig. 12: the best r by capacity factor f (E = 16, d = 2048, one node of 8
    and 64 GPUs of 8 per node); f scales the rows of every expert (k f T / E)."""
    e, d, h, k, tokens = 16, 2048, 2048, 2, 4096
    lines = ["| W | f | rows per expert | predicted best | r=0 ms | r=1 ms | best r>1 ms |"]
    lines.append("|---:|---:|---:|---|---:|---:|---:|")
    for w in (8, 64):
        layer = LayerSpec(d, h, e, k)
        cluster = Cluster(w, 8, PRESETS["a100-ndv4"])
        for f in (0.125, 0.5, 1, 2, 8, 32):
            t = max(1, int(tokens * f / 8))  # f scales the tokens each expert computes on
            counts = workload_runs(w, e, k, t, -(-w * t * k // e))
            strategies = candidate_strategies(layer, cluster, ["scatter"])
            costs = predict_bucket(layer, cluster, roofline("a100", d), strategies, counts)
            best = min(costs, key=lambda s, c=costs: c[s].total_ms)
            by_r = {
                name: min((c.total_ms for s, c in costs.items() if cond(s.r)), default=None)
                for name, cond in (
                    ("0", lambda r: r == 0),
                    ("1", lambda r: r == 1),
                    (">1", lambda r: r > 1),
                )
            }
            cells = " | ".join("-" if v is None else f"{v:.2f}" for v in by_r.values())
            lines.append(f"| {w} | {f} | {w * t * k // e} | {best} | {cells} |")
    return "\n".join(lines)


def deepep_table() -> str:
    """DeepEP low-latency kernels (H800): 128 tokens per rank, hidden 7168, top-8, FP8
    dispatch / BF16 combine, EP 8-256; the model's linear exchange with the H100 NDR
    figures (the closest preset: H800 has 400 GB/s NVLink, 8 x 400 Gb/s RDMA), as the
    preset has it (NCCL: the next peer's message issued an alpha after the last) and
    with a 0.25 us issue interval (GPU-initiated RDMA keeping every message in flight).
    Both send the library's k copies of a token (one per chosen expert); DeepEP sends
    one per destination rank: fewer where a token's experts share a rank (8 uniform
    picks over 8 ranks reach ~5.3 of them), the same count at one expert per rank."""
    paper = {8: (77, 114), 64: (173, 314), 256: (194, 360)}
    nccl = PRESETS["h100-ndr"]
    rdma = dataclasses.replace(
        nccl,
        intra=dataclasses.replace(nccl.intra, issue_us=0.25),
        inter=dataclasses.replace(nccl.inter, issue_us=0.25),
    )
    lines = ["| EP ranks | model (preset) us | model, 0.25 us issue | DeepEP us |"]
    lines.append("|---:|---:|---:|---:|")
    for w in (8, 64, 256):
        rows = max(1, 128 * 8 // w)  # top-8 copies of 128 tokens, to each of W ranks
        cells = []
        for links in (nccl, rdma):
            disp = _exchange_ms(w, 8, links, "linear", rows, 7168) * 1e3
            comb = _exchange_ms(w, 8, links, "linear", rows, 2 * 7168) * 1e3
            cells.append(f"{disp:.0f} / {comb:.0f}")
        lines.append(f"| {w} | {' | '.join(cells)} | {paper[w][0]} / {paper[w][1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("token all-to-all per step (4 exchanges), linear / 2DH ms; bold: 2DH faster")
    print(a2a_table())
    print()
    print("best strategy (A100 figures, roofline compute, scatter kernel)")
    print(r_table())
    print()
    print("Tutel Fig. 18: 2DH speedup over linear, one all-to-all (a100-ndv4, m = 8)")
    print(tutel_2dh_table())
    print()
    print("Tutel Fig. 12: best r by capacity factor (E 16, d = h = 2048, A100s)")
    print(tutel_r_table())
    print()
    print("DeepEP low-latency EP dispatch / combine (128 tokens, hidden 7168, top-8)")
    print(deepep_table())

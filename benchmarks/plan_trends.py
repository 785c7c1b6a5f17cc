"""The cost model's scaling trends with the default published figures (no measurement).

    python -m benchmarks.plan_trends

Prints (markdown) the token all-to-all time, linear vs 2DH, of Tutel's Fig. 14 layer
(d = h = 2048, 2 experts per GPU, k = 2, bf16, balanced) from 16 to 2048 GPUs with
the A100 (ND96amsr) and H100 (NDR) figures, and the predicted best r for small and
large experts at low and high capacity. ``tests/test_planning_trends.py`` asserts the
same trends.
"""

from __future__ import annotations

from adaptive_moe.core.strategy import Strategy
from adaptive_moe.planning.cost_model import Cluster, LayerSpec, strategy_cost, workload_counts
from adaptive_moe.planning.kernel_profile import roofline
from adaptive_moe.planning.links import PRESETS
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


if __name__ == "__main__":
    print("token all-to-all per step (4 exchanges), linear / 2DH ms; bold: 2DH faster")
    print(a2a_table())
    print()
    print("best strategy (A100 figures, roofline compute, scatter kernel)")
    print(r_table())

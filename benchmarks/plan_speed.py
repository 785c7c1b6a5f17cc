"""How long the planner takes at cluster scale (CPU; no device needed).

    python -m benchmarks.plan_speed --repeats 3

Times ``plan_table`` (the default buckets and strategies, as ``adaptive-moe plan``
predicts them) for the OLMoE-shaped layer (d 2048, h 1024, E 64, k 8, bf16) with the
a100-ndv4 links and the A100 roofline at 4096 tokens per rank, at W = 2048 and 16384,
and with E = 4096 at W = 4096. Prints the median wall and CPU (process) seconds of the
repeats, and the load average, which on a shared machine sets the wall time.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

from adaptive_moe.planning.cost_model import Cluster, LayerSpec
from adaptive_moe.planning.kernel_profile import roofline
from adaptive_moe.planning.links import PRESETS
from adaptive_moe.planning.planner import plan_table

CASES = ((2048, 64), (16384, 64), (4096, 4096))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print("| W | E | buckets x strategies | wall s (median) | CPU s (median) | load avg |")
    print("|---:|---:|---|---:|---:|---|")
    for world, experts in CASES:
        layer = LayerSpec(2048, 1024, experts, 8)
        cluster = Cluster(world, 8, PRESETS["a100-ndv4"])
        walls, cpus, loads = [], [], []
        for _ in range(args.repeats):
            loads.append(os.getloadavg()[0])
            t0, c0 = time.perf_counter(), time.process_time()
            table = plan_table(layer, cluster, roofline("a100", 2048), 4096, progress=False)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        n = len(next(iter(table.entries.values())).times_ms)
        print(
            f"| {world} | {experts} | {len(table.entries)} x {n} | "
            f"{statistics.median(walls):.1f} | {statistics.median(cpus):.1f} | "
            f"{min(loads):.0f}-{max(loads):.0f} |",
            flush=True,
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()

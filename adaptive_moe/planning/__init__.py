"""The scale planner: predict a strategy table for a cluster that has not been measured.

links          alpha-beta model of each link level (within a node, across nodes), with
               published defaults and a loader for ``benchmarks/alltoall.py`` output
kernel_profile the expert kernels' time on one device vs rows per expert, experts and
               hidden size (measured, or a roofline of published peak figures)
cost_model     the time of every Strategy on a workload: compute + collectives, with
               the message sizes the dispatch plan produces, minus what pipelining hides
stages         one all-to-all stage's time from what every rank moves in it
grouped        the exchanges evaluated on runs of ranks with equal rows (O(W) per chunk)
reference      the same on dense [W, W] matrices, the slow reference it is tested against
planner        a ``StrategyTable`` marked predicted, per workload bucket
calibrate      one launch measures the all-to-all and the kernels for the planner
plot           time per strategy family vs world size; best strategy over (W, tokens)
cli            ``adaptive-moe plan``
"""

from adaptive_moe.planning.cost_model import Cluster, CostBreakdown, LayerSpec, strategy_cost
from adaptive_moe.planning.kernel_profile import KernelProfile, Roofline, measure_kernel_profile
from adaptive_moe.planning.links import PRESETS, Link, LinkModel, fit_links
from adaptive_moe.planning.planner import plan_table

__all__ = [
    "PRESETS",
    "Cluster",
    "CostBreakdown",
    "KernelProfile",
    "LayerSpec",
    "Link",
    "LinkModel",
    "Roofline",
    "fit_links",
    "measure_kernel_profile",
    "plan_table",
    "strategy_cost",
]

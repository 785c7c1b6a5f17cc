"""The MoE layer at run time: routing, experts and their kernels' Python side, dispatch and
execution of a strategy, inference paths and the per-iteration strategy policy."""

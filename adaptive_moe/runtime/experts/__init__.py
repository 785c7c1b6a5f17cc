"""The experts phase: stacked expert weights (``stacked``), their shard placement, the
grouping of rows by expert and the expert-compute kernels' Python side (``kernels``,
``expert_variants``, ``kernel_autograd``, ``kernel_twins``, ``parallel_linear``), and the
always-on shared expert (``shared``).

``adaptive_moe.runtime.experts`` was one module before the runtime was split by concern;
its names stay importable from here."""

from adaptive_moe.runtime.experts.stacked import Experts, is_expert_param, mark_expert

__all__ = ["Experts", "is_expert_param", "mark_expert"]

"""adaptive_moe: Mixture-of-Experts layers that pick the fastest execution strategy per
iteration. Public API: ``MoELayer`` (with ``InferenceConfig``), ``Strategy``,
``StrategyTable``, ``wrap``, ``unwrap``, the building blocks ``ParallelLinear`` /
``parallel_linear`` / ``expert_rows`` and ``MixtureOfAttention``, and the
``adaptive-moe`` command line."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from adaptive_moe.core.strategy import Strategy

__all__ = [
    "InferenceConfig",
    "MixtureOfAttention",
    "MoELayer",
    "ParallelLinear",
    "Strategy",
    "StrategyTable",
    "clip_grad_norm_",
    "exclude_experts_from_ddp",
    "expert_rows",
    "is_expert_param",
    "parallel_linear",
    "parallelize",
    "param_groups",
    "unwrap",
    "wrap",
]
__version__ = "0.1.0"

# Imported on first use (PEP 562) so that `import adaptive_moe` stays light and the
# optional transformers integration is loaded only when asked for.
_LAZY = {
    "MoELayer": "adaptive_moe.runtime.layer",
    "InferenceConfig": "adaptive_moe.runtime.inference.config",
    "ParallelLinear": "adaptive_moe.runtime.experts.parallel_linear",
    "parallel_linear": "adaptive_moe.runtime.experts.parallel_linear",
    "expert_rows": "adaptive_moe.runtime.experts.parallel_linear",
    "MixtureOfAttention": "adaptive_moe.runtime.attention",
    "is_expert_param": "adaptive_moe.runtime.experts.stacked",
    "StrategyTable": "adaptive_moe.tuning.table",
    "wrap": "adaptive_moe.integrations.transformers",
    "unwrap": "adaptive_moe.integrations.transformers",
    "parallelize": "adaptive_moe.integrations.parallelize",
    "clip_grad_norm_": "adaptive_moe.integrations.parallelize",
    "param_groups": "adaptive_moe.integrations.parallelize",
    "exclude_experts_from_ddp": "adaptive_moe.integrations.parallelize",
}

if TYPE_CHECKING:
    from adaptive_moe.integrations.parallelize import (
        clip_grad_norm_,
        exclude_experts_from_ddp,
        parallelize,
        param_groups,
    )
    from adaptive_moe.integrations.transformers import unwrap, wrap
    from adaptive_moe.runtime.attention import MixtureOfAttention
    from adaptive_moe.runtime.experts.parallel_linear import (
        ParallelLinear,
        expert_rows,
        parallel_linear,
    )
    from adaptive_moe.runtime.experts.stacked import is_expert_param
    from adaptive_moe.runtime.inference.config import InferenceConfig
    from adaptive_moe.runtime.layer import MoELayer
    from adaptive_moe.tuning.table import StrategyTable


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adaptive_moe' has no attribute {name!r}")

"""adaptive_moe: Mixture-of-Experts layers that pick the fastest execution strategy per
iteration. Public API: ``MoELayer``, ``Strategy``, ``StrategyTable``, ``wrap``,
``unwrap`` and the ``adaptive-moe`` command line."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from adaptive_moe.core.strategy import Strategy

__all__ = ["MoELayer", "Strategy", "StrategyTable", "is_expert_param", "unwrap", "wrap"]
__version__ = "0.1.0"

# Imported on first use (PEP 562) so that `import adaptive_moe` stays light and the
# optional transformers integration is loaded only when asked for.
_LAZY = {
    "MoELayer": "adaptive_moe.runtime.layer",
    "is_expert_param": "adaptive_moe.runtime.experts",
    "StrategyTable": "adaptive_moe.tuning.table",
    "wrap": "adaptive_moe.integrations.transformers",
    "unwrap": "adaptive_moe.integrations.transformers",
}

if TYPE_CHECKING:
    from adaptive_moe.integrations.transformers import unwrap, wrap
    from adaptive_moe.runtime.experts import is_expert_param
    from adaptive_moe.runtime.layer import MoELayer
    from adaptive_moe.tuning.table import StrategyTable


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adaptive_moe' has no attribute {name!r}")

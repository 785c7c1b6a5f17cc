"""The choose phase: which strategy each forward runs (``policy.StrategyPolicy``), the
previous forward's workload (``lagged``) and the per-strategy statistics (``stats``)."""

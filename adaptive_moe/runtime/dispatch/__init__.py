"""The dispatch -> experts -> combine contract (``dispatcher``), the exchange's row plan
(``plan``) and the training dispatchers of every strategy (``executor``).

``adaptive_moe.runtime.dispatch`` was the plan module before the runtime was split by
concern; its names stay importable from here."""

from adaptive_moe.runtime.dispatch.plan import Chunk, build_plan, part, ranges_to_index

__all__ = ["Chunk", "build_plan", "part", "ranges_to_index"]

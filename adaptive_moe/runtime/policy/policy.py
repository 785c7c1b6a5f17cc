"""``StrategyPolicy``: which strategy each forward of a layer runs.

    forced      a strategy the caller passed: checked, then run
    table       ``StrategyTable.lookup(max_tokens)``; without a table the default
                strategy, whose expert kernel is measured per workload key on CUDA
                (``KernelChoice``)
    explore     with ``Exploration``, the online tuner's probe now and then (``tuning.online``)
    lagged      one process: the choice from the previous forward's workload, so that the
                forward can group its rows on the device with no host counts (``lagged``)
    static      the inference path's default: the small-batch kernel at decode sizes
    replay      under activation checkpointing, what the recomputed forward chose (``replay``)

Everything here is host-side bookkeeping over group-wide values (the exchanged counts, the
device and dtype, the previous workload), so every rank of the group decides alike. It
needs no layer: the expert shape, the shard layout and the mesh are all it reads.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from adaptive_moe.comm import Mesh
from adaptive_moe.core.config import ExpertConfig
from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.core.strategy import DEGREES, Strategy
from adaptive_moe.runtime.dispatch.dispatcher import Counts
from adaptive_moe.runtime.experts.kernels import MEASURED_KERNELS, KernelChoice, available_kernels
from adaptive_moe.runtime.inference.config import SMALL_BATCH_ROWS, default_inference_kernel
from adaptive_moe.runtime.layer_args import invalid_strategy_message
from adaptive_moe.runtime.policy.lagged import LaggedWorkload, Workload
from adaptive_moe.runtime.policy.replay import MISSING, ReplayMemory, in_backward
from adaptive_moe.runtime.policy.stats import compile_events
from adaptive_moe.tuning.online import Exploration, OnlineTuner
from adaptive_moe.tuning.table import Fingerprint, LayerShape, StrategyTable
from adaptive_moe.tuning.workload import Buckets

# (device, dtype) of the expert compute: what the valid kernels depend on.
Where = tuple[torch.device, torch.dtype]
KernelsFn = Callable[..., tuple[str, ...]]
# ms of each of the given kernels on this forward's own problem (``time_expert_kernels``).
MeasureFn = Callable[[Sequence[str]], list[float]]


@dataclasses.dataclass(frozen=True)
class Choice:
    """The counted path's decision.

    Attributes:
        strategy: what to run.
        probe: the online tuner's probe to time around the run (None: no probe).
        replayed: a recomputation under activation checkpointing: run it, but it is not a
            new forward (no statistics, no probe, nothing recorded).
    """

    strategy: Strategy
    probe: object | None = None
    replayed: bool = False


class StrategyPolicy:
    """The strategy choice of one layer (see the module docstring).

    Args:
        cfg: the experts' shape (d_model, d_ff, E).
        layout: the fixed shard layout of this rank.
        mesh: the expert group's mesh; None on one process.
        buckets: how workloads are bucketed when no table is given.
        explore: re-measure the table's top candidates online (needs a table).
        kernels: ``available_kernels``-like ``(device, dtype, *, d_model, hidden)`` ->
            the usable kernels, default first (tests pass their own).
    """

    def __init__(
        self,
        cfg: ExpertConfig,
        layout: ShardLayout,
        mesh: Mesh | None = None,
        *,
        buckets: Buckets | None = None,
        explore: Exploration | None = None,
        kernels: KernelsFn = available_kernels,
    ) -> None:
        if explore is not None and not isinstance(explore, Exploration):
            raise ValueError(f"explore must be an Exploration or None, got {explore!r}")
        self.cfg, self.layout, self.mesh = cfg, layout, mesh
        self.buckets = buckets or Buckets()
        self.explore = explore
        self.table: StrategyTable | None = None
        self.tuner: OnlineTuner | None = None
        self.kernel_choice = KernelChoice()  # the measured default kernel, per workload key
        self.workload = LaggedWorkload()  # one process: the previous forward's workload
        self.replay = ReplayMemory()
        self._kernels = kernels
        # Per (device, dtype): (default, valid strategies, the same as a set); the kernels
        # are probed once, not every forward (``forget_devices`` after ``.to()``).
        self._valid: dict[Where, tuple[Strategy, tuple[Strategy, ...], frozenset]] = {}
        self._static_defaults: dict[tuple[object, ...], Strategy] = {}
        self._warned_no_table = False
        self._probe_compiles = 0

    # ---- what may run -------------------------------------------------------------------

    def _cache(self, where: Where) -> tuple[Strategy, tuple[Strategy, ...], frozenset]:
        entry = self._valid.get(where)
        if entry is None:
            default_kernels = self._kernels(*where)
            if not default_kernels:
                raise ValueError(f"no expert kernel supports dtype {where[1]} on {where[0]}")
            valid = tuple(self._enumerate(where))
            entry = (Strategy(1, "linear", 1, default_kernels[0]), valid, frozenset(valid))
            self._valid[where] = entry
        return entry

    def _enumerate(self, where: Where) -> list[Strategy]:
        hidden = self.layout.hidden_per_rank
        kernels = self._kernels(*where, d_model=self.cfg.d_model, hidden=hidden)
        if self.mesh is None:
            return [Strategy(1, "linear", 1, k) for k in kernels]
        algos = ["linear"]
        if self.mesh.nodes > 1 and self.mesh.ranks_per_node > 1:
            algos.append("2dh")
        out = [Strategy(0, "linear", 1, k) for k in kernels]
        for r in self.layout.valid_r():
            if r >= 1:
                out += [Strategy(r, a, d, k) for a in algos for d in DEGREES for k in kernels]
        return out

    def default(self, where: Where) -> Strategy:
        """EP+DP, linear all-to-all, no pipelining, the device's default kernel."""
        return self._cache(where)[0]

    def strategies(self, where: Where) -> tuple[Strategy, ...]:
        """Every valid strategy on this group for this device and dtype."""
        return self._cache(where)[1]

    def is_valid(self, strategy: Strategy, where: Where) -> bool:
        return strategy in self._cache(where)[2]

    def check(self, strategy: Strategy, where: Where) -> None:
        """ValueError unless ``strategy`` is a Strategy this layer can run."""
        if not isinstance(strategy, Strategy):
            raise ValueError(f"strategy must be a Strategy, got {type(strategy).__name__}")
        if not self.is_valid(strategy, where):
            group = f"world {self.layout.world}, shards {self.layout.shards}"
            raise ValueError(invalid_strategy_message(strategy, self.strategies(where), group))

    def code(self, strategy: Strategy | None, where: Where) -> int:
        """0: none forced; i + 1: the i-th of ``strategies`` (the same list on every rank);
        -1: one this layer cannot run. Exchanged with the counts (``layer_args``)."""
        if strategy is None:
            return 0
        valid = self.strategies(where)
        return valid.index(strategy) + 1 if strategy in valid else -1

    def forget_devices(self) -> None:
        """The layer moved or changed dtype: valid strategies are probed again."""
        self._valid.clear()

    # ---- the table ----------------------------------------------------------------------

    def use_table(
        self,
        table: StrategyTable | str | os.PathLike[str],
        fingerprint: Fingerprint,
        shape: LayerShape,
        where: Where,
        *,
        allow_mismatch: bool = False,
    ) -> None:
        """Look strategies up in ``table`` from now on (checked against this run, and
        refused when it names no strategy this layer can run on ``where``)."""
        if isinstance(table, (str, os.PathLike)):
            table = StrategyTable.load(Path(table))
        if not isinstance(table, StrategyTable):
            raise ValueError(f"table must be a StrategyTable or a path, got {type(table).__name__}")
        table.check(fingerprint, shape, allow_mismatch=allow_mismatch)
        self._check_runnable(table, where)
        self.table = table
        self.tuner = OnlineTuner(table, self.explore) if self.explore is not None else None

    def _check_runnable(self, table: StrategyTable, where: Where) -> None:
        """Refuse a table none of whose best strategies can run here: it would silently
        run the default on every step."""
        named = {entry.best for entry in table.entries.values()}
        if named and not named & self._cache(where)[2]:
            raise ValueError(
                f"strategy table{table._where()}: none of the strategies it names "
                f"({', '.join(sorted(map(str, named)))}) is valid for this layer; "
                "re-profile it with `adaptive-moe profile` for this layer and group"
            )

    # Host-side decision (table lookup, one-time warnings): eager under torch.compile,
    # whose tracing of warnings.warn fails in torch 2.13.
    @torch.compiler.disable
    def lookup(self, max_tokens: int, where: Where) -> Strategy:
        """The strategy the table names for this workload (the default without a table)."""
        if self.table is not None:
            strategy = self.table.lookup(max_tokens)
            if self.is_valid(strategy, where):
                return strategy
            # Only a table accepted with allow_mismatch can name one this layer lacks.
            warnings.warn(
                f"the strategy table names {strategy}, which this layer cannot run; "
                f"running the default {self.default(where)}",
                UserWarning,
                stacklevel=4,
            )
        elif not self._warned_no_table and self.layout.world > 1:
            # On one process no table is the normal case: the default kernel is a fine choice.
            warnings.warn(
                "MoELayer has no strategy table: running the default strategy "
                f"{self.default(where)} (profile with `adaptive-moe profile`)",
                UserWarning,
                stacklevel=4,
            )
            self._warned_no_table = True
        return self.default(where)

    # ---- the measured default kernel ----------------------------------------------------

    def kernel_key(self, where: Where, slots: int, max_tokens: int) -> tuple[object, ...]:
        """``kernel_choice``'s key: group-wide values only (device, dtype, total slots and
        the busiest expert's bucket), so every rank measures on the same calls."""
        return (*where, slots.bit_length(), self.buckets.key(max_tokens))

    def measured_kernel(
        self, strategy: Strategy, counts: Counts, where: Where, measure: MeasureFn
    ) -> Strategy:
        """``strategy`` with the kernel that measured fastest on this workload key (the
        static default off CUDA). ``measure`` times the candidates on this call's own
        problem; the MAX over the ranks makes every rank settle on the same kernel."""
        if where[0].type != "cuda":
            return strategy
        key = self.kernel_key(where, sum(sum(row) for row in counts.kept), counts.max_tokens)
        kernel = self.kernel_choice.chosen.get(key)  # the hot path: one dict lookup
        if kernel is None:
            candidates = [
                k
                for k in MEASURED_KERNELS
                if self.is_valid(dataclasses.replace(strategy, kernel=k), where)
            ]
            reduce = functools.partial(self._reduce_max, device=where[0])
            kernel = self.kernel_choice.choose(key, candidates, measure, reduce)
        return (
            strategy if kernel == strategy.kernel else dataclasses.replace(strategy, kernel=kernel)
        )

    def _reduce_max(self, ms: list[float], device: torch.device) -> list[float]:
        if self.mesh is None or self.mesh.world == 1:
            return ms
        t = torch.tensor(ms, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.mesh.group)
        return t.tolist()

    # ---- the counted (training) path ----------------------------------------------------

    def choose_counted(
        self, counts: Counts, forced: Strategy | None, where: Where, measure: MeasureFn
    ) -> Choice:
        """The strategy of a forward whose counts were exchanged: replayed under
        recomputation, else forced, the tuner's, the table's or the measured default."""
        if in_backward():
            strategy = self.replay.take("counts", _counts_key(counts))
            if strategy is MISSING:  # forgotten: the same rule again
                strategy = forced or self.lookup(counts.max_tokens, where)
            return Choice(strategy, replayed=True)
        if self.tuner is not None:
            if self.tuner.pending is not None and compile_events() != self._probe_compiles:
                self.tuner.pending = None  # timed while torch.compile compiled
            self.tuner.settle(self.mesh.group if self.mesh else None, where[0])
        if forced is not None:
            self.check(forced, where)
            return Choice(forced)
        if self.tuner is not None:
            strategy, probe = self.tuner.choose(counts.max_tokens)
            return Choice(strategy, probe)
        strategy = self.lookup(counts.max_tokens, where)
        if self.table is None:
            strategy = self.measured_kernel(strategy, counts, where, measure)
        return Choice(strategy)

    def ran_counted(self, counts: Counts, strategy: Strategy) -> None:
        """Remember what ran for this routing, for its recomputation. (Also under no_grad:
        reentrant checkpointing runs the first forward without grad.)"""
        self.replay.record("counts", _counts_key(counts), strategy)

    def probe_started(self, probe: object, x: torch.Tensor) -> None:
        self.tuner.start(probe, x)
        self._probe_compiles = compile_events()

    def probe_finished(self, probe: object, x: torch.Tensor, y: torch.Tensor) -> None:
        self.tuner.finish(probe, x, y)

    def observe(self, tokens: int, counts: Counts) -> None:
        """One process: a counted forward's workload, for the next forward's lagged choice."""
        if not in_backward():
            self.workload.remember(Workload(tokens, counts.max_tokens, sum(counts.kept[0])))

    # ---- the device-grouped path (one process) ------------------------------------------

    # Host-side decision (reads the lagged workload, the table, the kernel cache).
    @torch.compiler.disable
    def choose_device_grouped(
        self,
        tokens: int,
        forced: Strategy | None,
        where: Where,
        groups_on_device: Callable[[str], bool],
        prefer: str | None = None,
    ) -> Strategy | None:
        """The strategy of a one-process training forward that groups its rows on the
        device, or None for the counted path: the choice for the previous forward's
        workload (or ``forced``) when its kernel reads device offsets
        (``groups_on_device``). Never with an online tuner (it times counted forwards).
        A recomputation takes the path its forward took. ``prefer``: a kernel that
        replaces the measured default kernel where valid (never a table's choice nor a
        forced one): the layer's compiled experts' kernel."""
        if self.tuner is not None:
            return None
        if in_backward():
            strategy = self.replay.take("path", tokens)
            return None if strategy is MISSING else strategy
        strategy = forced
        if strategy is None:
            strategy = self._lagged_choice(tokens, where)
            if strategy is not None and prefer is not None and self.table is None:
                preferred = dataclasses.replace(strategy, kernel=prefer)
                strategy = preferred if self.is_valid(preferred, where) else strategy
        elif not self.is_valid(forced, where):
            strategy = None  # the counted path raises the detailed error
        if strategy is not None and not groups_on_device(strategy.kernel):
            strategy = None
        self.replay.record("path", tokens, strategy)
        return strategy

    def _lagged_choice(self, tokens: int, where: Where) -> Strategy | None:
        """The strategy for the previous forward's workload; None when there is none yet,
        its T differs, or its kernel has not been measured (the counted path measures)."""
        prev = self.workload.previous()
        if prev is None or prev.tokens != tokens:
            return None
        strategy = self.lookup(prev.max_tokens, where)
        if self.table is not None or where[0].type != "cuda":
            return strategy
        kernel = self.kernel_choice.chosen.get(self.kernel_key(where, prev.slots, prev.max_tokens))
        return None if kernel is None else dataclasses.replace(strategy, kernel=kernel)

    def observe_device(self, tokens: int, kept: torch.Tensor) -> int:
        """Start copying a device-grouped forward's workload (``kept`` [E]) to the host;
        returns the previous workload's busiest-expert slots (0 before any)."""
        prev = self.workload.previous()
        self.workload.record(tokens, kept)
        return prev.max_tokens if prev is not None else 0

    # ---- the static inference path ------------------------------------------------------

    def choose_static(
        self, max_tokens: int, top_k: int, forced: Strategy | None, where: Where
    ) -> Strategy:
        """Forced (checked), the table's, or the inference default: the small-batch kernel
        at decode sizes (``default_inference_kernel``), built once per (device, dtype,
        small batch or not)."""
        if forced is not None:
            self.check(forced, where)
            return forced
        if self.table is not None:
            return self.lookup(max_tokens, where)
        e = self.cfg.num_experts
        key = (*where, max_tokens * top_k <= SMALL_BATCH_ROWS * e)
        strategy = self._static_defaults.get(key)
        if strategy is None:
            kernel = default_inference_kernel(*where, max_tokens, top_k, e)
            strategy = Strategy(1, "linear", 1, kernel) if kernel else self.default(where)
            self._static_defaults[key] = strategy
        return strategy


def _counts_key(counts: Counts) -> tuple[object, ...]:
    return (counts.kept, counts.max_tokens, counts.demand_total)

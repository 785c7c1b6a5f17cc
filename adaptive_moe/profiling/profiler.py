"""The offline profiler: time every strategy per workload bucket into a ``StrategyTable``.

For each bucket the sweep builds a synthetic routing whose busiest expert receives
exactly the bucket's workload (``synthetic_routing``), then runs forward+backward of
every valid strategy on it: ``warmup`` untimed passes of each, then ``repeats`` rounds
in which every strategy runs one timed pass (CUDA events on GPU, ``perf_counter`` after
a barrier on CPU; ``interleaved_medians``). A pass takes as long as its slowest rank
(one all-reduce of every pass's time), and the table keeps the median over the passes,
the same number on every rank. The fastest strategy is the bucket's best. Round-robin
rather than each strategy's passes back to back because, on a shared machine, a change
in load during the sweep would otherwise land on the few strategies timed while it
lasted and reorder them: on 2-8 gloo ranks of a shared 2-core host two sweeps agreed
at a mean Spearman 0.89 back to back, 0.94 interleaved (10 buckets; most at W = 4-8,
0.86-0.96 against 0.97-0.99; ``benchmarks/RESULTS.md``, session 8). Times it does not
trust are measured again (``Outliers``: passes far apart, or a best implausibly faster
than the default), and the run reports them.

What is timed is the live layer's own path, ``MoELayer.forward(x, strategy=s)``: the
router (fp32 logits, scores, top-k, gates, capacity), the count exchange, the balance and
z-losses, strategy validation, the executor and the shared experts; backward runs from
the output *and* the two losses (weights of ``training.model``'s defaults), so the
router's backward, through the gates and the losses, is timed as in training. The only
change to that path is where the routing comes from: the layer's non-public
``profiling_routing`` hook (``runtime.layer_hooks``: a forward hook on ``layer.router``)
replaces the router's expert ids and demand counts, right after the router ran, by the
synthetic ones. The router's own gates are kept (positive, renormalised, on the router's
autograd graph; the cost does not depend on their values).

Why a hook rather than router weights and inputs built so that the real router picks the
synthetic routing: that would overwrite the user's router weights (to be restored),
feed the router degenerate logits whose top-k depends on float ties (so the skew would
be exact only up to tie-breaking, and not at all under group-limited selection, score
correction biases or capacity drops), and the router's compute would be that of special
inputs. With the hook the router runs its real weights on ordinary tokens, every
kernel and collective of the step runs as in training, and the bucket's workload is
exact by construction: the ids replace the router's wholesale, so a capacity factor on
the layer drops nothing (the sweep stops at the capacity instead, ``workload_range``).
The layer's strategy statistics and last-forward attributes are put back afterwards.

    x          [T, d]      this rank's synthetic tokens (requires grad, as in training)
    topk_ids   [T, k]      this rank's slice of the global synthetic routing
    counts     [E]         slots per expert in ``topk_ids`` (the router's demand counts)
    dy         [T, d]      the gradient fed to backward

Python API: ``profile_layer(layer, tokens)`` (every rank of the layer's group calls it).
CLI: ``adaptive-moe profile`` (``profiling.cli``).
"""

from __future__ import annotations

import dataclasses
import datetime
import statistics
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from adaptive_moe.calc.layer_memory import layer_memory
from adaptive_moe.core import timing
from adaptive_moe.core.checks import int_at_least
from adaptive_moe.core.dtypes import TORCH_DTYPES
from adaptive_moe.core.rounds import timed_rounds
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.runtime.layer import MoELayer
from adaptive_moe.runtime.layer_hooks import profiling_routing
from adaptive_moe.runtime.routing.router import Routing
from adaptive_moe.tuning.table import Measurement, StrategyTable
from adaptive_moe.tuning.workload import Buckets, sweep_keys, workload_range

# Share of the free device memory a strategy's estimated peak may take (the rest is
# left for the allocator's fragmentation and for what the calculator's model misses).
_MEMORY_MARGIN = 0.8


# ---- workloads ----------------------------------------------------------------------------


def synthetic_routing(
    tokens: int, world: int, num_experts: int, top_k: int, max_tokens: int, seed: int
) -> torch.Tensor:
    """Global routing [W, T, k] (int64) in which one "hot" expert receives exactly
    ``max_tokens`` rows and the others share the rest as evenly as possible; no token
    picks an expert twice. Deterministic in ``seed``: every rank builds the same tensor
    and keeps its own slice ``[rank]``.

    Construction: the W*T*k choices, sorted by expert, are laid out column by column in
    a [W*T, k] matrix. An expert's run of at most W*T consecutive positions then falls
    on distinct rows, so no row repeats an expert. Rows, slots and expert ids are then
    shuffled."""
    n_tok = tokens * world
    lo, hi = workload_range(tokens, world, num_experts, top_k)
    if not lo <= max_tokens <= hi:
        raise ValueError(
            f"max_tokens must be in [{lo}, {hi}] for T={tokens}, W={world}, "
            f"E={num_experts}, k={top_k}; got {max_tokens}"
        )
    gen = torch.Generator().manual_seed(seed)
    rest, others = n_tok * top_k - max_tokens, num_experts - 1
    counts = torch.full((num_experts,), rest // max(1, others), dtype=torch.int64)
    counts[0] = max_tokens
    counts[1 : 1 + rest % max(1, others)] += 1  # [E], counts[0] is the hot expert
    order = torch.repeat_interleave(torch.arange(num_experts), counts)  # [W*T*k]
    ids = order.view(top_k, n_tok).t()  # [W*T, k], column-major fill
    ids = ids[torch.randperm(n_tok, generator=gen)]
    slot_perm = torch.rand(n_tok, top_k, generator=gen).argsort(dim=1)
    ids = ids.gather(1, slot_perm)
    relabel = torch.randperm(num_experts, generator=gen)
    return relabel[ids].view(world, tokens, top_k).contiguous()


# ---- measuring ----------------------------------------------------------------------------


# Weights of the balance and z-losses in backward: ``training.model.ModelConfig``'s
# defaults (any nonzero weight gives the same graph, hence the same time).
_AUX_LOSS_WEIGHT = 0.01
_Z_LOSS_WEIGHT = 0.001


@dataclasses.dataclass(frozen=True)
class _Batch:
    x: torch.Tensor  # [T, d], requires grad
    topk_ids: torch.Tensor  # [T, k] int64
    counts: torch.Tensor  # [E] int64, slots per expert in topk_ids
    dy: torch.Tensor  # [T, d]
    loss_grads: tuple[torch.Tensor, torch.Tensor]  # 0-dim fp32: the aux and z-loss weights


def _make_batch(
    layer: MoELayer, rank: int, world: int, tokens: int, max_tokens: int, seed: int
) -> _Batch:
    shape = layer.layer_shape()
    device, dtype = layer.experts.down_proj.device, TORCH_DTYPES[shape.dtype]
    ids = synthetic_routing(tokens, world, shape.num_experts, shape.top_k, max_tokens, seed)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    x = torch.randn(tokens, shape.d_model, generator=gen)  # [T, d]
    dy = torch.randn(tokens, shape.d_model, generator=gen)  # [T, d]
    return _Batch(
        x=x.to(device, dtype).requires_grad_(True),
        topk_ids=ids[rank].to(device),
        counts=torch.bincount(ids[rank].flatten(), minlength=shape.num_experts).to(device),
        dy=dy.to(device, dtype),
        loss_grads=(
            torch.tensor(_AUX_LOSS_WEIGHT, device=device),
            torch.tensor(_Z_LOSS_WEIGHT, device=device),
        ),
    )


def _routed_as(batch: _Batch) -> Callable[[Routing], Routing]:
    """The router's decision with the batch's expert ids and counts (see the module
    docstring); the router's gates, logits and scores stay as computed."""

    def replace(routing: Routing) -> Routing:
        if routing.topk_ids.shape != batch.topk_ids.shape:
            raise ValueError(
                f"the profiled forward routed {tuple(routing.topk_ids.shape)} slots, the "
                f"synthetic batch has {tuple(batch.topk_ids.shape)} (a top_k override?)"
            )
        # No synthetic slot is dropped, so the counts after drops are the demand counts;
        # where the router left them to be counted (it may drop), the layer counts them,
        # as it would in training.
        kept = batch.counts if routing.kept is not None else None
        return dataclasses.replace(routing, topk_ids=batch.topk_ids, counts=batch.counts, kept=kept)

    return replace


def _sync(layer: MoELayer) -> None:
    """Finish this rank's queued device work and line the ranks up."""
    device = layer.experts.down_proj.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if layer.mesh is not None and layer.mesh.world > 1:
        # A one-element all-reduce on the layer's device works for gloo and NCCL alike.
        dist.all_reduce(torch.zeros(1, device=device), group=layer.mesh.group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _one_pass(layer: MoELayer, batch: _Batch, strategy: Strategy) -> None:
    """One training step of the layer (inside ``profiling_routing(layer, ...)``): forward,
    then backward of ``(y * dy).sum() + w_aux * aux_loss + w_z * z_loss`` (as roots with their
    gradients: the same graph without an extra elementwise op that is not the layer's)."""
    layer.zero_grad(set_to_none=True)
    batch.x.grad = None
    y = layer(batch.x, strategy=strategy)  # [T, d]
    # Both losses depend on x (which requires grad), so both are roots of the graph.
    torch.autograd.backward((y, layer.aux_loss, layer.z_loss), (batch.dy, *batch.loss_grads))


def _pass_timer(layer: MoELayer, batch: _Batch, strategy: Strategy) -> Callable[[], float]:
    """A function timing one forward+backward pass of ``strategy`` in ms (collective)."""
    device = layer.experts.down_proj.device

    def time_pass() -> float:
        _sync(layer)
        start = timing.mark(device)
        _one_pass(layer, batch, strategy)
        return timing.elapsed_ms(start, timing.mark(device))

    return time_pass


@dataclasses.dataclass(frozen=True)
class Outliers:
    """When the profiler re-measures a time it does not trust (the median of all passes
    is kept, and the run reports it).

    Attributes:
        spread: a strategy is re-measured when its slowest pass (the slowest rank's
            time) is more than ``spread`` times its fastest (a preempted or
            page-faulting pass: with the few repeats of a quick profile the median does
            not hide it).
        speedup: a bucket's best and default strategies are re-measured when the best
            is more than ``speedup`` times faster than the default.
        passes: extra timed passes of one re-measure.
    """

    spread: float = 3.0
    speedup: float = 10.0
    passes: int = 5

    def __post_init__(self) -> None:
        for name in ("spread", "speedup"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 1:
                raise ValueError(f"Outliers.{name} must be a number > 1, got {value!r}")
        int_at_least("Outliers.passes", self.passes, 1)


def interleaved_medians(
    timers: Sequence[Callable[[], float]],
    warmup: int,
    repeats: int,
    outliers: Outliers | None,
    slowest: Callable[[list[float]], list[float]] = list,
) -> tuple[list[float], list[int]]:
    """The median step time of every timer and which of them were re-measured.

    Every timer's ``warmup`` calls first, then ``repeats`` rounds of one call of each
    (round p starts at timer p, so that no timer always follows the same one): a change
    in the machine's load during the sweep then shifts every timer's passes alike
    instead of the few timed while it lasted. ``slowest`` turns this rank's times of
    every pass into the group's (the maximum over the ranks, one all-reduce: a step
    takes as long as its slowest rank), so the median and the outlier test below see
    the same numbers on every rank. A timer whose slowest pass is more than
    ``outliers.spread`` times its fastest gets ``outliers.passes`` more rounds (among
    the noisy timers alone) and the median of all its passes."""
    n = len(timers)

    def rounds(which: list[int], skip: int, count: int) -> list[list[float]]:
        mine = timed_rounds([timers[i] for i in which], skip, count)  # [timer, pass]
        flat = slowest([t for row in mine for t in row])
        return [flat[i * count : (i + 1) * count] for i in range(len(which))]

    steps = rounds(list(range(n)), warmup, repeats)
    noisy = []
    if outliers is not None:
        noisy = [i for i in range(n) if max(steps[i]) > outliers.spread * min(steps[i])]
    if noisy:
        for i, extra in zip(noisy, rounds(noisy, 0, outliers.passes)):
            steps[i] += extra
    return [statistics.median(t) for t in steps], noisy


def recheck_speedup(
    times: dict[Strategy, float],
    default: Strategy,
    outliers: Outliers | None,
    remeasure: Callable[[Strategy], float],
) -> tuple[dict[Strategy, float], str]:
    """``times`` with the best and the default re-measured (``remeasure``: its new
    time) when the best is more than ``outliers.speedup`` times faster than the default,
    and a line saying so ("" when nothing was re-measured)."""
    if outliers is None or default not in times:
        return times, ""
    best = min(times, key=lambda s: (times[s], s))
    before = times[default] / times[best]
    if before <= outliers.speedup:
        return times, ""
    times = {**times, best: remeasure(best), default: remeasure(default)}
    after = times[default] / min(times.values())
    return times, (
        f"speed-up {before:.1f}x of {best} over the default {default} is above "
        f"{outliers.speedup:g}x: both re-measured ({outliers.passes} passes each), "
        f"now {after:.1f}x"
    )


def _group_reduce(layer: MoELayer, values: list[float], op: dist.ReduceOp) -> list[float]:
    """Element-wise reduction of ``values`` over the layer's group (identity alone)."""
    if layer.mesh is None or layer.mesh.world == 1 or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=layer.experts.down_proj.device)
    dist.all_reduce(t, op=op, group=layer.mesh.group)
    return t.tolist()


def _fits(layer: MoELayer, tokens: int, skew: float, strategy: Strategy) -> bool:
    """Whether the calculator expects ``strategy`` to fit in this rank's free device
    memory when the busiest expert gets ``skew`` times its balanced load (CPU memory is
    not checked)."""
    device = layer.experts.down_proj.device
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    # blocks the caching allocator holds but does not use are free for our purpose
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    shape = layer.layer_shape()
    need = layer_memory(
        d_model=shape.d_model,
        d_ff=shape.d_ff,
        num_experts=shape.num_experts,
        top_k=shape.top_k,
        glu=shape.glu,
        dtype_bytes=TORCH_DTYPES[shape.dtype].itemsize,
        tokens=tokens,
        world=layer.layout.world,
        strategy=strategy,
        capacity_factor=max(1.0, skew),
    ).peak
    return need <= _MEMORY_MARGIN * free


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """What ``profile_layer`` measures: ``workloads`` x ``strategies``.

    Attributes:
        workloads: (bucket key, max_tokens) of every bucket to measure.
        strategies: the candidates, in order.
        asked: the ``num_buckets`` asked for.
        workload_range: (balanced, extreme) max_tokens of the sweep.
    """

    workloads: tuple[tuple[int, int], ...]
    strategies: tuple[Strategy, ...]
    asked: int
    workload_range: tuple[int, int]

    def describe(self) -> str:
        """``"2 workload buckets x 15 strategies = 30 runs"``, and why fewer buckets than
        asked."""
        n, m = len(self.workloads), len(self.strategies)
        text = (
            f"{n} workload bucket{'s' * (n != 1)} x {m} strateg{'ies' if m != 1 else 'y'} "
            f"= {n * m} run{'s' * (n * m != 1)}"
        )
        if n < self.asked:
            lo, hi = self.workload_range
            text += (
                f" ({self.asked} buckets asked; the workloads from {lo} rows per expert "
                f"(balanced) to {hi} (extreme) span only {n})"
            )
        return text


def plan_sweep(
    layer: MoELayer,
    tokens: int,
    *,
    buckets: Buckets | None = None,
    num_buckets: int = 6,
    strategies: Sequence[Strategy] | None = None,
    capacity_factor: float = 0.0,
) -> SweepPlan:
    """The buckets and strategies ``profile_layer`` with these arguments measures (on
    GPU, a strategy the memory model expects not to fit is skipped, and reported)."""
    int_at_least("num_buckets", num_buckets, 1)
    shape, world = layer.layer_shape(), layer.layout.world
    lo, hi = workload_range(tokens, world, shape.num_experts, shape.top_k, capacity_factor)
    sweep = sweep_keys(buckets or Buckets(), lo, hi, num_buckets)
    return SweepPlan(tuple(sweep), tuple(_candidates(layer, strategies)), num_buckets, (lo, hi))


def profile_layer(
    layer: MoELayer,
    tokens: int,
    *,
    buckets: Buckets | None = None,
    num_buckets: int = 6,
    repeats: int = 10,
    warmup: int = 3,
    strategies: Sequence[Strategy] | None = None,
    capacity_factor: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    outliers: Outliers | None = Outliers(),  # frozen: one shared default is safe
    report: Callable[[str], None] | None = None,
) -> StrategyTable:
    """Measure every strategy of ``layer`` on synthetic routing and return the table.

    Collective: every rank of the layer's group calls it with the same arguments and
    gets the same table. The sweep covers up to ``num_buckets`` buckets from a balanced
    routing of ``tokens`` tokens per rank up to every token choosing one expert
    (``plan_sweep`` says which).

    Args:
        layer: the MoE layer (its weights are used, its gradients are cleared, its
            strategy statistics and last-forward attributes are left as they were).
        tokens: T, tokens per rank of the synthetic batch.
        buckets: bucketing of the table (default ``Buckets()``: geometric, ratio 2).
        num_buckets: most buckets to measure.
        repeats: timed passes per strategy, one per round of all the bucket's
            strategies (the table keeps the median of the slowest rank's times).
        warmup: untimed passes per strategy before the first round.
        strategies: a subset of ``layer.strategies()`` to measure (default all).
        capacity_factor: the run's capacity factor; a nonzero one caps the sweep at the
            capacity, which no workload can exceed.
        seed: of the synthetic routing and tokens.
        progress: show a progress bar on rank 0 (stderr).
        outliers: when to re-measure a time (None: never).
        report: called on rank 0 with a line for each bucket's skipped or re-measured
            strategies.
    """
    check_sweep(tokens, num_buckets, repeats, warmup)
    buckets = buckets or Buckets()
    plan = plan_sweep(
        layer,
        tokens,
        buckets=buckets,
        num_buckets=num_buckets,
        strategies=strategies,
        capacity_factor=capacity_factor,
    )
    candidates = list(plan.strategies)
    shape, world = layer.layer_shape(), layer.layout.world
    balanced = tokens * world * shape.top_k / shape.num_experts
    timer = "cuda-events" if layer.experts.down_proj.device.type == "cuda" else "perf_counter"
    table = StrategyTable(layer.fingerprint(), shape, buckets)
    bar = tqdm(
        total=len(plan.workloads) * len(candidates) * (warmup + repeats),
        unit="pass",
        desc="profile",
        disable=not progress or layer.layout.rank != 0,
        dynamic_ncols=True,
    )
    with bar:
        for key, max_tokens in plan.workloads:
            batch = _make_batch(layer, layer.layout.rank, world, tokens, max_tokens, seed + key)
            bar.set_description(f"bucket {key} ({max_tokens} rows)")
            with profiling_routing(layer, _routed_as(batch)):
                times, stamp, notes = _measure_bucket(
                    layer,
                    batch,
                    candidates,
                    max_tokens / balanced,
                    (warmup, repeats, outliers),
                    bar,
                )
            if report is not None and layer.layout.rank == 0:
                for note in notes:
                    report(f"bucket {key}: {note}")
            if not times:
                warnings.warn(f"bucket {key}: no strategy fits in device memory", stacklevel=2)
                continue
            date = datetime.datetime.fromtimestamp(stamp, datetime.UTC)
            how = Measurement(
                repeats,
                warmup,
                timer,
                tokens,
                max_tokens,
                max_tokens / balanced,
                date.isoformat(timespec="seconds"),
            )
            table.add_bucket(key, times, how)
    layer.zero_grad(set_to_none=True)  # the layer's statistics were put back by the hook
    return table


def _measure_bucket(
    layer: MoELayer,
    batch: _Batch,
    candidates: list[Strategy],
    skew: float,
    passes: tuple[int, int, Outliers | None],
    bar: tqdm,
) -> tuple[dict[Strategy, float], float, list[str]]:
    """Median step ms of every candidate that fits on all ranks (``interleaved_medians``),
    a timestamp (the same on every rank) and lines naming what was skipped or
    re-measured."""
    warmup, repeats, outliers = passes
    tokens = batch.x.shape[0]
    fits = _group_reduce(
        layer, [float(_fits(layer, tokens, skew, s)) for s in candidates], dist.ReduceOp.MIN
    )
    measured = [s for s, ok in zip(candidates, fits) if ok]

    def slowest(ms: list[float]) -> list[float]:
        return _group_reduce(layer, ms, dist.ReduceOp.MAX)

    def counted(strategy: Strategy) -> Callable[[], float]:
        time_pass = _pass_timer(layer, batch, strategy)

        def run() -> float:
            bar.set_postfix_str(str(strategy))
            bar.update()
            return time_pass()

        return run

    timers = [counted(s) for s in measured]
    medians, noisy = interleaved_medians(timers, warmup, repeats, outliers, slowest)
    times = dict(zip(measured, medians))
    # every rank stores the same timestamp
    stamp = _group_reduce(layer, [time.time()], dist.ReduceOp.MAX)[0]
    notes = []
    if noisy:
        notes.append(
            f"re-measured {len(noisy)} strategies whose slowest of {repeats} passes was more "
            f"than {outliers.spread:g}x the fastest (median of {repeats + outliers.passes} "
            f"passes kept): {', '.join(str(measured[i]) for i in noisy)}"
        )
    skipped = [str(s) for s, ok in zip(candidates, fits) if not ok]
    if skipped and times:
        notes.append(f"skipped {skipped}: the memory model expects them not to fit")

    def remeasure(strategy: Strategy) -> float:
        timer = [_pass_timer(layer, batch, strategy)]
        return interleaved_medians(timer, 0, outliers.passes, None, slowest)[0][0]

    times, note = recheck_speedup(times, layer.default_strategy, outliers, remeasure)
    return times, stamp, [*notes, note] if note else notes


def check_sweep(tokens: int | None, num_buckets: int, repeats: int, warmup: int) -> None:
    """ValueError naming the first bad sweep setting (``tokens`` None: chosen later)."""
    for name, value, least in (
        ("tokens", tokens, 1),
        ("num_buckets", num_buckets, 1),
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
    ):
        if value is None and name == "tokens":
            continue
        int_at_least(name, value, least)


def _candidates(layer: MoELayer, strategies: Sequence[Strategy] | None) -> list[Strategy]:
    valid = layer.strategies()
    if strategies is None and layer.layout.world == 1:
        # One rank runs every (r, all-to-all, degree) alike, locally (``Executor.alone``):
        # measuring the copies would only let noise pick among equal strategies.
        return [s for s in valid if (s.r, s.a2a, s.degree) == (1, "linear", 1)]
    if strategies is None:
        return valid
    invalid = [s for s in strategies if s not in valid]
    if invalid or not strategies:
        raise ValueError(
            f"strategies must be a non-empty subset of layer.strategies() "
            f"{[str(s) for s in valid]}; got invalid {[str(s) for s in invalid]}"
        )
    return list(dict.fromkeys(strategies))


def summary(table: StrategyTable, default: Strategy) -> str:
    """One line per bucket: best strategy, its time, the default's time, the speed-up."""
    head = (
        f"{'bucket':>6} {'max rows':>9} {'skew':>6}  {'best strategy':<24} "
        f"{'best ms':>9} {'default ms':>10} {'speed-up':>8}"
    )
    lines = [head]
    for key, entry in sorted(table.entries.items()):
        best_ms = entry.times_ms[entry.best]
        default_ms = entry.times_ms.get(default)
        ref = f"{default_ms:10.3f}" if default_ms else f"{'-':>10}"
        speedup = f"{default_ms / best_ms:7.2f}x" if default_ms else f"{'-':>8}"
        lines.append(
            f"{key:>6} {entry.how.max_tokens:>9} {entry.how.skew:>5.1f}x  "
            f"{entry.best!s:<24} {best_ms:9.3f} {ref} {speedup}"
        )
    return "\n".join(lines)

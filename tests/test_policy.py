"""``StrategyPolicy`` on its own, with no layer built: validity, table lookup, the
measured default kernel, the lagged choice, exploration and replay under recomputation.

References are hand-computed: the strategies a fake kernel list must give, the table's
best entry per bucket, the fastest of a fake measurement."""

from __future__ import annotations

import warnings

import pytest
import torch

from adaptive_moe.core.config import ExpertConfig
from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.runtime.dispatch.dispatcher import Counts
from adaptive_moe.runtime.policy.policy import StrategyPolicy
from adaptive_moe.runtime.policy.replay import MISSING, ReplayMemory
from adaptive_moe.tuning.online import Exploration
from adaptive_moe.tuning.table import Fingerprint, LayerShape, Measurement, StrategyTable
from adaptive_moe.tuning.workload import Buckets

E, D, H = 4, 8, 16
CPU = (torch.device("cpu"), torch.float32)
GPU = (torch.device("cuda"), torch.bfloat16)  # only a key here: nothing runs on it
FP = Fingerprint.current(1, 1, "none", "cpu")
SHAPE = LayerShape(d_model=D, d_ff=H, num_experts=E, top_k=2, glu=True, dtype="float32", shards=1)


def _kernels(device: torch.device, dtype: torch.dtype, **_shape: int) -> tuple[str, ...]:
    return ("scatter", "grouped_mm", "bmm") if device.type == "cuda" else ("loop", "bmm")


def _policy(**kw: object) -> StrategyPolicy:
    cfg = ExpertConfig(D, H, E)
    return StrategyPolicy(cfg, ShardLayout(1, 0, E, H), None, kernels=_kernels, **kw)


def _counts(kept: tuple[int, ...]) -> Counts:
    demand = torch.tensor(kept)
    return Counts((kept,), max(kept), demand, int(demand.sum()))


def _table(times: dict[int, dict[Strategy, float]]) -> StrategyTable:
    table = StrategyTable(FP, SHAPE, Buckets())
    for key, ms in times.items():
        how = Measurement(3, 1, "perf_counter", 8, 4, 1.0, "2026-01-01T00:00:00Z")
        table.add_bucket(key, ms, how)
    return table


LOOP, BMM = Strategy(1, "linear", 1, "loop"), Strategy(1, "linear", 1, "bmm")


def test_valid_strategies_come_from_the_kernels_and_bad_ones_are_named() -> None:
    policy = _policy()
    assert policy.strategies(CPU) == (LOOP, BMM)
    assert policy.default(CPU) == LOOP
    assert policy.default(GPU) == Strategy(1, "linear", 1, "scatter")
    assert policy.code(None, CPU) == 0 and policy.code(BMM, CPU) == 2
    assert policy.code(Strategy(0, "linear", 1, "loop"), CPU) == -1  # no r = 0 alone
    with pytest.raises(ValueError, match=r"kernel='scatter' \(valid kernel: \['bmm', 'loop'\]\)$"):
        policy.check(Strategy(1, "linear", 1, "scatter"), CPU)
    with pytest.raises(ValueError, match="strategy must be a Strategy"):
        policy.check("loop", CPU)  # type: ignore[arg-type]


def test_lookup_reads_the_table_and_warns_once_without_one_in_a_group() -> None:
    policy = _policy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one process: no table is the normal case
        assert policy.lookup(5, CPU) == LOOP
    # Two ranks (the layout only: the warning reads nothing else) warn once.
    grouped = StrategyPolicy(ExpertConfig(D, H, E), ShardLayout(2, 0, E, H), kernels=_kernels)
    with pytest.warns(UserWarning, match="no strategy table"):
        assert grouped.lookup(5, CPU) == LOOP
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert grouped.lookup(5, CPU) == LOOP  # warned once only
    table = _table({1: {LOOP: 2.0, BMM: 1.0}, 4: {LOOP: 1.0, BMM: 3.0}})
    policy.use_table(table, FP, SHAPE, CPU)
    assert policy.lookup(1, CPU) == BMM  # bucket 1: bmm is faster
    assert policy.lookup(table.buckets.representative(4), CPU) == LOOP
    with pytest.raises(ValueError, match="table must be a StrategyTable"):
        policy.use_table(3, FP, SHAPE, CPU)  # type: ignore[arg-type]


def test_a_table_of_no_runnable_strategy_is_refused() -> None:
    policy = _policy()
    scatter = Strategy(1, "linear", 1, "scatter")  # a CUDA kernel: not valid on CPU
    with pytest.raises(ValueError, match=r"none of the strategies it names \(.*scatter.*\)"):
        policy.use_table(_table({1: {scatter: 1.0}}), FP, SHAPE, CPU)
    assert policy.table is None
    policy.use_table(_table({1: {scatter: 1.0}}), FP, SHAPE, GPU)  # valid there
    assert policy.table is not None


def test_measured_default_kernel_measures_once_per_key() -> None:
    policy = _policy()
    calls: list[list[str]] = []

    def measure(kernels: list[str]) -> list[float]:
        calls.append(list(kernels))
        return [{"scatter": 2.0, "grouped_mm": 1.0}[k] for k in kernels]

    default = policy.default(GPU)
    for kept in ((3, 1, 2, 2), (3, 2, 1, 2)):  # same slots, same busiest expert: one key
        got = policy.measured_kernel(default, _counts(kept), GPU, measure)
        assert got == Strategy(1, "linear", 1, "grouped_mm")
    assert calls == [["scatter", "grouped_mm"]]
    policy.measured_kernel(default, _counts((9, 1, 1, 1)), GPU, measure)  # a new key
    assert len(calls) == 2
    # Off CUDA the static default runs and nothing is measured.
    assert policy.measured_kernel(LOOP, _counts((3, 1, 2, 2)), CPU, measure) == LOOP
    assert len(calls) == 2


def test_lagged_choice_follows_the_previous_workload() -> None:
    policy = _policy()
    policy.use_table(_table({1: {LOOP: 2.0, BMM: 1.0}, 6: {LOOP: 1.0, BMM: 3.0}}), FP, SHAPE, CPU)
    on_device = {"bmm"}.__contains__  # which kernels read device offsets, here
    assert policy.choose_device_grouped(8, None, CPU, on_device) is None  # no workload yet
    policy.observe(8, _counts((1, 1, 1, 1)))
    assert policy.choose_device_grouped(8, None, CPU, on_device) == BMM
    assert policy.choose_device_grouped(9, None, CPU, on_device) is None  # T changed
    policy.observe(8, _counts((12, 1, 1, 2)))  # bucket of 12: loop, which cannot
    assert policy.choose_device_grouped(8, None, CPU, on_device) is None
    assert policy.choose_device_grouped(8, BMM, CPU, on_device) == BMM  # forced
    assert policy.replay.recorded("path") == [None, BMM, None, None, BMM]


def test_exploration_probes_the_top_candidates_every_nth_call() -> None:
    policy = _policy(explore=Exploration(every=2, candidates=2))
    policy.use_table(_table({1: {LOOP: 2.0, BMM: 1.0}}), FP, SHAPE, CPU)
    noop = lambda kernels: []  # never called: there is a table
    choices = [policy.choose_counted(_counts((1, 0, 0, 1)), None, CPU, noop) for _ in range(4)]
    assert [c.strategy for c in choices] == [BMM, LOOP, BMM, BMM]  # ranked: bmm, loop
    assert [c.probe is not None for c in choices] == [False, True, False, True]
    # No device-grouped forward while the tuner times counted ones.
    assert policy.choose_device_grouped(8, BMM, CPU, lambda k: True) is None


def test_recomputation_replays_what_each_forward_ran() -> None:
    """Inside a backward (where checkpointing recomputes), ``choose_counted`` returns
    what the forward with those counts ran, last first among equal counts, and it is not
    a new forward (``replayed``); a forgotten one is looked up again."""
    policy = _policy()
    a, b = _counts((2, 1, 0, 1)), _counts((0, 0, 3, 1))
    policy.ran_counted(a, LOOP)
    policy.ran_counted(b, BMM)
    policy.ran_counted(a, BMM)
    seen = []

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @staticmethod
        def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
            for counts in (a, b, a, a):
                seen.append(policy.choose_counted(counts, None, CPU, lambda k: []))
            return g

    x = torch.ones(1, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the forgotten one's no-table warning
        Recompute.apply(x).sum().backward()
    assert [c.strategy for c in seen] == [BMM, BMM, LOOP, LOOP]
    assert all(c.replayed and c.probe is None for c in seen)
    # Outside a backward the same call is a new forward's choice.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not policy.choose_counted(a, None, CPU, lambda k: []).replayed


def test_replay_memory_is_bounded_and_copies_start_empty() -> None:
    import copy

    memory = ReplayMemory(size=3)
    for i in range(5):
        memory.record("path", i % 2, i)
    assert memory.recorded("path") == [2, 3, 4]
    assert memory.take("path", 0) == 4 and memory.take("path", 0) == 2
    assert memory.take("path", 0) is MISSING
    assert copy.deepcopy(memory).recorded("path") == []


def test_inference_default_is_the_small_batch_kernel_only_on_a_gpu() -> None:
    policy = _policy()
    assert policy.choose_static(4, 2, None, CPU) == LOOP
    assert policy.choose_static(4, 2, BMM, CPU) == BMM
    with pytest.raises(ValueError, match="not valid"):
        policy.choose_static(4, 2, Strategy(1, "linear", 1, "gemv"), CPU)

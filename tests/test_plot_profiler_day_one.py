"""Day-one friction (issue 24, items 5 and 6): a training plot that can be read (switch
labels that do not overlap, validation points, resumes and world-size changes marked,
plain tick numbers) and a profiler that says what it measures and re-measures outliers."""

from __future__ import annotations

import itertools

import pytest

from adaptive_moe.training.plot import plot_training, strategy_switches, training_figure


def _records(steps, strategies, world=None, resumed=(), val=None, step_ms=None):
    """Synthetic metrics records: ``strategies(step)`` names the layers' strategies."""
    world, val = world or (lambda step: 2), val or {}
    return [
        {
            "step": step,
            "loss": 5.0 - 0.01 * step,
            "step_ms": step_ms(step) if step_ms else 50.0 + step % 7,
            "strategies": strategies(step),
            "world_size": world(step),
            "skipped": False,
            **({"resumed": True} if step in resumed else {}),
            **({"val_loss": val[step]} if step in val else {}),
        }
        for step in steps
    ]


def _lines(ax, label):
    return [line for line in ax.get_lines() if line.get_label() == label]


def test_validation_losses_are_points_on_the_loss_axis(tmp_path):
    val = {10: 4.2, 20: 4.0, 30: 3.9}
    records = _records(range(1, 31), lambda s: ["r=1,linear,d=1,bmm"], val=val)
    fig = plot_training(records, tmp_path / "p.png")
    (points,) = _lines(fig.axes[0], "val loss")
    assert list(points.get_xdata()) == list(val) and list(points.get_ydata()) == list(val.values())
    assert points.get_linestyle() == "None" and points.get_marker() == "o"
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_resumes_and_world_size_changes_are_distinct_lines_not_switches():
    # a resume at 11 on the same world, one at 21 on 4 ranks (other strategies with it)
    records = _records(
        range(1, 31),
        lambda s: ["r=1,linear,d=2,bmm" if s > 20 else "r=1,linear,d=1,bmm"],
        world=lambda s: 4 if s > 20 else 2,
        resumed=(11, 21),
    )
    assert strategy_switches(records) == []
    fig = training_figure(records)
    for ax in fig.axes:
        xs = sorted(float(line.get_xdata()[0]) for line in ax.get_lines()[1:])
        assert xs == [11.0, 21.0]  # one resume line, one world line per axis, no switch line
    (resume,) = _lines(fig.axes[0], "resumed")
    (world,) = _lines(fig.axes[0], "world size 2 -> 4")
    assert resume.get_xdata()[0] == 11 and world.get_xdata()[0] == 21
    assert resume.get_color() != world.get_color()
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "resumed" in legend and "world size 2 -> 4" in legend
    assert not any("switch" in text for text in legend)


def test_a_switch_on_the_same_world_still_counts():
    records = _records(range(1, 7), lambda s: ["a" if s < 4 else "b"], world=lambda s: 2)
    assert strategy_switches(records) == [4]
    records[-1]["world_size"] = 4  # and the world change at step 6 is not one
    records[-1]["strategies"] = ["c"]
    assert strategy_switches(records) == [4]


def _overlapping(texts, renderer):
    boxes = [t.get_window_extent(renderer) for t in texts]
    return [
        (i, j) for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2) if a.overlaps(b)
    ]


@pytest.mark.parametrize("every", [1, 2, 5, 40])
def test_switch_labels_never_overlap(every):
    # two layers switching between long strategy names every ``every`` steps
    names = ["r=1,linear,d=4,scatter", "r=0,2dh,d=2,bmm", "r=1,linear,d=1,loop"]
    records = _records(range(1, 201), lambda s: [names[(s // every) % 3], names[0]])
    switches = strategy_switches(records)
    fig = training_figure(records)
    fig.canvas.draw()
    texts = fig.axes[1].texts
    assert texts and texts[0].xy[0] == switches[0]  # the first switch is always named
    assert {t.xy[0] for t in texts} <= set(switches)
    assert _overlapping(texts, fig.canvas.get_renderer()) == []
    if every >= 5:  # 20 px apart and more: room for every label
        assert len(texts) == len(switches)
    else:
        assert len(texts) < len(switches)


@pytest.mark.parametrize(
    "step_ms",
    [
        lambda s: 55.0 + s % 15,  # within one decade: matplotlib's labels read "6x10^1"
        lambda s: 0.5 * 1.05**s,  # four decades
        lambda s: 2000.0 + 10 * s,  # seconds
    ],
)
def test_log_axis_ticks_are_plain_numbers(step_ms):
    records = _records(range(1, 201), lambda s: ["a"], step_ms=step_ms)
    fig = training_figure(records)
    fig.canvas.draw()
    ax = fig.axes[1]
    lo, hi = ax.get_ylim()
    shown = [
        (t.get_text(), t.get_position()[1])
        for t in [*ax.get_yticklabels(), *ax.get_yticklabels(minor=True)]
        if t.get_text() and lo <= t.get_position()[1] <= hi
    ]
    assert len(shown) >= 2
    for text, value in shown:
        assert "10^" not in text and "×10" not in text and "$" not in text and "e" not in text
        assert float(text) == pytest.approx(value, rel=1e-9)


# ---- the profiler says what it measures -----------------------------------------------


def _tiny_layer():
    import torch

    from adaptive_moe.runtime.layer import MoELayer

    torch.manual_seed(0)
    return MoELayer(16, 32, 4, top_k=2)


@pytest.mark.parametrize("capacity_factor", [0.0, 1.5])
def test_the_announced_sweep_is_what_is_measured(capacity_factor):
    from adaptive_moe.profiling import profiler
    from adaptive_moe.tuning.workload import Buckets

    layer = _tiny_layer()
    chosen = [s for s in layer.strategies() if s.degree == 1][:3]
    sweep = {"num_buckets": 4, "strategies": chosen, "capacity_factor": capacity_factor}
    plan = profiler.plan_sweep(layer, 16, **sweep)
    lines = []
    table = profiler.profile_layer(
        layer, 16, repeats=1, warmup=0, progress=False, report=lines.append, **sweep
    )
    # T=16, W=1, E=4, k=2: workloads 8 (balanced) .. 16 (or the capacity, 12), one
    # bucket per power of two: 2 buckets (1), not the 4 asked for
    keys = sorted(table.entries)
    assert [k for k, _ in plan.workloads] == keys
    assert keys == sorted({Buckets().key(8), Buckets().key(12 if capacity_factor else 16)})
    for entry in table.entries.values():
        assert set(entry.times_ms) == set(plan.strategies) == set(chosen)
    n = 1 if capacity_factor else 2
    assert len(keys) == n
    text = plan.describe()
    assert text.startswith(f"{n} workload bucket{'s' * (n > 1)} x 3 strategies = {n * 3} runs")
    assert "4 buckets asked" in text and f"span only {n}" in text
    assert all(line.startswith("bucket ") for line in lines)


def test_no_reason_is_given_when_every_asked_bucket_is_measured():
    from adaptive_moe.profiling import profiler

    layer = _tiny_layer()
    plan = profiler.plan_sweep(layer, 16, num_buckets=1)
    m = len(layer.strategies())
    assert plan.describe() == f"1 workload bucket x {m} strategies = {m} runs"
    one = profiler.plan_sweep(layer, 16, num_buckets=2, strategies=layer.strategies()[:1])
    assert one.describe() == "2 workload buckets x 1 strategy = 2 runs"


# ---- outliers are measured again ------------------------------------------------------


def _recording_clocks(times, log):
    """One fake pass timer per row of ``times``, each returning its row in order and
    appending its index to ``log`` when called."""

    def clock(i):
        it = iter(times[i])

        def time_pass():
            log.append(i)
            return next(it)

        return time_pass

    return [clock(i) for i in range(len(times))]


def test_passes_run_in_rotated_rounds_after_every_warm_up():
    from adaptive_moe.profiling.profiler import interleaved_medians

    log = []
    times = [[9.0, 1.0, 2.0, 3.0], [9.0, 4.0, 5.0, 6.0], [9.0, 7.0, 8.0, 9.5]]
    medians, noisy = interleaved_medians(_recording_clocks(times, log), 1, 3, None)
    # warm-up of each, then round p starting at timer p: no timer always follows another
    assert log == [0, 1, 2, 0, 1, 2, 1, 2, 0, 2, 0, 1]
    assert medians == [2.0, 5.0, 8.0] and noisy == []


def test_the_group_sees_each_pass_at_its_slowest_rank():
    from adaptive_moe.profiling.profiler import interleaved_medians

    seen = []

    def slowest(ms):  # as if another rank took 1 ms longer on timer 1's passes
        seen.append(list(ms))
        return [t + (1.0 if i >= 3 else 0.0) for i, t in enumerate(ms)]

    times = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    medians, _ = interleaved_medians(_recording_clocks(times, []), 0, 3, None, slowest)
    assert seen == [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]  # one reduction, [timer, pass] order
    assert medians == [2.0, 6.0]


def test_a_spike_among_the_repeats_is_measured_again_and_the_median_kept():
    from adaptive_moe.profiling.profiler import Outliers, interleaved_medians

    log = []
    # two repeats of timer 0, one of them 187x the other: their median would be 94x the
    # truth; timer 1 is within the spread and is not measured again
    times = [[1.0, 187.0, 1.1, 0.9, 1.0, 1.2, 1.05], [2.0, 2.5]]
    medians, noisy = interleaved_medians(_recording_clocks(times, log), 0, 2, Outliers(passes=5))
    assert noisy == [0] and log.count(0) == 7 and log.count(1) == 2
    assert medians == [pytest.approx(1.05), 2.25]  # the median of all seven
    assert interleaved_medians(_recording_clocks([[1.0, 9.0]], []), 0, 2, None) == ([5.0], [])


def test_an_implausible_speedup_over_the_default_is_measured_again():
    from adaptive_moe.core.strategy import Strategy
    from adaptive_moe.profiling.profiler import Outliers, recheck_speedup

    default, best, other = (
        Strategy(1, "linear", 1, "bmm"),
        Strategy(0, "linear", 1, "scatter"),
        Strategy(1, "linear", 2, "bmm"),
    )
    times = {default: 187.0, best: 1.0, other: 3.0}  # the default hit a spike
    again = {default: 2.0, best: 1.0}
    seen = []

    def remeasure(s):
        seen.append(s)
        return again[s]

    out, note = recheck_speedup(times, default, Outliers(speedup=10.0, passes=5), remeasure)
    assert sorted(seen) == sorted([default, best])
    assert out == {default: 2.0, best: 1.0, other: 3.0}
    assert "187.0x" in note and "re-measured" in note and "now 2.0x" in note
    # a plausible speed-up is kept as measured
    plausible = {default: 5.0, best: 1.0}
    assert recheck_speedup(plausible, default, Outliers(), remeasure) == (plausible, "")
    assert len(seen) == 2


def test_outlier_settings_are_checked():
    from adaptive_moe.profiling.profiler import Outliers

    with pytest.raises(ValueError, match=r"Outliers\.spread"):
        Outliers(spread=1.0)
    with pytest.raises(ValueError, match=r"Outliers\.passes"):
        Outliers(passes=0)


def test_a_re_measure_is_reported_by_the_profiler():
    from adaptive_moe.profiling import profiler

    layer = _tiny_layer()
    chosen = [layer.default_strategy, *[s for s in layer.strategies() if s.degree == 1][:1]]
    lines = []
    # a spread below 1.0001 is beaten by timing noise on any machine: every strategy of
    # every bucket is measured again, and said so
    table = profiler.profile_layer(
        layer,
        16,
        num_buckets=1,
        repeats=2,
        warmup=0,
        strategies=chosen,
        progress=False,
        outliers=profiler.Outliers(spread=1.0001, passes=1),
        report=lines.append,
    )
    (key,) = table.entries
    (line,) = [line for line in lines if "whose slowest" in line]
    assert line.startswith(f"bucket {key}: re-measured {len(set(chosen))} strategies ")
    assert all(str(s) in line for s in chosen) and "median of 3 passes kept" in line
    assert all(line.startswith(f"bucket {key}: ") for line in lines)

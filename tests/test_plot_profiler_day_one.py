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

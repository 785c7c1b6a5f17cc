"""Workload buckets and the strategy table: round trip, matching, corruption, lookup."""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
from fractions import Fraction

import msgpack
import pytest
import torch

from adaptive_moe.core.strategy import Strategy
from adaptive_moe.tuning.table import (
    FORMAT_VERSION,
    Fingerprint,
    LayerShape,
    Measurement,
    StrategyTable,
)
from adaptive_moe.tuning.workload import Buckets

# ---- buckets --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "log"},
        {"ratio": 1.0},
        {"ratio": 0.5},
        {"ratio": float("nan")},
        {"ratio": float("inf")},
        {"ratio": True},
        {"window": 0},
        {"window": 2.5},
        {"window": True},
    ],
)
def test_buckets_reject_bad_settings(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"Buckets.{name}"):
        Buckets(**kwargs)


@pytest.mark.parametrize("bad", [-1, 2.0, True, "3"])
def test_bucket_key_rejects_non_counts(bad):
    with pytest.raises(ValueError, match="max_tokens"):
        Buckets().key(bad)


def _exact_geometric_key(n: int, ratio: Fraction) -> int:
    """Independent reference: the number of powers ratio**j (j >= 0) that are <= n."""
    key, edge = 0, Fraction(1)
    while edge <= n:
        key, edge = key + 1, edge * ratio
    return key


@pytest.mark.parametrize("ratio", [Fraction(2), Fraction(3, 2), Fraction(5, 4), Fraction(3)])
def test_geometric_keys_match_exact_reference(ratio):
    b = Buckets(ratio=float(ratio))
    for n in range(0, 5000):
        assert b.key(n) == _exact_geometric_key(n, ratio), n
    # far out, where float log() is least exact
    for n in (2**40 - 1, 2**40, 2**40 + 1, 3**25, 3**25 - 1):
        assert b.key(n) == _exact_geometric_key(n, ratio), n


def test_ratio_two_keys_are_bit_lengths():
    b = Buckets()
    for n in range(0, 1 << 12):
        assert b.key(n) == n.bit_length()


@pytest.mark.parametrize(
    "b",
    [
        Buckets(),
        Buckets(ratio=1.1),
        Buckets("linear", window=128),
        Buckets("linear", window=1),
        Buckets("linear", window=7),
    ],
)
def test_keys_are_monotone_and_representatives_round_trip(b):
    keys = [b.key(n) for n in range(0, 3000)]
    assert all(a <= c for a, c in itertools.pairwise(keys))
    for k in sorted(set(keys)):
        assert b.key(b.representative(k)) == k


def test_linear_keys_follow_tutel_window():
    b = Buckets("linear", window=128)
    for n in range(0, 1000):
        assert b.key(n) == n // 128
    assert b.representative(2) == 256 + 63


def test_representative_of_empty_geometric_bucket_is_refused():
    b = Buckets(ratio=1.1)  # bucket 2 is [1.1, 1.21): no integer inside
    with pytest.raises(ValueError, match="holds no integer"):
        b.representative(2)


# ---- the table ------------------------------------------------------------------------

FP = Fingerprint("cpu", 4, 2, "gloo", "2.13")
SHAPE = LayerShape(64, 128, 8, 2, True, "float32", 1)
S_LOOP = Strategy(1, "linear", 1, "loop")
S_2DH = Strategy(1, "2dh", 2, "bmm")
S_DP = Strategy(0, "linear", 4, "loop")


def _how(max_tokens: int = 96, date: str = "2025-01-02T03:04:05Z") -> Measurement:
    return Measurement(
        repeats=7,
        warmup=2,
        timer="perf_counter",
        tokens_per_rank=64,
        max_tokens=max_tokens,
        skew=max_tokens / 64.0,
        date=date,
    )


def _table() -> StrategyTable:
    t = StrategyTable(FP, SHAPE, Buckets(ratio=1.5))
    t.add_bucket(3, {S_LOOP: 1.25, S_2DH: 0.75, S_DP: 3.5}, _how(3))
    t.add_bucket(7, {S_LOOP: 2.0, S_2DH: 2.5}, _how(12))
    t.add_bucket(11, {S_DP: 9.0}, _how(60, "2025-02-01T00:00:00Z"))
    return t


def test_round_trip_keeps_every_field(tmp_path):
    t = _table()
    path = tmp_path / "t.msgpack"
    t.save(path)
    back = StrategyTable.load(path)
    assert back == t  # fingerprint, shape, buckets and every entry (times, best, how)
    assert back.to_dict() == t.to_dict()
    assert back.source == str(path)
    assert back.buckets == Buckets(ratio=1.5)
    assert back.entries[3].times_ms == {S_LOOP: 1.25, S_2DH: 0.75, S_DP: 3.5}
    assert back.entries[3].best == S_2DH
    assert back.entries[11].how.date == "2025-02-01T00:00:00Z"


def test_best_is_argmin_and_ties_go_to_the_smaller_strategy():
    t = StrategyTable(FP, SHAPE)
    t.add_bucket(1, {S_LOOP: 2.0, S_DP: 2.0, S_2DH: 5.0}, _how())
    assert t.entries[1].best == min(S_LOOP, S_DP) == S_DP


def test_fingerprint_current_on_cpu():
    fp = Fingerprint.current(2, 2, "gloo", "cpu")
    major, minor = torch.__version__.split(".")[:2]
    assert fp == Fingerprint("cpu", 2, 2, "gloo", f"{major}.{minor}")


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (Fingerprint, {**dataclasses.asdict(FP), "ranks_per_node": 3}, "ranks_per_node"),
        (Fingerprint, {**dataclasses.asdict(FP), "world_size": 0}, "world_size"),
        (LayerShape, {**dataclasses.asdict(SHAPE), "top_k": 9}, "top_k"),
        (LayerShape, {**dataclasses.asdict(SHAPE), "dtype": "fp8"}, "dtype"),
        (LayerShape, {**dataclasses.asdict(SHAPE), "glu": 1}, "glu"),
        (Measurement, {**dataclasses.asdict(_how()), "timer": "wall"}, "timer"),
        (Measurement, {**dataclasses.asdict(_how()), "skew": -1.0}, "skew"),
    ],
)
def test_records_validate_their_fields(cls, kwargs, field):
    with pytest.raises(ValueError, match=f"{cls.__name__}.{field}"):
        cls(**kwargs)


def test_mismatch_names_every_differing_field_with_both_values():
    t = _table()
    run_fp = dataclasses.replace(FP, world_size=8, backend="nccl")
    run_shape = dataclasses.replace(SHAPE, d_model=128, dtype="bfloat16")
    with pytest.raises(ValueError) as err:
        t.check(run_fp, run_shape)
    msg = str(err.value)
    for expected in (
        "fingerprint.world_size: table 4, run 8",
        "fingerprint.backend: table 'gloo', run 'nccl'",
        "shape.d_model: table 64, run 128",
        "shape.dtype: table 'float32', run 'bfloat16'",
    ):
        assert expected in msg
    for same in (
        "device",
        "ranks_per_node",
        "torch_version",
        "d_ff",
        "num_experts",
        "top_k",
        "glu",
        "shards",
    ):
        assert f".{same}:" not in msg


def test_mismatch_allowed_warns_and_names_the_file(tmp_path):
    path = tmp_path / "t.msgpack"
    _table().save(path)
    t = StrategyTable.load(path)
    with pytest.warns(UserWarning, match=r"shape\.top_k: table 2, run 1") as rec:
        t.check(FP, dataclasses.replace(SHAPE, top_k=1), allow_mismatch=True)
    assert str(path) in str(rec[0].message)


def test_matching_run_passes_silently(recwarn):
    _table().check(FP, SHAPE)
    _table().check(FP, SHAPE, allow_mismatch=True)
    assert len(recwarn) == 0


def test_nearest_bucket_lookup():
    # ratio 2: key(n) == n.bit_length(); measured keys 3, 6, 10 with distinct bests
    t = StrategyTable(FP, SHAPE)
    t.add_bucket(3, {S_LOOP: 1.0, S_DP: 2.0}, _how())
    t.add_bucket(6, {S_2DH: 1.0, S_LOOP: 2.0}, _how())
    t.add_bucket(10, {S_DP: 1.0, S_2DH: 2.0}, _how())
    cases = {
        0: S_LOOP,  # below the measured range
        1: S_LOOP,
        4: S_LOOP,  # key 3, exact
        8: S_LOOP,  # key 4: 3 is nearer than 6
        16: S_2DH,  # key 5: 6 is nearer
        32: S_2DH,  # key 6, exact
        128: S_2DH,  # key 8: tie between 6 and 10 -> the smaller key
        256: S_DP,  # key 9
        1 << 30: S_DP,  # far above the measured range
    }
    for max_tokens, expected in cases.items():
        assert t.lookup(max_tokens) == expected, max_tokens
    assert t.nearest_key(8) == 6
    assert t.best_for(7) == S_2DH


def test_lookup_on_empty_table_is_an_error():
    with pytest.raises(ValueError, match="no measured buckets"):
        StrategyTable(FP, SHAPE).lookup(10)


def test_record_updates_times_and_best():
    t = StrategyTable(FP, SHAPE)
    t.add_bucket(4, {S_LOOP: 1.0, S_2DH: 2.0}, _how())
    t.record(4, S_2DH, 0.5)
    assert t.entries[4].best == S_2DH and t.entries[4].times_ms[S_2DH] == 0.5
    t.record(4, S_2DH, 3.0)  # re-measured slower: the best moves back
    assert t.entries[4].best == S_LOOP
    t.record(4, S_DP, 0.25)  # a strategy not measured offline
    assert t.entries[4].best == S_DP and set(t.entries[4].times_ms) == {S_LOOP, S_2DH, S_DP}
    with pytest.raises(ValueError, match="bucket 9 is not in the table"):
        t.record(9, S_DP, 1.0)
    t.record(9, S_DP, 1.0, how=_how(300))
    assert t.best_for(9) == S_DP and t.entries[9].how.max_tokens == 300
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite time > 0"):
            t.record(4, S_LOOP, bad)


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "t.msgpack"
    old = _table()
    old.save(path)
    new = StrategyTable(FP, SHAPE)
    new.add_bucket(1, {S_LOOP: 1.0}, _how())

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        new.save(path)
    monkeypatch.undo()
    assert StrategyTable.load(path) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.msgpack"]  # no temp file left


# ---- corrupt files ---------------------------------------------------------------------


def _load_error(path) -> str:
    with pytest.raises(ValueError) as err:
        StrategyTable.load(path)
    assert str(path) in str(err.value)
    return str(err.value)


def test_random_bytes_are_refused(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "noise.msgpack"
    for _ in range(200):
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300))))
        _load_error(path)


def test_every_truncation_is_refused(tmp_path):
    good = tmp_path / "good.msgpack"
    _table().save(good)
    data = good.read_bytes()
    cut = tmp_path / "cut.msgpack"
    # every cut inside the header, a spread through the entries, and the last bytes
    lengths = {*range(64), *range(64, len(data), 13), *range(len(data) - 8, len(data))}
    for n in sorted(lengths):
        cut.write_bytes(data[:n])
        _load_error(cut)


def _mutated(mutate) -> dict:
    d = _table().to_dict()
    mutate(d)
    return d


WRONG_SCHEMAS = {
    "not a map": [1, 2, 3],
    "other format": {"hello": "world"},
    "missing field": _mutated(lambda d: d.pop("buckets")),
    "unknown field": _mutated(lambda d: d.update(extra=1)),
    "string int": _mutated(lambda d: d["fingerprint"].update(world_size="4")),
    "bad strategy": _mutated(lambda d: d["entries"][0]["best"].update(kernel="cublas")),
    "extra strategy field": _mutated(lambda d: d["entries"][0]["best"].update(x=1)),
    "negative time": _mutated(lambda d: d["entries"][0]["times"][0].update(ms=-1.0)),
    "best not measured": _mutated(lambda d: d["entries"][2].update(best=S_LOOP.to_dict())),
    "duplicate bucket": _mutated(lambda d: d["entries"].append(d["entries"][0])),
    "duplicate strategy": _mutated(
        lambda d: d["entries"][0]["times"].append(d["entries"][0]["times"][0])
    ),
    "empty times": _mutated(lambda d: d["entries"][0].update(times=[])),
    "entries not a list": _mutated(lambda d: d.update(entries={"a": 1})),
    "ext type": _mutated(lambda d: d["entries"][0].update(how=msgpack.ExtType(5, b"x"))),
    "bad buckets": _mutated(lambda d: d["buckets"].update(ratio=1.0)),
    "bad timer": _mutated(lambda d: d["entries"][1]["how"].update(timer="wall")),
}


@pytest.mark.parametrize("name", sorted(WRONG_SCHEMAS))
def test_valid_msgpack_of_the_wrong_schema_is_refused(tmp_path, name):
    path = tmp_path / "wrong.msgpack"
    path.write_bytes(msgpack.packb(WRONG_SCHEMAS[name], use_bin_type=True))
    _load_error(path)


def test_other_format_version_is_refused_with_both_versions(tmp_path):
    path = tmp_path / "future.msgpack"
    d = _table().to_dict()
    d["version"] = FORMAT_VERSION + 1
    path.write_bytes(msgpack.packb(d))
    msg = _load_error(path)
    assert f"format version {FORMAT_VERSION + 1}" in msg and f"version {FORMAT_VERSION}" in msg


def test_non_string_map_keys_are_refused(tmp_path):
    path = tmp_path / "intkeys.msgpack"
    path.write_bytes(msgpack.packb({1: 2}))
    _load_error(path)


def test_saved_file_gets_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        _table().save(tmp_path / "t.msgpack")
    finally:
        os.umask(old)
    assert (tmp_path / "t.msgpack").stat().st_mode & 0o777 == 0o644

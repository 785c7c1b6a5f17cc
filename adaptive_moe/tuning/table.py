"""The strategy table: the offline profile the layer looks its strategy up in.

A table belongs to one launch fingerprint (device, world size, ranks per node, backend,
torch version) and one layer shape. Per workload bucket (``adaptive_moe.tuning.workload``) it
holds the median time of every strategy measured there, the best one, and how it was
measured. It is stored as versioned msgpack; the format is described field by field in
``profiles/README.md``. Loading never executes code: msgpack carries only plain data,
and every field is checked against the schema before any object is built.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgpack

from adaptive_moe.core.checks import int_at_least, non_negative_int, positive_int
from adaptive_moe.core.dtype_names import DTYPES, SHORT_NAMES
from adaptive_moe.core.fileio import atomic_write
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.tuning.workload import Buckets

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "adaptive_moe.strategy_table"
FORMAT_VERSION = 2
# Version 1 had no ``predicted`` field; such files (the shipped tables) still load.
READ_VERSIONS: tuple[int, ...] = (1, 2)
TIMERS: tuple[str, ...] = ("cuda-events", "perf_counter", "predicted")
Timer = Literal["cuda-events", "perf_counter", "predicted"]


def _nonempty_str(owner: str, name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{owner}.{name} must be a non-empty string, got {value!r}")


def _positive_ms(name: str, value: object) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite time > 0 ms, got {value!r}")
    return float(value)


def torch_version() -> str:
    """``major.minor`` of the installed torch (the one ``import torch`` loads): patch
    releases do not change kernel speed, minor releases may. Read from the package's
    metadata, so that planning, which never runs a kernel, need not import torch."""
    return ".".join(importlib.metadata.version("torch").split("+")[0].split(".")[:2])


def device_name(device: torch.device | str) -> str:
    """What the fingerprint calls ``device``: the CUDA device's name, else its type."""
    import torch  # here: planning, which never names a device, stays torch-free

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """Where a table was measured; a table is valid only where this matches.

    Attributes:
        device: ``torch.cuda.get_device_name`` on GPU, ``"cpu"`` on CPU.
        world_size: W, ranks in the expert group.
        ranks_per_node: ranks sharing one node (2DH all-to-all depends on it).
        backend: torch.distributed backend (``"nccl"``, ``"gloo"``), ``"none"`` without
            a process group.
        torch_version: ``major.minor`` of torch.
    """

    device: str
    world_size: int
    ranks_per_node: int
    backend: str
    torch_version: str

    def __post_init__(self) -> None:
        _nonempty_str("Fingerprint", "device", self.device)
        positive_int("Fingerprint.world_size", self.world_size)
        positive_int("Fingerprint.ranks_per_node", self.ranks_per_node)
        if self.world_size % self.ranks_per_node:
            raise ValueError(
                f"Fingerprint.ranks_per_node={self.ranks_per_node} must divide "
                f"world_size={self.world_size}"
            )
        _nonempty_str("Fingerprint", "backend", self.backend)
        _nonempty_str("Fingerprint", "torch_version", self.torch_version)

    @classmethod
    def current(
        cls, world_size: int, ranks_per_node: int, backend: str, device: torch.device | str
    ) -> Fingerprint:
        """The fingerprint of this process: ``device`` named as the table names it,
        torch's version read from the running torch."""
        return cls(device_name(device), world_size, ranks_per_node, backend, torch_version())

    @property
    def nodes(self) -> int:
        return self.world_size // self.ranks_per_node


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """The shape of the MoE layer a table was measured for (notation in ``config``).

    Attributes:
        d_model, d_ff, num_experts, top_k: d, h, E, k.
        glu: gated experts (``gate_up_proj``) or plain FFN (``up_proj``).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        shards: s, ranks sharing one expert (``ShardLayout.shards``).
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    glu: bool
    dtype: str
    shards: int

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k", "shards"):
            positive_int(f"LayerShape.{name}", getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(
                f"LayerShape.top_k={self.top_k} must be <= num_experts={self.num_experts}"
            )
        if not isinstance(self.glu, bool):
            raise ValueError(f"LayerShape.glu must be a bool, got {self.glu!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"LayerShape.dtype must be one of {DTYPES}, got {self.dtype!r}")

    def label(self) -> str:
        """Short name for file names, e.g. ``d64-h128-e8-k2-glu-fp32``."""
        parts = [f"d{self.d_model}", f"h{self.d_ff}", f"e{self.num_experts}", f"k{self.top_k}"]
        parts += ["glu" if self.glu else "ffn", SHORT_NAMES[self.dtype]]
        if self.shards > 1:
            parts.append(f"s{self.shards}")
        return "-".join(parts)


@dataclasses.dataclass(frozen=True)
class Measurement:
    """How one bucket was measured.

    Attributes:
        repeats: timed forward+backward passes per strategy (the median is kept).
        warmup: untimed passes before them.
        timer: ``"cuda-events"`` (GPU), ``"perf_counter"`` (CPU, after a barrier), or
            ``"predicted"`` (a cost-model time, ``adaptive_moe.planning``).
        tokens_per_rank: T of the synthetic batch.
        max_tokens: the workload of the synthetic routing (max rows of any expert
            across the group).
        skew: ``max_tokens`` over its balanced value ``T * W * k / E`` (1 = balanced).
        date: UTC time of the measurement, ISO 8601.
    """

    repeats: int
    warmup: int
    timer: Timer
    tokens_per_rank: int
    max_tokens: int
    skew: float
    date: str

    def __post_init__(self) -> None:
        positive_int("Measurement.repeats", self.repeats)
        int_at_least("Measurement.warmup", self.warmup, 0)
        if self.timer not in TIMERS:
            raise ValueError(f"Measurement.timer must be one of {TIMERS}, got {self.timer!r}")
        positive_int("Measurement.tokens_per_rank", self.tokens_per_rank)
        positive_int("Measurement.max_tokens", self.max_tokens)
        skew_ok = isinstance(self.skew, (int, float)) and not isinstance(self.skew, bool)
        if not (skew_ok and math.isfinite(self.skew) and self.skew > 0):
            raise ValueError(f"Measurement.skew must be a finite number > 0, got {self.skew!r}")
        _nonempty_str("Measurement", "date", self.date)


@dataclasses.dataclass(frozen=True)
class BucketEntry:
    """One measured bucket: median ms of every strategy, the fastest, and how."""

    times_ms: Mapping[Strategy, float]
    best: Strategy
    how: Measurement

    @classmethod
    def from_times(cls, times_ms: Mapping[Strategy, float], how: Measurement) -> BucketEntry:
        """Entry whose ``best`` is the fastest strategy (ties: the smaller Strategy)."""
        if not times_ms:
            raise ValueError("a bucket needs at least one measured strategy, got none")
        times = {}
        for strategy, ms in times_ms.items():
            if not isinstance(strategy, Strategy):
                raise ValueError(f"times_ms keys must be Strategy values, got {strategy!r}")
            times[strategy] = _positive_ms(f"time of {strategy}", ms)
        best = min(times, key=lambda s: (times[s], s))
        return cls(times, best, how)


@dataclasses.dataclass
class StrategyTable:
    """Per-bucket strategy times for one fingerprint and layer shape.

    Attributes:
        fingerprint: where it was measured.
        shape: the layer it was measured for.
        buckets: how ``max_tokens`` maps to the keys of ``entries``.
        entries: measured buckets, by key.
        source: the file it was loaded from (for messages; not saved).
        predicted: None for a measured table; for one predicted by the scale planner
            (``adaptive_moe.planning``), the model and its inputs as plain data (maps,
            lists, strings, numbers). Online exploration refines a predicted table as
            it refines a measured one.
    """

    fingerprint: Fingerprint
    shape: LayerShape
    buckets: Buckets = dataclasses.field(default_factory=Buckets)
    entries: dict[int, BucketEntry] = dataclasses.field(default_factory=dict)
    source: str | None = dataclasses.field(default=None, compare=False)
    predicted: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.predicted is not None:
            _plain(self.predicted, "predicted")

    # ---- building and updating ----------------------------------------------------

    def add_bucket(self, key: int, times_ms: Mapping[Strategy, float], how: Measurement) -> None:
        """Store (or replace) the measurements of bucket ``key``."""
        self.entries[_key(key)] = BucketEntry.from_times(times_ms, how)

    def record(
        self, key: int, strategy: Strategy, ms: float, how: Measurement | None = None
    ) -> None:
        """Online re-measurement: set ``strategy``'s time in bucket ``key`` to ``ms`` and
        re-pick the best. A bucket not yet in the table is created only when ``how``
        says how it is being measured."""
        key = _key(key)
        entry = self.entries.get(key)
        if entry is None:
            if how is None:
                raise ValueError(
                    f"bucket {key} is not in the table; pass how=Measurement(...) to start it"
                )
            self.add_bucket(key, {strategy: ms}, how)
            return
        times = {**entry.times_ms, strategy: ms}
        self.entries[key] = BucketEntry.from_times(times, how or entry.how)

    # ---- looking up -----------------------------------------------------------------

    def nearest_key(self, key: int) -> int:
        """The measured key closest to ``key`` (ties: the smaller one)."""
        key = _key(key)
        if not self.entries:
            raise ValueError(f"strategy table{self._where()} has no measured buckets")
        if key in self.entries:
            return key
        return min(self.entries, key=lambda k: (abs(k - key), k))

    def best_for(self, key: int) -> Strategy:
        """Best strategy of bucket ``key``, or of the nearest measured bucket."""
        return self.entries[self.nearest_key(key)].best

    def lookup(self, max_tokens: int) -> Strategy:
        """Best strategy for a forward whose busiest expert receives ``max_tokens`` rows."""
        return self.best_for(self.buckets.key(max_tokens))

    # ---- matching the run -----------------------------------------------------------

    def mismatches(self, fingerprint: Fingerprint, shape: LayerShape) -> list[str]:
        """``"field: table X, run Y"`` for every field that differs from the run."""
        out = []
        for prefix, mine, theirs in (
            ("fingerprint", self.fingerprint, fingerprint),
            ("shape", self.shape, shape),
        ):
            for f in dataclasses.fields(mine):
                a, b = getattr(mine, f.name), getattr(theirs, f.name)
                if a != b:
                    out.append(f"{prefix}.{f.name}: table {a!r}, run {b!r}")
        return out

    def check(
        self, fingerprint: Fingerprint, shape: LayerShape, *, allow_mismatch: bool = False
    ) -> None:
        """Raise ValueError naming every field in which the table differs from the run;
        with ``allow_mismatch`` warn instead (the times may then not apply)."""
        diffs = self.mismatches(fingerprint, shape)
        if not diffs:
            return
        msg = f"strategy table{self._where()} does not match this run: " + "; ".join(diffs)
        if not allow_mismatch:
            raise ValueError(
                msg + " (re-profile, or use it anyway: MoELayer(..., allow_table_mismatch=True)"
                " or layer.use_table(table, allow_mismatch=True))"
            )
        warnings.warn(msg + "; using it anyway (allow_mismatch=True)", UserWarning, stacklevel=2)

    def _where(self) -> str:
        return f" {self.source}" if self.source else ""

    # ---- files ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The table as plain data, exactly what is written to the file."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "fingerprint": dataclasses.asdict(self.fingerprint),
            "shape": dataclasses.asdict(self.shape),
            "buckets": self.buckets.to_dict(),
            "entries": [_entry_to_dict(k, e) for k, e in sorted(self.entries.items())],
            "predicted": self.predicted,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the table to ``path`` atomically: a crash or full disk leaves either the
        old file or the new one, never half of one."""
        data = msgpack.packb(self.to_dict(), use_bin_type=True)
        atomic_write(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> StrategyTable:
        """Read a table written by ``save``. Raises ValueError naming the file when it is
        not a valid table (corrupt, truncated, another schema or format version)."""
        raw = Path(path).read_bytes()
        try:
            data = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
        except (msgpack.exceptions.UnpackException, ValueError) as err:
            # ExtraData, FormatError, StackError, "incomplete input" (truncation) and bad
            # UTF-8 all land here; they are ValueErrors or UnpackExceptions.
            raise ValueError(f"{path}: not a strategy table (corrupt msgpack: {err})") from err
        try:
            table = _table_from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: not a valid strategy table: {err}") from err
        table.source = str(path)
        return table


# ---- serialisation helpers -----------------------------------------------------------


def _key(key: object) -> int:
    non_negative_int("bucket key", key)
    return key


def _entry_to_dict(key: int, entry: BucketEntry) -> dict[str, Any]:
    return {
        "key": key,
        "best": entry.best.to_dict(),
        "times": [{"strategy": s.to_dict(), "ms": ms} for s, ms in sorted(entry.times_ms.items())],
        "how": dataclasses.asdict(entry.how),
    }


def _fields(obj: object, where: str, names: tuple[str, ...]) -> dict[str, Any]:
    """``obj`` as a map with exactly the keys ``names``."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a map, got {type(obj).__name__}")
    missing, extra = set(names) - set(obj), set(obj) - set(names)
    if missing or extra:
        raise ValueError(
            f"{where}: expected fields {sorted(names)}"
            + (f", missing {sorted(missing)}" if missing else "")
            + (f", unknown {sorted(extra)}" if extra else "")
        )
    return obj


def _build(cls: Callable[..., Any], obj: object, where: str) -> Any:
    names = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    try:
        return cls(**_fields(obj, where, names))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def _list(obj: object, where: str) -> list[Any]:
    if not isinstance(obj, list):
        raise ValueError(f"{where}: expected a list, got {type(obj).__name__}")
    return obj


def _entry_from_dict(obj: object, where: str) -> tuple[int, BucketEntry]:
    fields = _fields(obj, where, ("key", "best", "times", "how"))
    try:
        key = _key(fields["key"])
    except ValueError as err:
        raise ValueError(f"{where}.key: {err}") from err
    times: dict[Strategy, float] = {}
    for i, item in enumerate(_list(fields["times"], f"{where}.times")):
        at = f"{where}.times[{i}]"
        pair = _fields(item, at, ("strategy", "ms"))
        strategy = _build(Strategy, pair["strategy"], f"{at}.strategy")
        if strategy in times:
            raise ValueError(f"{at}: strategy {strategy} appears twice")
        times[strategy] = _positive_ms(f"{at}.ms", pair["ms"])
    if not times:
        raise ValueError(f"{where}.times: no measured strategy")
    best = _build(Strategy, fields["best"], f"{where}.best")
    if best not in times:
        raise ValueError(f"{where}.best: {best} is not among the measured strategies")
    return key, BucketEntry(times, best, _build(Measurement, fields["how"], f"{where}.how"))


def _plain(obj: object, where: str) -> None:
    """ValueError unless ``obj`` is msgpack-plain data: str-keyed maps, lists, str,
    int, float, bool, None."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return
    if isinstance(obj, dict):
        if any(not isinstance(k, str) for k in obj):
            raise ValueError(f"{where}: map keys must be strings")
        for k, v in obj.items():
            _plain(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _plain(v, f"{where}[{i}]")
        return
    raise ValueError(f"{where}: expected plain data, got {type(obj).__name__}")


def _table_from_dict(data: object) -> StrategyTable:
    names = ("format", "version", "fingerprint", "shape", "buckets", "entries")
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ValueError(f"no 'format': {FORMAT_NAME!r} field at the top level")
    version = data.get("version")
    if version not in READ_VERSIONS:
        raise ValueError(
            f"format version {version!r}, this adaptive_moe reads version {FORMAT_VERSION} "
            f"(and {', '.join(map(str, READ_VERSIONS[:-1]))})"
        )
    if version >= 2:
        names += ("predicted",)
    top = _fields(data, "table", names)
    predicted = top.get("predicted")
    if predicted is not None and not isinstance(predicted, dict):
        raise ValueError(f"predicted: expected a map or nil, got {type(predicted).__name__}")
    entries: dict[int, BucketEntry] = {}
    for i, item in enumerate(_list(top["entries"], "entries")):
        key, entry = _entry_from_dict(item, f"entries[{i}]")
        if key in entries:
            raise ValueError(f"entries[{i}].key: bucket {key} appears twice")
        entries[key] = entry
    return StrategyTable(
        fingerprint=_build(Fingerprint, top["fingerprint"], "fingerprint"),
        shape=_build(LayerShape, top["shape"], "shape"),
        buckets=_build(Buckets, top["buckets"], "buckets"),
        entries=entries,
        predicted=predicted,
    )

"""A byte-level corpus and deterministic, resumable per-rank batches.

    corpus      [N] uint8     the bytes of the source files, concatenated
    train / val               the first (1 - val_fraction) of the bytes / the rest
    window i    [T + 1]       bytes [i*T, i*T + T + 1): inputs are the first T, targets
                              the last T (next byte)
    batch       [B, T] int64  inputs and targets of this rank

The default corpus is the Python standard library's own ``.py`` files, which every
machine with Python has, read in sorted order up to a size cap, so it needs no download
and is the same on every rank. Third-party packages installed inside the standard
library's directory (``site-packages``) are not part of it.

Batches are a pure function of a *position*: the number of windows the whole job has
consumed. Window order is a fresh permutation per epoch (seeded by ``seed`` and the
epoch), the global batch at position p is windows p .. p + W*B - 1 of that order, and
rank r takes its r-th block of B. So the global batch does not depend on how it is split
over ranks, and resuming needs only the saved position.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from adaptive_moe.core.checks import int_at_least, positive_int

DEFAULT_MAX_BYTES = 8 << 20
_SEPARATOR = b"\n\n"
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_dir() -> Path:
    """Directory of the running Python's standard library."""
    path = sysconfig.get_paths().get("stdlib")
    return Path(path) if path else Path(os.path.dirname(os.__file__))


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files in a deterministic (sorted) order."""
    root = root or stdlib_dir()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Bytes to train on and where they came from.

    Attributes:
        data: [N] uint8 tensor.
        source: human-readable origin (``"python stdlib (…)"`` or the file paths).
        sha256: digest of ``data``; a resumed run checks it is training on the same bytes.
    """

    data: torch.Tensor
    source: str
    sha256: str

    def __len__(self) -> int:
        return int(self.data.numel())


def _read_capped(files: Iterable[Path], max_bytes: int) -> bytes:
    parts, size = [], 0
    for i, path in enumerate(files):
        chunk = (_SEPARATOR if i else b"") + path.read_bytes()
        parts.append(chunk[: max_bytes - size])
        size += len(parts[-1])
        if size >= max_bytes:
            break
    return b"".join(parts)


def load_corpus(
    paths: Sequence[str | os.PathLike[str]] = (), max_bytes: int = DEFAULT_MAX_BYTES
) -> Corpus:
    """The files in ``paths`` (in the given order), or the standard library's sources
    when ``paths`` is empty, concatenated and cut at ``max_bytes``."""
    positive_int("max_bytes", max_bytes)
    if paths:
        files = [Path(p) for p in paths]
        for f in files:
            if not f.is_file():
                raise ValueError(f"data file {str(f)!r} does not exist or is not a regular file")
        source = ", ".join(map(str, files))
    else:
        files = stdlib_sources()
        source = f"python stdlib sources ({stdlib_dir()})"
    raw = _read_capped(files, max_bytes)
    if not raw:
        raise ValueError(f"the corpus ({source}) is empty")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)  # [N]
    return Corpus(data, source, hashlib.sha256(raw).hexdigest())


def split(corpus: Corpus, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train [N_t] uint8, val [N_v] uint8): the last ``val_fraction`` of the bytes is val."""
    if not (isinstance(val_fraction, float | int) and 0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    cut = len(corpus) - math.ceil(len(corpus) * val_fraction)
    return corpus.data[:cut], corpus.data[cut:]


class WindowSampler:
    """Deterministic batches of byte windows from a position (see module docstring).

    Args:
        data: [N] uint8 bytes.
        seq_len: T.
        batch_size: B, windows per rank per batch.
        rank, world: this rank and the number of ranks; the global batch is W*B windows.
        seed: seeds the per-epoch window order.
        shuffle: False reads windows in order (validation).
    """

    def __init__(
        self,
        data: torch.Tensor,
        seq_len: int,
        batch_size: int,
        rank: int,
        world: int,
        seed: int,
        shuffle: bool = True,
    ):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("world", world)):
            positive_int(name, value)
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}), got {rank!r}")
        self.data, self.seq_len = data, seq_len
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.num_windows = (len(data) - 1) // seq_len
        if self.num_windows < self.global_batch:
            raise ValueError(
                f"the data ({len(data)} bytes) holds {self.num_windows} windows of "
                f"seq_len={seq_len}, fewer than one global batch of {self.global_batch} "
                f"(batch_size={batch_size} x {world} ranks): use more data or smaller batches"
            )
        self._epoch_order: tuple[int, torch.Tensor] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_windows)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch_order = (epoch, torch.randperm(self.num_windows, generator=gen))
        return self._epoch_order[1]

    def windows(self, position: int) -> list[int]:
        """Window ids of this rank's share of the global batch starting at ``position``."""
        first = position + self.rank * self.batch_size
        ids = []
        for j in range(first, first + self.batch_size):
            ids.append(int(self._order(j // self.num_windows)[j % self.num_windows]))
        return ids

    def batch(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [B, T] int64, targets [B, T] int64) of this rank at ``position``."""
        int_at_least("position", position, 0)
        t = self.seq_len
        starts = torch.tensor(self.windows(position)) * t  # [B]
        idx = starts[:, None] + torch.arange(t + 1)  # [B, T+1]
        rows = self.data[idx].long()  # [B, T+1]
        return rows[:, :-1], rows[:, 1:]

"""Training checkpoints: sharded (``torch.distributed.checkpoint``), atomic, and loadable
on any number of ranks.

On disk, under a root directory (a run's ``checkpoints/``)::

    step_00000100/            one complete checkpoint: DCP's ``.metadata`` and
                              ``__<rank>_0.distcp`` files, plus ``meta.json``
    latest                    text: the name of the newest complete checkpoint
    .step_00000150.partial/   a save in progress (removed by the next save)

What is saved (tensors only; nothing that loading would have to unpickle):

    model/<param>                 replicated parameters, written once (DCP de-duplicates)
    model/<moe>.experts.gate_up_proj [E, 2, h, d]  expert parameters in their *global view*
    model/<moe>.experts.down_proj    [E, d, h]     (``adaptive_moe.runtime.experts.placement``): the
                                  DTensors ``MoELayer.state_dict()`` presents, each rank
                                  contributing only its shard
    optim/<param>/<state>         AdamW moments, in the same view as their parameter;
                                  scalars as is
    train/step, train/data_position, train/skipped_steps   int64 scalars
    rng/rank<r>/cpu, rng/rank<r>/cuda                      each rank's RNG state

Resharding is DCP's own: an expert tensor is one box per rank of the global view (E >= W:
mesh (W,), placements (Shard(0),); E < W: mesh (E, s), (Shard(0), Shard(hidden dim))), and
on load DCP reads, for the new world size W', exactly the boxes the new layout needs,
whatever W was (4 -> 2, 2 -> 4, E >= W and E < W alike). This is the same mechanism as
``dcp.save(model.state_dict())``; no layout knowledge lives here.

Integrity: ``meta.json`` records the sha256 of every file DCP wrote (``checksums``: file
name -> hex digest; each rank hashes its share of the files, ``files[rank::world]``), and
loading verifies them the same way before reading a tensor: a shard whose bytes changed
(a flipped bit, same size) is refused naming the file, not loaded.

Atomicity: every rank writes (and fsyncs) into ``.step_N.partial``; rank 0 then writes
``meta.json``, fsyncs, renames the directory to ``step_N``, fsyncs the root, and replaces
``latest`` through a fsynced temporary file. A crash at any point leaves ``latest``
naming the previous complete checkpoint.

Loading never unpickles arbitrary objects: DCP's tensor files are read with
``weights_only=True``, and its pickled ``.metadata`` index is read by an unpickler that
accepts only DCP's own metadata classes, ``torch.Size``, dtypes and paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from adaptive_moe.core.checks import positive_int
from adaptive_moe.core.fileio import atomic_write, fsync_dir, read_json, write_synced
from adaptive_moe.runtime.experts.stacked import Experts
from adaptive_moe.training.model import MoETransformer

FORMAT_NAME = "adaptive_moe.train_checkpoint"
FORMAT_VERSION = 3  # 2: gate_up_proj as one [E, 2, h, d] global view; 3: checksums
CHECKSUMS = "checksums"
LATEST = "latest"
META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Where the training loop stands, besides the weights and optimizer.

    Attributes:
        step: optimizer steps taken (skipped non-finite steps included).
        data_position: windows of the corpus consumed by the whole job (``data``).
        skipped_steps: steps skipped because their loss was not finite.
    """

    step: int = 0
    data_position: int = 0
    skipped_steps: int = 0


# ---- finding checkpoints ------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The checkpoint ``root/latest`` names, or None when there is none."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _STEP_DIR.match(name):
        raise ValueError(f"{pointer} must name a step_NNNNNNNN directory, got {name!r}")
    path = Path(root) / name
    if not (path / META).is_file():
        raise ValueError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def read_meta(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint directory (format checked)."""
    path = Path(checkpoint) / META
    meta = read_json(path, "checkpoint description")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not an adaptive_moe training checkpoint")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {meta.get('version')!r}, "
            f"this adaptive_moe reads version {FORMAT_VERSION}"
        )
    sums = meta.get(CHECKSUMS)
    if not isinstance(sums, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in sums.items()
    ):
        raise ValueError(f"{path}: {CHECKSUMS!r} must map each file name to its sha256")
    return meta


# ---- safe reading of DCP's index ------------------------------------------------------------

_MD = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    *(
        (_MD, n)
        for n in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    *(
        ("pathlib", n)
        for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")
    ),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _ALLOWED and not is_dtype:
            raise ValueError(
                f"checkpoint index refers to {module}.{name}, which a checkpoint "
                f"index never needs; refusing to load it"
            )
        return super().find_class(module, name)


# What unpickling a truncated or garbled file raises (our own refusals are ValueError).
_UNPICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
    TypeError,
    UnicodeDecodeError,
    struct.error,
    OSError,
)


def check_checkpoint(checkpoint: str | os.PathLike[str]) -> None:
    """Raise ValueError naming the file unless ``checkpoint``'s DCP index reads and every
    shard file it refers to exists and is long enough (a cheap check before loading, so
    that a damaged checkpoint gives one line instead of every rank's traceback)."""
    root = Path(checkpoint)
    sums = read_meta(root)[CHECKSUMS]
    metadata = _SafeReader(root).read_metadata()
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        rel = str(getattr(info, "relative_path", ""))
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        needed[rel] = max(needed.get(rel, 0), end)
    uncovered = sorted({*needed, ".metadata"} - set(sums))
    if uncovered:
        raise ValueError(
            f"{root / META}: no checksum for {uncovered}; the checkpoint {root} is damaged"
        )
    for rel, end in sorted(needed.items()):
        path = root / rel
        if not path.is_file():
            raise ValueError(f"{path}: shard file missing; the checkpoint {root} is incomplete")
        if path.stat().st_size < end:
            raise ValueError(
                f"{path}: shard file truncated ({path.stat().st_size} bytes, the index "
                f"needs {end}); the checkpoint {root} is damaged"
            )


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def corrupt_files(checkpoint: Path, files: list[str], sums: dict[str, str]) -> list[str]:
    """A message for each of ``files`` (names in ``checkpoint``) whose sha256 is not
    the one ``sums`` records."""
    bad = []
    for name in files:
        got = file_sha256(checkpoint / name)
        if got != sums[name]:
            bad.append(
                f"{checkpoint / name}: corrupt (sha256 {got[:16]}..., {META} records "
                f"{sums[name][:16]}...)"
            )
    return bad


class _SafeReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is read by an allow-list unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise ValueError(f"{path}: missing; the checkpoint is incomplete") from None
        except _UNPICKLE_ERRORS as err:
            raise ValueError(
                f"{path}: the checkpoint index is truncated or corrupt "
                f"({type(err).__name__}: {err}); resume from an earlier checkpoint"
            ) from None
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path}: not a DCP checkpoint index")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class Checkpointer:
    """Saves and loads a ``MoETransformer`` with its optimizer and loop state.

    Building one is collective over the default process group (it builds the device
    mesh that describes the expert shards); so are ``save`` and ``load``. The model's
    MoE layers must shard over the whole default group.

    Args:
        root: directory of the checkpoints (created on the first save).
        model: the model; its parameters are saved and loaded in place.
        optimizer: an optimizer over ``model.parameters()`` (AdamW-like: per-parameter
            state tensors shaped like the parameter, plus scalars); None for a model
            that is only read (``load_weights``).
        keep: complete checkpoints kept on disk (the oldest are removed after a save).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        model: MoETransformer,
        optimizer: torch.optim.Optimizer | None,
        *,
        keep: int = 2,
    ):
        positive_int("keep", keep)
        if not dist.is_initialized():
            raise ValueError("Checkpointer needs an initialised default process group")
        self.root, self.model, self.optimizer, self.keep = Path(root), model, optimizer, keep
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        for layer in model.moe_layers():
            if layer.layout.world != self.world:
                raise ValueError(
                    f"MoE layers must shard over the whole default group "
                    f"({self.world} ranks), got a group of {layer.layout.world}"
                )
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._device = next(model.parameters()).device

    def _view(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (parameter ``name``, or a state tensor shaped like it) as saved: the
        global view of an expert parameter (a view: loading into it writes ``tensor``),
        any other as is."""
        stem, _, leaf = name.rpartition(".")
        owner = self.model.get_submodule(stem)
        return owner.global_view(leaf, tensor) if isinstance(owner, Experts) else tensor

    # ---- the state dict ---------------------------------------------------------------------

    def _tensors_to_save(self, state: TrainState) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, param in self.model.named_parameters():
            out[f"model/{name}"] = self._view(name, param.detach())
        for param, st in self.optimizer.state.items() if self.optimizer is not None else ():
            name = self._names[id(param)]
            for field, value in st.items():
                if not torch.is_tensor(value) or value.dim() not in (0, param.dim()):
                    raise ValueError(
                        f"optimizer state {name}.{field} must be a scalar tensor "
                        f"or a tensor shaped like its parameter"
                    )
                if value.dim() == 0:
                    out[f"optim/{name}/{field}"] = value
                    continue
                out[f"optim/{name}/{field}"] = self._view(name, value.contiguous())
        for field in dataclasses.fields(TrainState):
            out[f"train/{field.name}"] = torch.tensor(getattr(state, field.name))
        out[f"rng/rank{self.rank}/cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            out[f"rng/rank{self.rank}/cuda"] = torch.cuda.get_rng_state()
        return out

    # ---- save ---------------------------------------------------------------------------------

    def save(self, state: TrainState, meta: dict[str, Any]) -> Path:
        """Write checkpoint ``step_<state.step>`` atomically (collective); ``meta`` (JSON
        data: configs, corpus fingerprint) goes to its ``meta.json``. Returns its path."""
        name = step_dir_name(state.step)
        final, partial = self.root / name, self.root / f".{name}.partial"
        self._on_rank0(lambda: self._prepare(partial, final), final)
        written = dcp.save(
            self._tensors_to_save(state),
            storage_writer=dcp.FileSystemWriter(partial, sync_files=True),
        )
        files = sorted({str(i.relative_path) for i in written.storage_data.values()})
        sums = self._checksums(partial, [".metadata", *files])
        record = {**meta, CHECKSUMS: sums}
        self._on_rank0(lambda: self._publish(partial, final, state, record), final)
        return final

    def _checksums(self, folder: Path, files: list[str]) -> dict[str, str]:
        """sha256 of each of ``files``, every rank hashing its share (collective)."""
        mine = {name: file_sha256(folder / name) for name in files[self.rank :: self.world]}
        parts: list[dict[str, str] | None] = [None] * self.world
        dist.all_gather_object(parts, mine)
        return {name: digest for part in parts for name, digest in (part or {}).items()}

    def _verify(self, checkpoint: Path) -> None:
        """Raise ValueError on every rank, naming each file whose sha256 differs from
        the one ``meta.json`` records (every rank hashes its share; collective)."""
        sums = read_meta(checkpoint)[CHECKSUMS]
        files = sorted(sums)[self.rank :: self.world]
        mine = corrupt_files(checkpoint, files, sums)
        parts: list[list[str] | None] = [None] * self.world
        dist.all_gather_object(parts, mine)
        bad = [line for part in parts for line in part or []]
        if bad:
            raise ValueError(
                "; ".join(bad) + f"; the checkpoint {checkpoint} is damaged: resume from an "
                "earlier one"
            )

    def _on_rank0(self, fn: Any, final: Path) -> None:
        """Run ``fn`` on rank 0 alone; if it raises, every rank raises (rank 0 its own
        error), so that no rank waits for a save that will not happen."""
        error: Exception | None = None
        if self.rank == 0:
            try:
                fn()
            except Exception as err:
                error = err
        failed = torch.tensor([int(error is not None)], device=self._device)
        dist.broadcast(failed, src=0)
        if error is not None:
            raise error
        if failed.item():
            raise RuntimeError(f"saving checkpoint {final} failed on rank 0 (see its error)")

    def _prepare(self, partial: Path, final: Path) -> None:
        if final.exists():
            raise FileExistsError(f"checkpoint {final} already exists")
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".step_*.partial"):  # left by a crashed save
            shutil.rmtree(stale)
        partial.mkdir()

    def _publish(self, partial: Path, final: Path, state: TrainState, meta: dict[str, Any]) -> None:
        record = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            **dataclasses.asdict(state),
            "world_size": self.world,
            "model": self.model.cfg.to_dict(),
            **meta,
        }
        write_synced(partial / META, json.dumps(record, indent=1).encode())
        fsync_dir(partial)
        os.replace(partial, final)
        fsync_dir(self.root)
        atomic_write(self.root / LATEST, final.name)
        self._prune(final.name)

    def _prune(self, newest: str) -> None:
        steps = sorted(p.name for p in self.root.iterdir() if _STEP_DIR.match(p.name))
        for old in steps[: max(0, len(steps) - self.keep)]:
            if old != newest:
                shutil.rmtree(self.root / old)

    # ---- load ---------------------------------------------------------------------------------

    def load(self, checkpoint: str | os.PathLike[str]) -> TrainState:
        """Restore model, optimizer and this rank's RNG from ``checkpoint`` (a checkpoint
        directory), whatever world size wrote it (collective). Returns the loop state."""
        path = Path(checkpoint)
        check_checkpoint(path)
        self._verify(path)
        reader = _SafeReader(path)
        saved = reader.read_metadata().state_dict_metadata
        targets, apply = self._load_targets(saved)
        dcp.load(targets, storage_reader=reader)
        with torch.no_grad():
            for fn in apply:
                fn(targets)
        self._restore_rng(targets, saved)
        return TrainState(
            **{f.name: int(targets[f"train/{f.name}"]) for f in dataclasses.fields(TrainState)}
        )

    def load_weights(self, checkpoint: str | os.PathLike[str]) -> None:
        """Restore only the model's parameters from ``checkpoint`` (a distillation
        teacher): no optimizer, RNG or loop state; any world size wrote it (collective)."""
        path = Path(checkpoint)
        check_checkpoint(path)
        self._verify(path)
        reader = _SafeReader(path)
        saved = reader.read_metadata().state_dict_metadata
        targets: dict[str, Any] = {}
        apply = [
            self._target(targets, saved, param.detach(), name, "model/", "")
            for name, param in self.model.named_parameters()
        ]
        dcp.load(targets, storage_reader=reader)
        with torch.no_grad():
            for fn in apply:
                fn(targets)

    def _load_targets(self, saved: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        """Empty destinations for every key to load, and the functions that move them
        into the parameters / optimizer once loaded."""
        targets: dict[str, Any] = {}
        apply: list[Any] = []
        for name, param in self.model.named_parameters():
            apply.append(self._target(targets, saved, param.detach(), name, "model/", ""))
        for name, param in self.model.named_parameters():
            for field in self._saved_state_fields(saved, name, param):
                apply.append(self._optim_target(targets, saved, param, name, field))
        for field in dataclasses.fields(TrainState):
            key = f"train/{field.name}"
            _require(saved, key, ())
            targets[key] = torch.zeros((), dtype=torch.int64)
        for kind in ("cpu", "cuda"):
            key = f"rng/rank{self.rank}/{kind}"
            if key in saved:
                targets[key] = torch.empty(saved[key].size, dtype=saved[key].properties.dtype)
        return targets, apply

    def _saved_state_fields(
        self, saved: dict[str, Any], name: str, param: torch.nn.Parameter
    ) -> list[str]:
        """Optimizer state fields the checkpoint holds for parameter ``name``."""
        prefix = f"optim/{name}/"
        return sorted(k[len(prefix) :] for k in saved if k.startswith(prefix))

    def _target(
        self,
        targets: dict[str, Any],
        saved: dict[str, Any],
        dest: torch.Tensor,
        name: str,
        prefix: str,
        suffix: str,
    ) -> Any:
        """Register destinations for ``dest`` (a parameter or a state tensor shaped like
        one); return the function that copies the loaded values into ``dest``."""
        key = f"{prefix}{name}{suffix}"
        buf = torch.empty_like(dest, memory_format=torch.contiguous_format)
        target = self._view(name, buf)
        _require(saved, key, tuple(target.shape))
        targets[key] = target
        pairs = [(dest, buf)]

        def copy(_: dict[str, Any]) -> None:
            for view, buf in pairs:
                view.copy_(buf)

        return copy

    def _optim_target(
        self,
        targets: dict[str, Any],
        saved: dict[str, Any],
        param: torch.nn.Parameter,
        name: str,
        field: str,
    ) -> Any:
        key = f"optim/{name}/{field}"
        if key in saved and len(saved[key].size) == 0:
            # a scalar (AdamW's step): kept on the host, as the optimizer keeps it
            meta = saved[key]
            targets[key] = torch.zeros(meta.size, dtype=meta.properties.dtype)

            def put_scalar(loaded: dict[str, Any]) -> None:
                self.optimizer.state[param][field] = loaded[key].clone()

            return put_scalar
        value = torch.zeros_like(param, memory_format=torch.contiguous_format)
        copy = self._target(targets, saved, value, name, "optim/", f"/{field}")

        def put_tensor(loaded: dict[str, Any]) -> None:
            copy(loaded)
            self.optimizer.state[param][field] = value

        return put_tensor

    def _restore_rng(self, targets: dict[str, Any], saved: dict[str, Any]) -> None:
        key = f"rng/rank{self.rank}/cpu"
        if key in targets:
            torch.set_rng_state(targets[key])
        cuda = f"rng/rank{self.rank}/cuda"
        if cuda in targets and torch.cuda.is_available():
            torch.cuda.set_rng_state(targets[cuda])


def _require(saved: dict[str, Any], key: str, shape: tuple[int, ...]) -> None:
    if key not in saved:
        raise ValueError(
            f"the checkpoint has no {key!r}: it was written for another model "
            f"(compare its meta.json with this run's configuration)"
        )
    meta = saved[key]
    if not isinstance(meta, TensorStorageMetadata) or tuple(meta.size) != shape:
        got = tuple(meta.size) if isinstance(meta, TensorStorageMetadata) else type(meta).__name__
        raise ValueError(f"the checkpoint's {key!r} has shape {got}, this model needs {shape}")

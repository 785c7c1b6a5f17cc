"""Training checkpoints: sharded (``torch.distributed.checkpoint``), atomic, and loadable
on any number of ranks.

On disk, under a root directory (a run's ``checkpoints/``)::

    step_00000100/            one complete checkpoint: DCP's ``.metadata`` and
                              ``__<rank>_0.distcp`` files, plus ``meta.json``
    latest                    text: the name of the newest complete checkpoint
    .step_00000150.partial/   a save in progress (removed by the next save)

What is saved (tensors only; nothing that loading would have to unpickle):

    model/<param>                 replicated parameters, written once (DCP de-duplicates)
    model/<moe>.experts.gate_proj [E, h, d]  the *logical, full* expert tensors, each
    model/<moe>.experts.up_proj   [E, h, d]  rank contributing only its shard: a DTensor
    model/<moe>.experts.down_proj [E, d, h]  over a device mesh that mirrors ShardLayout
    optim/<param>/<state>         AdamW moments, laid out exactly like their parameter
                                  (expert ones split into pieces like it); scalars as is
    train/step, train/data_position, train/skipped_steps   int64 scalars
    rng/rank<r>/cpu, rng/rank<r>/cuda                      each rank's RNG state

Resharding is transparent: the shard of rank i is the box ``[experts of i] x [hidden
slice of i]`` of the logical tensor (E >= W: mesh (W,), placements (Shard(0),); E < W:
mesh (E, s), placements (Shard(0), Shard(hidden dim))), and on load DCP reads, for the
new world size W', exactly the boxes the new layout needs, whatever W was (4 -> 2,
2 -> 4, E >= W and E < W alike). The fused ``gate_up_proj`` is stored as separate gate
and up tensors because a hidden slice of it is not one box of the fused tensor.

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
import json
import os
import pickle
import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from adaptive_moe.core.checks import positive_int
from adaptive_moe.core.fileio import atomic_write, fsync_dir, write_synced
from adaptive_moe.runtime.experts import is_expert_param
from adaptive_moe.runtime.layer import MoELayer
from adaptive_moe.training.model import MoETransformer

FORMAT_NAME = "adaptive_moe.train_checkpoint"
FORMAT_VERSION = 1
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
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable checkpoint description ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not an adaptive_moe training checkpoint")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {meta.get('version')!r}, "
            f"this adaptive_moe reads version {FORMAT_VERSION}"
        )
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
    metadata = _SafeReader(root).read_metadata()
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        rel = str(getattr(info, "relative_path", ""))
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        needed[rel] = max(needed.get(rel, 0), end)
    for rel, end in sorted(needed.items()):
        path = root / rel
        if not path.is_file():
            raise ValueError(f"{path}: shard file missing; the checkpoint {root} is incomplete")
        if path.stat().st_size < end:
            raise ValueError(
                f"{path}: shard file truncated ({path.stat().st_size} bytes, the index "
                f"needs {end}); the checkpoint {root} is damaged"
            )


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


# ---- the logical (world-size independent) view of the expert shards --------------------------


@dataclasses.dataclass(frozen=True)
class _Piece:
    """One logical expert tensor and this rank's box of it.

    ``local`` is a view of the parameter (or optimizer state) holding the box."""

    key: str
    local: torch.Tensor
    global_shape: tuple[int, ...]
    hidden_dim: int


def _expert_pieces(name: str, tensor: torch.Tensor, e: int, h: int, d: int) -> list[_Piece]:
    """Logical pieces of one expert parameter (or a state tensor shaped like it)."""
    stem, leaf = name.rsplit(".", 1)
    if leaf == "gate_up_proj":  # [E_l, 2*h_l, d]: gate rows, then up rows
        h_l = tensor.shape[1] // 2
        return [
            _Piece(f"{stem}.gate_proj", tensor[:, :h_l], (e, h, d), 1),
            _Piece(f"{stem}.up_proj", tensor[:, h_l:], (e, h, d), 1),
        ]
    if leaf == "up_proj":  # [E_l, h_l, d]
        return [_Piece(name, tensor, (e, h, d), 1)]
    if leaf == "down_proj":  # [E_l, d, h_l]
        return [_Piece(name, tensor, (e, d, h), 2)]
    raise ValueError(
        f"checkpointing expert parameter {name!r} is not supported "
        f"(only gate_up_proj, up_proj and down_proj, without biases)"
    )


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


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
        cfg = model.cfg
        self._hidden, self._d = cfg.moe_d_ff, cfg.d_model
        # E of the MoE layer owning each expert parameter (PR-MoE: it varies by block).
        self._experts_of = {
            name: layer.router_cfg.num_experts
            for layer_name, layer in model.named_modules()
            if isinstance(layer, MoELayer)
            for name in (f"{layer_name}.experts.{n}" for n, _ in layer.experts.named_parameters())
        }
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._device = next(model.parameters()).device
        # One mesh per expert count, mirroring ShardLayout: rank i = e * s + j holds
        # expert e, hidden slice j (built in the same order on every rank).
        ranks = torch.arange(self.world)
        self._meshes: dict[int, DeviceMesh] = {}
        for e in sorted(set(self._experts_of.values())):
            mesh = ranks.view(e, self.world // e) if e < self.world else ranks
            self._meshes[e] = DeviceMesh(self._device.type, mesh)

    def _dtensor(self, piece: _Piece, local: torch.Tensor) -> DTensor:
        e = piece.global_shape[0]
        hidden_split = e < self.world
        return DTensor.from_local(
            local,
            self._meshes[e],
            [Shard(0), Shard(piece.hidden_dim)] if hidden_split else [Shard(0)],
            run_check=False,
            shape=torch.Size(piece.global_shape),
            stride=_contiguous_stride(piece.global_shape),
        )

    # ---- the state dict ---------------------------------------------------------------------

    def _entries(self, tensor: torch.Tensor, name: str, prefix: str) -> Iterator[tuple[str, Any]]:
        """(key, piece or None) for a parameter-shaped tensor: expert pieces or itself."""
        if is_expert_param(self.model.get_parameter(name)):
            shape = (self._experts_of[name], self._hidden, self._d)
            for piece in _expert_pieces(name, tensor, *shape):
                yield f"{prefix}{piece.key}", piece
        else:
            yield f"{prefix}{name}", None

    def _tensors_to_save(self, state: TrainState) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, param in self.model.named_parameters():
            for key, piece in self._entries(param.detach(), name, "model/"):
                out[key] = (
                    param.detach()
                    if piece is None
                    else self._dtensor(piece, piece.local.contiguous())
                )
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
                for key, piece in self._entries(value, name, "optim/"):
                    out[f"{key}/{field}"] = (
                        value if piece is None else self._dtensor(piece, piece.local.contiguous())
                    )
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
        dcp.save(
            self._tensors_to_save(state),
            storage_writer=dcp.FileSystemWriter(partial, sync_files=True),
        )
        self._on_rank0(lambda: self._publish(partial, final, state, meta), final)
        return final

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
        prefixes = {f"optim/{name}/"} | {
            f"optim/{key}/" for key, _ in self._entries(param.detach(), name, "")
        }
        return sorted({k[len(p) :] for k in saved for p in prefixes if k.startswith(p)})

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
        pairs = []
        for key, piece in self._entries(dest, name, prefix):
            key += suffix
            if piece is None:
                _require(saved, key, tuple(dest.shape))
                buf = torch.empty_like(dest)
                targets[key] = buf
                pairs.append((dest, buf))
            else:
                _require(saved, key, piece.global_shape)
                buf = torch.empty_like(piece.local, memory_format=torch.contiguous_format)
                targets[key] = self._dtensor(piece, buf)
                pairs.append((piece.local, buf))

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

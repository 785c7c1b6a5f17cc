"""The ranks of an expert group must build the same ``MoELayer``: checked once, when it
is built.

Every rank of the group runs its own copy of the layer, and the copies only meet in the
collectives: ranks whose layers differ in ``top_k``, the activation, the router or the
capacity factor compute another rank's tokens with their own rules and never notice;
ranks that differ in a shape (E, d_ff, dtype, ...) or in the path they take
(``gate_position``, ``ranks_per_node``) stop in a collective with a message about sizes,
or wait there until its timeout.

So the layer describes its whole configuration as ``field -> text`` (every field of its
config dataclasses, found with ``dataclasses.fields``, so a new field is covered without
touching this module, plus the construction arguments that change the math or the
collectives), and the group all-gathers one digest of it (the world does, when the group
is a proper subgroup: the layer's mesh is then built by world-wide collectives, which
every rank must leave together). Only when the digests differ
do the ranks all-gather the descriptions themselves, so that every rank raises the same
ValueError naming each differing field, its values and the ranks that hold them. This
runs before the layer builds any subgroup (those calls would already disagree), once per
layer: no collective is added to the forward.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from adaptive_moe.comm.mesh import resolve_ranks_per_node
from adaptive_moe.runtime.inference.config import InferenceConfig
from adaptive_moe.tuning.table import StrategyTable
from adaptive_moe.tuning.workload import Buckets

# ``repr`` of arbitrary objects may carry their address, which differs between processes.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def layer_description(
    world: int,
    configs: Mapping[str, object],
    *,
    dtype: object,
    device: object,
    ranks_per_node: int | None,
    table: object,
    buckets: Buckets | None,
    inference: InferenceConfig | None,
    **options: object,
) -> dict[str, str]:
    """``field -> text`` of everything that must agree across the expert group.

    ``configs``: the layer's config dataclasses by name (``experts``, ``router``,
    ``shared``); each of their fields becomes ``name.field``. The other arguments are
    the layer's construction arguments, with their defaults resolved here so that a
    rank passing ``None`` and one passing the default agree."""
    out: dict[str, str] = {}
    for name, cfg in configs.items():
        _describe_into(out, name, cfg)
    out["dtype"] = str(dtype or torch.get_default_dtype())
    out["device type"] = _device_type(device)
    out["ranks_per_node"] = _ranks_per_node(ranks_per_node, world)
    out["table"] = _table_digest(table)
    _describe_into(out, "buckets", buckets or Buckets())
    _describe_into(out, "inference", inference or InferenceConfig())
    for name, value in options.items():
        _describe_into(out, name, value)
    return out


@torch.compiler.disable  # host-side, once per layer: never traced
def check_layer_agreement(
    group: dist.ProcessGroup | None,
    experts: object,
    router: object,
    shared: object,
    **arguments: object,
) -> None:
    """Raise the same ValueError on every rank of ``group`` unless every rank builds the
    same layer (``layer_description`` of the configs ``experts`` / ``router`` / ``shared``
    and the other construction ``arguments``).
    Collective over ``group``: one all-gather of a digest (and of its length), plus the
    same for the descriptions when the digests differ.

    Run first when the layer is built, before it validates its own arguments: a rank
    that raised alone would leave the others waiting here. So the description takes
    any value (an invalid one is described, then refused on every rank by the layer's
    own checks), and a rank whose arguments are bad while the others' are not fails
    here, with the others, naming the field."""
    if group is None or dist.get_world_size(group) == 1:
        return
    configs = {"experts": experts, "router": router, "shared": shared}
    description = layer_description(dist.get_world_size(group), configs, **arguments)
    text = json.dumps(dict(description), sort_keys=True).encode()
    device = _collective_device(group, arguments.get("device"))
    anywhere, here = _disagreement(group, hashlib.sha256(text).digest(), device)
    if not anywhere:
        return
    if not here:
        raise ValueError(
            "another expert group's ranks build different MoE layers (they name the "
            "fields); this rank stops too, as building the layer is collective over the "
            "world"
        )
    everyone = [json.loads(t) for t in _all_gather_bytes(text, group, device)]
    raise ValueError(disagreement_message(everyone))


def _disagreement(
    group: dist.ProcessGroup, digest: bytes, device: torch.device
) -> tuple[bool, bool]:
    """(whether the ranks of some expert group disagree, whether this rank's do).
    Gathered over the world when ``group`` is a proper subgroup: building the layer goes
    on with world-wide collectives (``build_mesh``), so every rank of the world must
    stop when any group does."""
    everywhere = dist.get_world_size(group) < dist.get_world_size()
    scope = dist.group.WORLD if everywhere else group
    members = json.dumps(dist.get_process_group_ranks(group)).encode()
    gathered = _all_gather_bytes(digest + members, scope, device)
    by_group: dict[bytes, set[bytes]] = {}
    for item in gathered:
        by_group.setdefault(item[len(digest) :], set()).add(item[: len(digest)])
    return any(len(d) > 1 for d in by_group.values()), len(by_group[members]) > 1


def _collective_device(group: dist.ProcessGroup, device: object) -> torch.device:
    """Where this check's tensors go: the CPU unless the group is NCCL only; then the
    layer's CUDA device when it names one, else the current one (set it per rank with
    ``torch.cuda.set_device``, as for any NCCL collective)."""
    if str(dist.get_backend(group)) != "nccl":
        return torch.device("cpu")
    try:
        named = torch.device(device) if isinstance(device, torch.device | str) else None
    except RuntimeError:  # an invalid device string: the layer refuses it after this check
        named = None
    if named is not None and named.type == "cuda" and named.index is not None:
        return named
    return torch.device("cuda", torch.cuda.current_device())


def _all_gather_bytes(data: bytes, group: dist.ProcessGroup, device: torch.device) -> list[bytes]:
    """Every rank's ``data`` (any length), in group rank order (collective)."""
    world = dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.long, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(n) for n in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)  # [L], padded to the longest
    mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mine = mine.to(device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return [bytes(p[: int(n)].tolist()) for p, n in zip(parts, sizes, strict=True)]


def disagreement_message(descriptions: list[dict[str, str]]) -> str:
    """The error for ranks whose descriptions differ: each differing field, with each of
    its values and the (expert-group) ranks that hold it."""
    fields = sorted({k for d in descriptions for k in d})
    lines = []
    for field in fields:
        holders: dict[str, list[int]] = {}
        for rank, d in enumerate(descriptions):
            holders.setdefault(d.get(field, "<absent>"), []).append(rank)
        if len(holders) > 1:
            values = "; ".join(f"{v} on rank(s) {ranks}" for v, ranks in holders.items())
            lines.append(f"  {field}: {values}")
    return (
        "the ranks of the expert group build different MoE layers (they compute each other's "
        "tokens, so every rank must build the same layer); differing fields:\n" + "\n".join(lines)
    )


def _describe_into(out: dict[str, str], name: str, value: object) -> None:
    """``out[name.field] = text`` for every field of a dataclass (recursively), else
    ``out[name] = text``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _describe_into(out, f"{name}.{f.name}", getattr(value, f.name))
        return
    out[name] = describe(value)


def describe(value: object) -> str:
    """A text for ``value`` that is the same on two processes exactly when the values are
    the same: plain data by ``repr``, functions by module, name and (for Python
    functions) a digest of their code, so that two different lambdas differ."""
    if value is None or isinstance(value, bool | int | float | str | torch.dtype):
        return repr(value)
    if isinstance(value, tuple | list):
        return "(" + ", ".join(describe(v) for v in value) + ")"
    if isinstance(value, functools.partial):
        kw = ", ".join(f"{k}={describe(v)}" for k, v in sorted(value.keywords.items()))
        return f"partial({describe(value.func)}, {describe(value.args)}, {kw})"
    if isinstance(value, types.FunctionType):
        code = value.__code__
        # What it captures and defaults to is part of what it computes (lambda t: t * s).
        cells = tuple(describe(c.cell_contents) for c in value.__closure__ or ())
        body = repr((code.co_code, code.co_consts, code.co_names, cells, value.__defaults__))
        body = body.encode()
        where = f"{value.__module__}.{value.__qualname__}"
        return f"{where} (code {hashlib.sha256(body).hexdigest()[:12]})"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', None)}.{value.__qualname__}"
    return _ADDRESS.sub("", f"{type(value).__qualname__}: {value!r}")


def _device_type(device: object) -> str:
    # Described before the layer checks its arguments (see ``check_layer_agreement``).
    try:
        return torch.device(device).type if device is not None else torch.get_default_device().type
    except (RuntimeError, TypeError):
        return f"{device!r} (not a device)"


def _ranks_per_node(ranks_per_node: int | None, world: int) -> str:
    # An invalid value is described, not raised: one rank raising here alone would
    # leave the others waiting in the all-gather.
    try:
        return repr(resolve_ranks_per_node(ranks_per_node, world))
    except ValueError:
        return f"{ranks_per_node!r} (invalid for {world} ranks)"


def _table_digest(table: object) -> str:
    """A digest of the table's contents (a table object and the same table as a file
    agree); an unreadable file is described, the layer then refuses it on every rank."""
    if table is None:
        return "None"
    if isinstance(table, str | os.PathLike):
        try:
            table = StrategyTable.load(Path(table))
        except (OSError, ValueError) as err:
            return f"unreadable: {err}"
    if not isinstance(table, StrategyTable):
        return describe(table)
    text = json.dumps(table.to_dict(), sort_keys=True, default=str)
    return f"StrategyTable {hashlib.sha256(text.encode()).hexdigest()[:16]}"

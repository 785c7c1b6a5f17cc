"""Where each rank's expert shard sits in the full tensors, in the form that
``torch.distributed`` (DCP, ``state_dict``) reads: the *global view*.

The parameters themselves stay plain local tensors (``experts``): the executor computes on
them with no wrapper on the hot path, and switching strategy moves no byte. Only
``state_dict`` (and ``load_state_dict``) see the global view, built from views of the
parameters, so ``dcp.load(model.state_dict(), ...)`` writes straight into them:

    tensor              parameter (local)       global view           placements
    gate_up_proj        [E_l, 2*h_l, d]         [E, 2, h, d]          (Shard(0)[, Shard(2)])
    up_proj             [E_l, h_l, d]           [E, h, d]             (Shard(0)[, Shard(1)])
    down_proj           [E_l, d, h_l]           [E, d, h]             (Shard(0)[, Shard(2)])
    gate_up_proj_bias   [E_l, 2*h_l]            [E, 2, h]             (Shard(0)[, Shard(2)])
    up_proj_bias        [E_l, h_l]              [E, h]                (Shard(0)[, Shard(1)])
    down_proj_bias      [E_l, d/s]              [E, d]                (Shard(0)[, Shard(1)])

The device mesh is ``("ep",)`` of size W when E >= W, and ``("ep", "sl")`` of shape
(E, s) when E < W (rank i = e*s + j holds expert e, hidden slice j: ``ShardLayout``'s
assignment). On a single process the global view is the parameter itself, reshaped.

Why the gate/up axis is explicit (``[E, 2, h, d]``, not transformers' ``[E, 2h, d]``):
when E < W a rank holds rows ``[j*h/s, (j+1)*h/s)`` of the gate half *and* the same rows
of the up half, which is two boxes of ``[E, 2h, d]``; no public DTensor placement
describes that (the private ``_StridedShard`` does, but DCP rejects it on save and loads
*wrong values* into it without an error). With the gate/up axis explicit it is one box,
``(Shard(0), Shard(2))``, and every world size uses the same 4-D key, so checkpoints
reshard between E >= W and E < W. ``[E, 2, h, d]`` is a view of ``[E, 2h, d]``: the
transformers layout is one ``reshape`` away, and ``load_state_dict`` accepts both.

Under transformers' names (``integrations.transformers``, ``gate_up_proj`` [E, 2h, d]),
the E < W slice of ``gate_up_proj`` is two boxes; there it is presented as a
``ShardedTensor`` with two local shards (``sliced_transformers_view``), the one
torch.distributed type DCP saves and loads with several boxes per rank, so those
checkpoints keep transformers' shapes on every world size.

Why the parameters are not DTensors themselves (torchtitan's choice): in a model whose
dense part is plain (DDP, or no data parallelism), a DTensor parameter breaks
``torch.optim.AdamW(foreach=True)`` and ``clip_grad_norm_`` ("got mixed torch.Tensor and
DTensor"), the defaults of every training loop including transformers' Trainer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Shard

from adaptive_moe.core.config import ExpertConfig
from adaptive_moe.core.layout import ShardLayout

# Dimension of the global view split by the hidden slice (the "sl" mesh axis).
_HIDDEN_DIM = {
    "gate_up_proj": 2,
    "up_proj": 1,
    "down_proj": 2,
    "gate_up_proj_bias": 2,
    "up_proj_bias": 1,
    "down_proj_bias": 1,
}


def expert_device_mesh(layout: ShardLayout, group: dist.ProcessGroup | None) -> DeviceMesh | None:
    """The device mesh of the global view (collective over the world group when E < W);
    None on a single process. Built once, when the layer is built."""
    if group is None or layout.world == 1:
        return None
    device_type = _device_type(group)
    if layout.shards == 1:
        # Reuses the expert group itself: no new communicator.
        return DeviceMesh.from_group(group, device_type, mesh_dim_names=("ep",))
    ranks = torch.tensor(dist.get_process_group_ranks(group)).view(
        layout.num_experts, layout.shards
    )
    if dist.get_world_size() == layout.world:
        return DeviceMesh(device_type, ranks, mesh_dim_names=("ep", "sl"))
    # An expert group smaller than the world: DeviceMesh would create its row and column
    # groups with new_group calls that ranks outside this group do not make. The global
    # view only needs the mesh's coordinates (DCP does not communicate over it), so it is
    # built without communicators where this torch allows.
    try:
        return DeviceMesh(device_type, ranks, mesh_dim_names=("ep", "sl"), _init_backend=False)
    except TypeError as err:  # a torch without the keyword
        raise ValueError(
            "an expert group smaller than the world with E < W needs a torch whose "
            "DeviceMesh accepts _init_backend=False"
        ) from err


def _device_type(group: dist.ProcessGroup) -> str:
    backend = str(dist.get_backend(group))
    return "cuda" if "nccl" in backend or "cuda" in backend else "cpu"


def global_shape(name: str, cfg: ExpertConfig) -> tuple[int, ...]:
    """Shape of the global view of expert tensor ``name``."""
    e, h, d = cfg.num_experts, cfg.d_ff, cfg.d_model
    shapes = {
        "gate_up_proj": (e, 2, h, d),
        "up_proj": (e, h, d),
        "down_proj": (e, d, h),
        "gate_up_proj_bias": (e, 2, h),
        "up_proj_bias": (e, h),
        "down_proj_bias": (e, d),
    }
    if name not in shapes:
        raise ValueError(f"name must be one of {sorted(shapes)}, got {name!r}")
    return shapes[name]


def local_view(name: str, local: torch.Tensor) -> torch.Tensor:
    """This rank's box of the global view: a view of ``local`` (the parameter, or a
    tensor shaped like it, such as an optimizer moment)."""
    if name == "gate_up_proj":  # [E_l, 2*h_l, d] -> [E_l, 2, h_l, d]
        return local.view(local.shape[0], 2, local.shape[1] // 2, local.shape[2])
    if name == "gate_up_proj_bias":  # [E_l, 2*h_l] -> [E_l, 2, h_l]
        return local.view(local.shape[0], 2, local.shape[1] // 2)
    return local


def placements(name: str, layout: ShardLayout) -> list[Placement]:
    if layout.shards == 1:
        return [Shard(0)]
    return [Shard(0), Shard(_HIDDEN_DIM[name])]


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def global_view(
    name: str,
    local: torch.Tensor,
    cfg: ExpertConfig,
    layout: ShardLayout,
    mesh: DeviceMesh | None,
) -> torch.Tensor:
    """The global view of ``local`` (shaped like expert parameter ``name``): a DTensor
    over ``mesh`` whose local tensor is a view of ``local`` (so loading into it writes
    into ``local``), or, on a single process, ``local`` reshaped to the full shape."""
    box = local_view(name, local)
    if mesh is None:
        return box
    shape = global_shape(name, cfg)
    return DTensor.from_local(
        box,
        mesh,
        placements(name, layout),
        run_check=False,
        shape=torch.Size(shape),
        stride=_contiguous_stride(shape),
    )


def same_placement(value: DTensor, mesh: DeviceMesh | None, name: str, layout: ShardLayout) -> bool:
    """True when ``value`` is laid out exactly as this rank's global view."""
    if mesh is None:
        return False
    return value.device_mesh.mesh.tolist() == mesh.mesh.tolist() and list(
        value.placements
    ) == placements(name, layout)


# Expert tensors whose hidden slice is two boxes of the transformers layout when E < W.
GATE_UP = ("gate_up_proj", "gate_up_proj_bias")


def _gate_up_boxes(
    shape: tuple[int, ...], rank: int, shards: int
) -> list[tuple[list[int], list[int]]]:
    """(offsets, sizes) of the gate rows and the up rows that group rank ``rank`` holds
    in the transformers layout ``shape`` ([E, 2h, d] or [E, 2h]) when E < W."""
    e, j = rank // shards, rank % shards
    h_local = shape[1] // 2 // shards
    rest = list(shape[2:])
    return [
        ([e, half * shape[1] // 2 + j * h_local, *([0] * len(rest))], [1, h_local, *rest])
        for half in (0, 1)
    ]


def sliced_transformers_view(
    name: str,
    local: torch.Tensor,
    full_shape: tuple[int, ...],
    layout: ShardLayout,
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """``gate_up_proj`` (or its bias) of an E < W layout in the *transformers* layout
    ([E, 2h, d]), for ``state_dict``s under transformers' names: a ``ShardedTensor``
    with two local shards per rank (its gate rows and its up rows; views of ``local``,
    [1, 2*h_l, d]), the one torch.distributed type DCP saves and loads with several boxes
    per rank. The key then has the same shape on every world size (one process, E >= W
    as ``Shard(0)`` DTensors, E < W), so DCP checkpoints reshard between all of them.
    Built from the layout alone: no collective."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard as LocalShard
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import (
        ShardedTensorMetadata,
        TensorProperties,
    )

    if name not in GATE_UP or layout.shards == 1:
        raise ValueError(f"name must be one of {GATE_UP} with E < W, got {name!r}")
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(layout.world))
    device = str(local.device)
    metadata = [
        ShardMetadata(offsets, sizes, placement=f"rank:{global_rank}/{device}")
        for group_rank, global_rank in enumerate(ranks)
        for offsets, sizes in _gate_up_boxes(full_shape, group_rank, layout.shards)
    ]
    gate, up = local.chunk(2, dim=1)  # [1, h_l, ...] each, contiguous (E_l = 1)
    mine = metadata[2 * layout.rank : 2 * layout.rank + 2]
    shards = [LocalShard(t, md) for t, md in zip((gate, up), mine, strict=True)]
    properties = TensorProperties(dtype=local.dtype, requires_grad=local.requires_grad)
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        shards,
        ShardedTensorMetadata(metadata, torch.Size(full_shape), properties),
        process_group=group,
    )


def local_of_sliced_view(
    name: str, value: torch.Tensor, full_shape: tuple[int, ...], layout: ShardLayout
) -> torch.Tensor | None:
    """This rank's parameter-shaped shard ([1, 2*h_l, ...]) of a ``ShardedTensor`` that
    ``sliced_transformers_view`` laid out for this very rank; None when ``value`` is not
    one."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if not isinstance(value, ShardedTensor) or name not in GATE_UP or layout.shards == 1:
        return None
    shards = sorted(value.local_shards(), key=lambda s: s.metadata.shard_offsets)
    boxes = _gate_up_boxes(full_shape, layout.rank, layout.shards)
    if (
        tuple(value.size()) != tuple(full_shape)
        or [(s.metadata.shard_offsets, s.metadata.shard_sizes) for s in shards] != boxes
    ):
        return None
    return torch.cat([s.tensor for s in shards], dim=1)

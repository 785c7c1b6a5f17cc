"""Data parallelism over models holding ``MoELayer``s: DDP or FSDP2 on the dense part,
the expert shards left to the layers.

    model = MyModel(...)                             # MoELayers inside, on every rank
    model = adaptive_moe.parallelize(model, mode="ddp")      # or mode="fsdp2"
    opt = torch.optim.AdamW(adaptive_moe.param_groups(model), lr=...)

What the expert shards need from a data-parallel wrapper, and why:

- **No broadcast, no all-reduce.** Each rank holds a different shard of the same shape;
  DDP would overwrite them with rank 0's at construction and average their gradients.
  ``exclude_experts_from_ddp`` puts their names in DDP's ignore list
  (``_ddp_params_and_buffers_to_ignore`` on the module DDP wraps -- the documented
  workaround of pytorch#43690); FSDP2 gets them as ``ignored_params``.
- **The same gradient scale as the dense part.** DDP and FSDP2 divide the dense
  gradients by the data-parallel size n; expert gradients arrive summed over the n
  ranks, so each layer divides them by n too (``MoELayer.set_grad_divisor``).
- **Separate optimizer groups under FSDP2.** FSDP2 turns the dense parameters into
  DTensors while the experts stay plain tensors; ``torch.optim`` foreach kernels cannot
  mix the two in one group (``param_groups`` splits them).

Launch: every rank runs the same script (``torchrun --nproc-per-node N``, or
``torch.multiprocessing.spawn``) with the default process group initialised before the
model is built; the MoE layers' expert group must be the data-parallel group.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from adaptive_moe.runtime.experts.stacked import is_expert_param
from adaptive_moe.runtime.layer import MoELayer

__all__ = ["clip_grad_norm_", "exclude_experts_from_ddp", "parallelize", "param_groups"]

Mode = Literal["ddp", "fsdp2"]


def exclude_experts_from_ddp(model: nn.Module) -> list[str]:
    """Put every expert parameter of ``model`` in the ignore list that
    ``DistributedDataParallel(model)`` reads; returns their names. Call it on the very
    module you hand to DDP (transformers' Trainer hands it the model itself), before DDP
    is built. Idempotent; names already in the list are kept."""
    names = [n for n, p in model.named_parameters() if is_expert_param(p)]
    if not names:
        raise ValueError(f"{type(model).__name__} holds no MoE expert parameter")
    at_root = [n for n in names if "." not in n]
    if at_root:
        # DDP's reducer matches ignored names as "<module>.<param>", which never matches
        # a parameter of the root module itself: it would still average them.
        raise ValueError(
            f"expert parameters directly on the module given to DDP ({at_root}) cannot "
            f"be ignored by DDP; keep them in a submodule (an MoELayer)"
        )
    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    merged = existing + [n for n in names if n not in existing]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, merged)
    return names


def param_groups(model: nn.Module, **expert_options: Any) -> list[dict[str, Any]]:
    """Two optimizer parameter groups: the dense parameters, then the expert shards
    (with ``expert_options``, e.g. another weight decay). Needed under FSDP2 (DTensor
    and plain parameters cannot share a foreach group); harmless elsewhere."""
    dense = [p for p in model.parameters() if not is_expert_param(p)]
    experts = [p for p in model.parameters() if is_expert_param(p)]
    return [{"params": dense}, {"params": experts, **expert_options}]


def clip_grad_norm_(
    model: nn.Module, max_norm: float, process_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a data-parallel model with expert shards:
    the 2-norm of the *global* gradient, the same on every rank. Call it after the
    backward (DDP: the dense gradients are already averaged; FSDP2: sharded DTensors).
    ``max_norm=math.inf`` only measures (no gradient is touched).

    ``torch.nn.utils.clip_grad_norm_`` on each rank would see only that rank's expert
    shards, compute a different norm on every rank and let the replicas drift apart.
    Here the squared norms of the expert shards (disjoint over ``process_group``, the
    expert group; default the world) and of FSDP2's dense shards (disjoint over the same
    group) are summed over the group in one scalar all-reduce and added to the
    replicated dense part. Returns the total norm (before clipping)."""
    if not (isinstance(max_norm, (int, float)) and max_norm > 0):
        raise ValueError(f"max_norm must be a number > 0, got {max_norm!r}")
    group = process_group if process_group is not None else dist.group.WORLD
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    replicated_sq = torch.zeros((), device=device)
    sharded_sq = torch.zeros((), device=device)  # disjoint shards: summed over the group
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad.detach()
        if _sharded_over(g, group):
            sharded_sq += g.to_local().float().square().sum()
        elif hasattr(g, "full_tensor"):  # a DTensor of another layout: let it reduce
            replicated_sq += g.float().square().sum().full_tensor()
        elif is_expert_param(p):
            sharded_sq += g.float().square().sum()
        else:
            replicated_sq += g.float().square().sum()
    if dist.is_initialized():
        dist.all_reduce(sharded_sq, group=group)
    total = (replicated_sq + sharded_sq).sqrt()
    factor = float((max_norm / (total + 1e-6)).clamp(max=1.0))  # one host sync per step
    if factor < 1.0:  # also False for a NaN norm: the step is skipped or diverges anyway
        for g in grads:
            g.mul_(factor)
    return total


def _sharded_over(grad: torch.Tensor, group: dist.ProcessGroup) -> bool:
    """Whether ``grad`` is a DTensor sharded on a 1-D mesh of ``group`` (FSDP2's dense
    shards): its ranks' local tensors are disjoint pieces, their squares add up."""
    mesh = getattr(grad, "device_mesh", None)
    if mesh is None or mesh.ndim != 1 or not dist.is_initialized():
        return False
    same = dist.get_process_group_ranks(mesh.get_group()) == dist.get_process_group_ranks(group)
    return same and all(p.is_shard() for p in grad.placements)


def _moe_layers(model: nn.Module) -> list[MoELayer]:
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no MoELayer")
    return layers


def _default_blocks(model: nn.Module) -> list[nn.Module]:
    """The elements of every ``nn.ModuleList`` (transformer blocks), outermost lists."""
    blocks: list[nn.Module] = []
    seen: set[int] = set()
    for module in model.modules():
        if id(module) in seen:
            continue
        if isinstance(module, nn.ModuleList):
            blocks.extend(module)
            seen.update(id(m) for m in module.modules())
    return blocks


def parallelize(
    model: nn.Module,
    mode: Mode = "ddp",
    *,
    process_group: dist.ProcessGroup | None = None,
    blocks: Iterable[nn.Module] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Data parallelism over ``model`` with its MoE experts handled (module docstring).

    Args:
        model: a module holding ``MoELayer``s (directly, or through ``adaptive_moe.wrap``),
            built on every rank, weights equal on every rank outside the experts.
        mode: ``"ddp"``: returns ``DistributedDataParallel(model, **kwargs)`` with the
            experts ignored. ``"fsdp2"``: applies ``fully_shard`` (``kwargs`` passed on)
            to each of ``blocks`` and then to ``model``, experts in ``ignored_params``;
            returns ``model`` (now an FSDP module).
        process_group: the data-parallel group (default: the world); it must be every
            MoE layer's expert group.
        blocks: FSDP2 units (default: the elements of the model's ``nn.ModuleList``s).

    Raises:
        ValueError: an unknown ``mode``, no MoE layer, or an MoE layer whose expert group
            is not the data-parallel group.
    """
    if mode not in ("ddp", "fsdp2"):
        raise ValueError(f"mode must be 'ddp' or 'fsdp2', got {mode!r}")
    if not dist.is_initialized():
        raise ValueError("parallelize needs an initialised default process group")
    group = process_group if process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    layers = _moe_layers(model)
    for layer in layers:
        if layer.layout.world != world:
            raise ValueError(
                f"an MoE layer shards its experts over {layer.layout.world} ranks, the "
                f"data-parallel group has {world}: they must be the same group"
            )
    if mode == "ddp":
        exclude_experts_from_ddp(model)
        for layer in layers:
            layer.set_grad_divisor(world)
        return DistributedDataParallel(model, process_group=group, **kwargs)
    return _fsdp2(model, group, world, layers, blocks, kwargs)


def _fsdp2(
    model: nn.Module,
    group: dist.ProcessGroup,
    world: int,
    layers: list[MoELayer],
    blocks: Iterable[nn.Module] | None,
    kwargs: dict[str, Any],
) -> nn.Module:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    if "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise ValueError(
            f"mode='fsdp2' needs fully_shard(ignored_params=...), which torch "
            f"{torch.__version__} lacks"
        )
    if "mesh" not in kwargs:
        device = next(model.parameters()).device.type
        kwargs["mesh"] = DeviceMesh.from_group(group, device, mesh_dim_names=("dp",))
    experts = {p for p in model.parameters() if is_expert_param(p)}
    units = list(blocks) if blocks is not None else _default_blocks(model)
    for unit in units:
        fully_shard(unit, ignored_params=experts & set(unit.parameters()), **kwargs)
    fully_shard(model, ignored_params=experts, **kwargs)
    for layer in layers:
        layer.set_grad_divisor(world)
    return model

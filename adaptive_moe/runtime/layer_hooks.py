"""``MoELayer``'s hooks: the data-parallel bookkeeping (the expert-gradient divisor hook
and the forward pre-hook that checks a layer under ``DistributedDataParallel``), the
profiler's routing hook (``profiling_routing``), and the check that the expert weights
fit the device before they are allocated."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from adaptive_moe.core.config import ExpertConfig
from adaptive_moe.core.sizes import check_fits
from adaptive_moe.runtime.policy.stats import StrategyStats
from adaptive_moe.runtime.routing.router import Routing

# What a forward leaves on the layer for its user (``profiling_routing`` puts them back).
LAST_FORWARD = ("aux_loss", "z_loss", "last_strategy", "last_max_tokens", "last_router_logits")


def divide_grad(grad: torch.Tensor, layer_ref: weakref.ref) -> torch.Tensor:
    layer = layer_ref()
    return grad if layer is None or layer.grad_divisor == 1 else grad / layer.grad_divisor


# Host-side bookkeeping: traced, it guarded on each layer's parameter ids and recompiled
# once per MoE layer of a compiled model (past dynamo's recompile limit in deep models).
@torch.compiler.disable
def _check_data_parallel(layer: nn.Module, _args: object) -> None:
    """Forward pre-hook: under ``DistributedDataParallel``, refuse expert shards that DDP
    treats as replicas, and scale expert gradients like DDP scales the dense ones.

    DDP broadcasts rank 0's parameters when it is built and all-reduces every gradient;
    for expert shards (a different tensor on every rank, same shape) both are silent
    corruption. ``wrap`` and ``exclude_experts_from_ddp`` put the experts in DDP's ignore
    list; when a DDP forward finds them missing from it the run stops here, before any
    optimizer step uses the broadcast weights."""
    from torch.nn.parallel import DistributedDataParallel

    active = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
    ddp = active() if active is not None else None
    if ddp is None or id(ddp) in layer._checked_ddp:
        return
    names = {id(p): n for n, p in ddp.module.named_parameters()}
    ignored = getattr(ddp, "parameters_to_ignore", set())
    missing = [
        names[id(p)]
        for p in layer.experts.parameters()
        if id(p) in names and names[id(p)] not in ignored
    ]
    if missing:
        raise RuntimeError(
            f"DistributedDataParallel was built without ignoring the expert shards "
            f"{missing}: it has overwritten them with rank 0's at construction and would "
            f"average their gradients across ranks. Call "
            f"adaptive_moe.exclude_experts_from_ddp(model) before "
            f"DistributedDataParallel(model) (adaptive_moe.wrap does it for the model it is "
            f"given; adaptive_moe.parallelize(model, mode='ddp') does both), then reload "
            f"the weights"
        )
    world = dist.get_world_size(ddp.process_group)
    if world != layer.layout.world:
        raise ValueError(
            f"DistributedDataParallel runs over {world} ranks but this MoE layer's expert "
            f"group has {layer.layout.world}: expert replicas across groups would need "
            f"their own gradient all-reduce; use one expert group spanning the DDP group"
        )
    layer.set_grad_divisor(world)
    layer._checked_ddp.add(id(ddp))


def check_expert_bytes(
    experts: ExpertConfig, world: int, dtype: torch.dtype | None, device: torch.device | None
) -> None:
    """Refuse, before the allocator does with a traceback, expert weights that cannot fit
    this rank's device: its 1/world share of the E x (2 or 3) d x h matrices."""
    matrices = 3 if experts.glu else 2
    values = matrices * experts.d_model * experts.d_ff * experts.num_experts // world
    itemsize = (dtype or torch.get_default_dtype()).itemsize
    what = (
        f"MoELayer(d_model={experts.d_model}, d_ff={experts.d_ff}, "
        f"num_experts={experts.num_experts}) expert weights on {world} rank(s)"
    )
    check_fits(values * itemsize, device, what)


@contextlib.contextmanager
def profiling_routing(layer: nn.Module, replace: Callable[[Routing], Routing]) -> Iterator[None]:
    """While open, ``layer``'s forward runs unchanged except that the router's decision
    is passed through ``replace`` right after the router ran (a forward hook on
    ``layer.router``, put first so later hooks see what the layer routes by); the
    strategy statistics and the last-forward attributes are put back on exit, so the
    profiler's passes are not the user's. Not reentrant. (Non-public: the offline
    profiler's, ``profiling.profiler``.)"""
    saved = {name: getattr(layer, name) for name in LAST_FORWARD}
    saved_stats, layer._stats = layer._stats, StrategyStats()
    handle = layer.router.register_forward_hook(lambda _m, _a, out: replace(out), prepend=True)
    try:
        yield
    finally:
        handle.remove()
        layer._stats = saved_stats
        for name, value in saved.items():
            setattr(layer, name, value)
        layer._pending_losses = None  # a profiling pass's, shadowed by the restored losses

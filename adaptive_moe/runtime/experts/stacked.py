"""Expert weights: this rank's fixed shard, in the transformers-5 stacked layout.

    GLU:        gate_up_proj [E_l, 2*h_l, d]   gate rows first, then up rows
                down_proj    [E_l, d, h_l]
    plain FFN:  up_proj      [E_l, h_l, d]
                down_proj    [E_l, d, h_l]
    biases:     gate_up_proj_bias / up_proj_bias [E_l, 2*h_l | h_l]
                down_proj_bias [E_l, d / s]      split along d when s > 1, so every rank
                                                 still stores an equal, disjoint share

Every expert parameter carries ``_moe_expert = True``: its gradient arrives fully reduced
in this shard whatever the strategy, so data-parallel all-reduce must skip it.

The parameters are plain local tensors; ``state_dict`` presents them in their *global
view* (``placement``): DTensors over the expert device mesh, the gate/up axis explicit
(``gate_up_proj`` [E, 2, h, d]), so ``torch.distributed.checkpoint`` reshards them to any
world size; ``load_state_dict`` takes that view, full tensors in it, or full tensors in
the transformers layout (``gate_up_proj`` [E, 2h, d]), and keeps this rank's shard.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from adaptive_moe.core.config import ExpertConfig
from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.runtime.experts.placement import (
    expert_device_mesh,
    global_shape,
    global_view,
    same_placement,
)

EXPERT_PARAM_FLAG = "_moe_expert"


def mark_expert(param: nn.Parameter) -> nn.Parameter:
    setattr(param, EXPERT_PARAM_FLAG, True)
    return param


def is_expert_param(param: torch.Tensor) -> bool:
    """True for parameters whose gradients the MoE layer reduces itself."""
    return bool(getattr(param, EXPERT_PARAM_FLAG, False))


class Experts(nn.Module):
    """This rank's share of the E experts (see module docstring for shapes).

    ``process_group`` is the expert group (None: a single process); with it the device
    mesh of the global view is built here (collective over the world when E < W)."""

    def __init__(
        self,
        cfg: ExpertConfig,
        layout: ShardLayout,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        process_group: dist.ProcessGroup | None = None,
    ):
        super().__init__()
        if cfg.bias and cfg.d_model % layout.shards:
            raise ValueError(
                f"d_model={cfg.d_model} must be divisible by the shard count {layout.shards} "
                f"when bias=True (the down-projection bias is split along d_model)"
            )
        self.cfg, self.layout = cfg, layout
        e_l, h_l, d = layout.experts_per_rank, layout.hidden_per_rank, cfg.d_model
        rows = 2 * h_l if cfg.glu else h_l
        kw = {"dtype": dtype, "device": device}
        w1 = mark_expert(nn.Parameter(torch.empty(e_l, rows, d, **kw)))
        b1 = mark_expert(nn.Parameter(torch.empty(e_l, rows, **kw))) if cfg.bias else None
        self.w1_name = "gate_up_proj" if cfg.glu else "up_proj"
        self.register_parameter(self.w1_name, w1)
        self.register_parameter(self.w1_name + "_bias", b1)
        self.down_proj = mark_expert(nn.Parameter(torch.empty(e_l, d, h_l, **kw)))
        self.down_proj_bias = (
            mark_expert(nn.Parameter(torch.empty(e_l, d // layout.shards, **kw)))
            if cfg.bias
            else None
        )
        self.reset_parameters()
        self.device_mesh = expert_device_mesh(layout, process_group)
        self.register_state_dict_post_hook(_present_global_view)
        self.register_load_state_dict_pre_hook(_accept_global_view)

    @property
    def w1(self) -> nn.Parameter:
        return getattr(self, self.w1_name)

    @property
    def b1(self) -> nn.Parameter | None:
        return getattr(self, self.w1_name + "_bias")

    def reset_parameters(self) -> None:
        """Like ``nn.Linear``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases,
        with the fan-in of the *whole* expert (d for the first GEMM, d_ff for the second)."""
        bound1 = 1.0 / math.sqrt(self.cfg.d_model)
        bound2 = 1.0 / math.sqrt(self.cfg.d_ff)
        with torch.no_grad():
            self.w1.uniform_(-bound1, bound1)
            self.down_proj.uniform_(-bound2, bound2)
            if self.b1 is not None:
                self.b1.uniform_(-bound1, bound1)
                self.down_proj_bias.uniform_(-bound2, bound2)

    # Full [E, ...] tensors <-> this rank's shard -------------------------------------------

    def shard_of(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a full expert tensor named like the parameter."""
        lay, cfg = self.layout, self.cfg
        experts = full[lay.local_experts.start : lay.local_experts.stop]
        hid = lay.local_hidden
        if name in ("gate_up_proj", "gate_up_proj_bias"):
            h = cfg.d_ff
            gate, up = experts[:, hid], experts[:, h + hid.start : h + hid.stop]
            return torch.cat([gate, up], dim=1)
        if name in ("up_proj", "up_proj_bias"):
            return experts[:, hid]
        if name == "down_proj":
            return experts[:, :, hid]
        if name == "down_proj_bias":
            n = cfg.d_model // lay.shards
            j = lay.hidden_slice_index
            return experts[:, j * n : (j + 1) * n]
        raise ValueError(f"unknown expert tensor {name!r}")

    def full_shape(self, name: str) -> tuple[int, ...]:
        cfg = self.cfg
        e, h, d = cfg.num_experts, cfg.d_ff, cfg.d_model
        rows = 2 * h if cfg.glu else h
        return {
            self.w1_name: (e, rows, d),
            self.w1_name + "_bias": (e, rows),
            "down_proj": (e, d, h),
            "down_proj_bias": (e, d),
        }[name]

    @torch.no_grad()
    def load_full(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy this rank's shard out of full ``[E, ...]`` tensors (in place: parameter
        storage, and so any optimizer state keyed on it, is kept)."""
        for name, full in tensors.items():
            param = getattr(self, name, None)
            if not isinstance(param, nn.Parameter):
                valid = [n for n, _ in self.named_parameters()]
                raise ValueError(f"unknown expert weight {name!r}; this layer has {valid}")
            if not isinstance(full, torch.Tensor):
                raise ValueError(
                    f"{name} must be a torch.Tensor of the full shape {self.full_shape(name)}, "
                    f"got {type(full).__name__}"
                )
            want = self.full_shape(name)
            if tuple(full.shape) != want:
                raise ValueError(f"{name} must have the full shape {want}, got {tuple(full.shape)}")
            if not full.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got dtype {full.dtype}")
            # The full tensor, which every rank is given: all ranks refuse it alike. One
            # expert at a time: the mask is 1/E of the tensor (this is loading, not a step).
            if not all(bool(torch.isfinite(expert).all()) for expert in full):
                raise ValueError(f"{name} holds NaN or infinite values")
            param.copy_(self.shard_of(name, full))

    def global_view(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The global view (``placement``) of ``local``, a tensor shaped like parameter
        ``name`` (the parameter, or an optimizer moment of it)."""
        return global_view(name, local, self.cfg, self.layout, self.device_mesh)

    def transformers_view(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """Like ``global_view`` but in the transformers layout ([E, 2h, d] for
        ``gate_up_proj``): expressible as a DTensor only when E >= W (whole experts)."""
        if self.device_mesh is None:
            return local
        if self.layout.shards > 1:
            raise ValueError(f"{name}: with E < W a rank's shard is not one box of [E, 2h, d]")
        return DTensor.from_local(
            local,
            self.device_mesh,
            [Shard(0)],
            run_check=False,
            shape=torch.Size(self.full_shape(name)),
            stride=local.stride(),
        )

    def local_shard(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """This rank's shard of ``value``: the global view (a DTensor laid out like ours,
        another DTensor -- gathered, a collective -- or a full tensor) or a full tensor in
        the transformers layout. ValueError for anything else, saying how to convert."""
        want, hf = global_shape(name, self.cfg), self.full_shape(name)
        param = getattr(self, name)
        if isinstance(value, DTensor):
            if tuple(value.shape) not in (want, hf):
                raise ValueError(
                    f"{name}: the DTensor has global shape {tuple(value.shape)}, "
                    f"this layer's is {want} (or {hf})"
                )
            # Ours: same mesh and placements. With whole experts (Shard(0) only) both
            # shapes hold the same box; with hidden slices only the [E, 2, h, d] view does.
            ours = same_placement(value, self.device_mesh, name, self.layout)
            if ours and (tuple(value.shape) == want or self.layout.shards == 1):
                return value.to_local().reshape(param.shape)
            value = value.full_tensor()
        if tuple(value.shape) == want:
            return self.shard_of(name, value.reshape(hf))
        if tuple(value.shape) == hf:
            return self.shard_of(name, value)
        raise ValueError(
            f"{name} has shape {tuple(value.shape)}; this layer (E={self.cfg.num_experts}, "
            f"W={self.layout.world}) loads the full tensor {want} (or {hf}, the transformers "
            f"layout), or the DTensors of a state_dict taken on these same ranks. A plain "
            f"tensor of another shape is one rank's shard from an older adaptive_moe: to "
            f"move between world sizes, save with torch.distributed.checkpoint "
            f"(dcp.save(model.state_dict(), checkpoint_id=path)) and dcp.load(model."
            f"state_dict(), checkpoint_id=path) on the new ranks, or take full tensors "
            f"({{k: v.full_tensor() for DTensor values}}) on the old ranks"
        )


def _present_global_view(
    module: Experts, state_dict: dict[str, torch.Tensor], prefix: str, _meta: object
) -> None:
    for name, _ in module.named_parameters(recurse=False):
        if prefix + name in state_dict:
            state_dict[prefix + name] = module.global_view(name, state_dict[prefix + name])


def _accept_global_view(
    module: Experts, state_dict: dict[str, torch.Tensor], prefix: str, *_: object
) -> None:
    with torch.no_grad():
        for name, _ in module.named_parameters(recurse=False):
            if prefix + name in state_dict:
                state_dict[prefix + name] = module.local_shard(name, state_dict[prefix + name])

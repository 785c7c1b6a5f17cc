"""``wrap`` / ``unwrap``: swap the MoE blocks of a transformers-5 model for ``MoELayer``s
and back.

    model = AutoModelForCausalLM.from_pretrained(path)   # on every rank
    adaptive_moe.wrap(model, table=...)                  # each rank keeps its expert shard
    ...train...                     # export_state_dict(model): transformers-format checkpoint
    adaptive_moe.unwrap(model)                           # full tensors, original modules
    model.save_pretrained(out)                           # plain transformers loads it

Which blocks are found and how they are read is in ``hf_blocks``. A wrapped block keeps
the original module with its tensors moved to the meta device (no memory), so ``unwrap``
can put the same module object, with its class, attributes and hooks, back. Notation as
in ``adaptive_moe.core.config``; the expert tensors are sharded as ``adaptive_moe.core.layout``
says.

Router logits: transformers records them for its load-balancing loss with forward hooks
on the router class (``OutputRecorder``). ``wrap`` installs those hooks, then hands the
ones on each replaced router to a ``RouterLogitsTap`` that the wrapped block calls with
the ``MoELayer``'s fp32 logits, so ``output_router_logits=True`` and ``aux_loss`` keep
working. Create the optimizer after ``wrap``: it must hold the shards, not the freed
full tensors.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from adaptive_moe.comm import default_group
from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.integrations.hf_blocks import (
    EXPERT_TENSORS,
    BlockSpec,
    check_block,
    looks_like_moe,
    read_block,
)
from adaptive_moe.runtime.layer import MoELayer
from adaptive_moe.tuning.table import StrategyTable

try:
    from transformers import PreTrainedModel
    from transformers.utils.output_capturing import maybe_install_capturing_hooks
except ImportError as err:  # the optional extra is missing
    raise ImportError(
        "adaptive_moe.wrap / unwrap need transformers >= 5: "
        "pip install 'adaptive_moe[transformers]'"
    ) from err

__all__ = [
    "RouterLogitsTap",
    "WrappedMoEBlock",
    "export_state_dict",
    "full_expert_tensor",
    "unwrap",
    "wrap",
]


def wrap(
    model: nn.Module,
    table: StrategyTable | str | os.PathLike[str] | None = None,
    *,
    process_group: dist.ProcessGroup | None = None,
    ranks_per_node: int | None = None,
) -> nn.Module:
    """Replace every MoE block of a transformers-5 model by an ``MoELayer`` computing the
    same function; in place, and returns ``model``.

    Args:
        model: a transformers model (or any module containing transformers-5 MoE blocks),
            with its weights loaded, the same on every rank.
        table: a ``StrategyTable`` (or a path to one) measured for these blocks' shape,
            used by every ``MoELayer``; None runs the default strategy.
        process_group: the expert group; default: the world group when
            ``torch.distributed`` is initialised, else this process alone.
        ranks_per_node: passed to ``MoELayer``.

    Each rank keeps only its shard of the expert weights; the full expert tensors are
    dropped from the model (memory is freed unless something else still references them).

    Routers run in fp32 from the block's input (as DeepSeek-V3's does; Mixtral's and
    Qwen's compute their logits in the model dtype), so bf16/fp16 models agree with the
    original to rounding, and a token whose top experts tie within rounding may pick
    another one.

    Raises:
        ValueError: no MoE block was found, or a block that looks like one cannot be
            wrapped exactly (all such blocks are listed), or an ``MoELayer`` cannot be
            built for one (e.g. E and the group size do not divide); the model is then
            left as it was.
    """
    group = default_group(process_group)
    blocks = _find_blocks(model)
    if isinstance(table, (str, os.PathLike)):
        table = StrategyTable.load(table)  # once, not once per layer
    _install_output_recorders(model)
    done: list[tuple[str, WrappedMoEBlock]] = []
    try:
        for name, block, spec in blocks:
            try:
                layer = MoELayer(
                    **spec.layer_kwargs(),
                    process_group=group,
                    ranks_per_node=ranks_per_node,
                    table=table,
                )
            except ValueError as err:
                raise ValueError(f"cannot wrap {name} ({spec.class_name}): {err}") from err
            wrapper = WrappedMoEBlock.replacing(block, spec, layer, group)
            model.set_submodule(name, wrapper)
            done.append((name, wrapper))
    except Exception:
        # Leave the model as it was: the blocks already replaced go back (re-raised below).
        for name, wrapper in reversed(done):
            model.set_submodule(name, wrapper.restore())
        raise
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Put the original transformers blocks back, holding the (trained) weights in their
    original names and layout: full expert tensors, all-gathered over the expert group
    (a collective: call it on every rank). In place; returns ``model``, whose
    ``state_dict`` then loads into, and ``save_pretrained`` writes, a plain transformers
    model."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, WrappedMoEBlock)]
    if not wrapped:
        raise ValueError(f"{type(model).__name__} has no block wrapped by adaptive_moe.wrap")
    for name, block in wrapped:
        model.set_submodule(name, block.restore())
    return model


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict ``unwrap`` would leave, without changing ``model``: original
    transformers names and layout, full expert tensors (a collective: call it on every
    rank). For checkpoints in transformers format while training goes on:
    ``model.save_pretrained(out, state_dict=export_state_dict(model))`` on rank 0."""
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, WrappedMoEBlock)}
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no block wrapped by adaptive_moe.wrap")
    state = {
        key: value
        for key, value in model.state_dict().items()
        if not any(key.startswith(path + ".") for path in blocks)
    }
    for path, block in blocks.items():
        state.update({f"{path}.{key}": v for key, v in block.original_state().items()})
    return state


class RouterLogitsTap(nn.Module):
    """Identity on the router logits [T, E]; exists to carry transformers' recording hooks."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


@dataclasses.dataclass
class _Stripped:
    """The original block with every tensor it owns moved to the meta device.

    Held outside the module tree, so its meta tensors are in no ``state_dict``,
    ``parameters()`` or ``.to()``."""

    module: nn.Module


class WrappedMoEBlock(nn.Module):
    """Stands in for one transformers MoE block: ``moe`` (an ``MoELayer``) computes the
    block's function on this rank's expert shard; the output has the block's shape and
    dtype, and the router logits go to transformers' recorder through ``router_logits``.
    """

    def __init__(
        self,
        layer: MoELayer,
        spec: BlockSpec,
        original: nn.Module,
        process_group: dist.ProcessGroup | None,
    ):
        super().__init__()
        self.moe = layer
        self.router_logits = RouterLogitsTap()
        self.spec = spec
        self.process_group = process_group
        self._original = _Stripped(original)

    @classmethod
    def replacing(
        cls,
        block: nn.Module,
        spec: BlockSpec,
        layer: MoELayer,
        process_group: dist.ProcessGroup | None,
    ) -> WrappedMoEBlock:
        """Load ``block``'s weights into ``layer`` (this rank's shard of the experts),
        strip ``block`` of its tensors, and return the wrapper."""
        with torch.no_grad():
            tensors = block.state_dict(keep_vars=True)
            layer.load_expert_weights(**{n.split(".")[1]: tensors[n] for n in EXPERT_TENSORS})
            for theirs, ours in spec.names:
                target = _tensor(layer, ours)
                if ours not in EXPERT_TENSORS:
                    target.copy_(tensors[theirs])
                target.requires_grad_(tensors[theirs].requires_grad)
        del tensors
        wrapper = cls(layer, spec, block, process_group)
        _copy_recording_hooks(getattr(block, spec.router), wrapper.router_logits)
        for theirs, _ in spec.names:
            _strip(block, theirs)
        wrapper.train(block.training)
        return wrapper

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.moe(hidden_states)  # [..., d]
        self.router_logits(self.moe.last_router_logits)  # [T, E] fp32
        return out

    @torch.no_grad()
    def original_state(self) -> dict[str, torch.Tensor]:
        """This block's current weights under the original block's names, in its layout
        and dtypes (full expert tensors: a collective over the expert group)."""
        block = self._original.module
        state = {}
        for theirs, ours in self.spec.names:
            value = _tensor(self.moe, ours).detach()
            if ours in EXPERT_TENSORS:
                value = full_expert_tensor(
                    ours.split(".")[1], value, self.moe.layout, self.process_group
                )
            state[theirs] = value.to(_tensor(block, theirs).dtype)
        return state

    def restore(self) -> nn.Module:
        """The original block holding this wrapper's current weights (a collective)."""
        block = self._original.module
        block.load_state_dict(self.original_state(), strict=True, assign=True)
        block.train(self.training)
        return block


def full_expert_tensor(
    name: str,
    local: torch.Tensor,
    layout: ShardLayout,
    process_group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """The full ``[E, ...]`` tensor of expert weight ``name`` ("gate_up_proj",
    "up_proj" or "down_proj") from every rank's shard ``local`` (all-gathered over
    ``process_group`` when the layout spans more than one rank)."""
    if layout.world == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(layout.world)]
    dist.all_gather(parts, local.contiguous(), group=process_group)
    if layout.shards == 1:
        return torch.cat(parts)  # rank i holds experts [i*E/W, (i+1)*E/W) whole
    slice_dim = {"gate_up_proj": 1, "up_proj": 1, "down_proj": 2}.get(name)
    if slice_dim is None:
        raise ValueError(f"name must be gate_up_proj, up_proj or down_proj, got {name!r}")
    experts = []
    for e in range(layout.num_experts):
        slices = [parts[layout.owner(e, j)] for j in range(layout.shards)]  # [1, ...] each
        if name == "gate_up_proj":  # each slice is [gate rows; up rows] of its hidden part
            slices = [p.chunk(2, dim=1)[0] for p in slices] + [p.chunk(2, dim=1)[1] for p in slices]
        experts.append(torch.cat(slices, dim=slice_dim))
    return torch.cat(experts)


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, BlockSpec]]:
    """Every MoE block with its reading, outermost first; ValueError listing every block
    that looks like MoE but cannot be wrapped exactly, or when there is none."""
    generator = torch.Generator().manual_seed(0)  # the checks leave the global RNG alone
    found, problems, already = [], [], 0
    for path, module in _walk(model):
        if isinstance(module, WrappedMoEBlock):
            already += 1
            continue
        try:
            spec = read_block(module)
            check_block(module, spec, generator)
        except ValueError as err:
            problems.append(f"  {path} ({type(module).__name__}): {err}")
            continue
        found.append((path, module, spec))
    if problems:
        raise ValueError(
            "adaptive_moe.wrap cannot replace these MoE-looking blocks exactly (nothing was "
            "changed):\n" + "\n".join(problems)
        )
    if not found:
        what = f"only blocks already wrapped ({already})" if already else "no MoE block"
        raise ValueError(
            f"{type(model).__name__} has {what}: wrap looks for modules with a router "
            f"(`gate`) and `experts` holding stacked gate_up_proj / down_proj weights "
            f"(the transformers-5 layout)"
        )
    return found


def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of every MoE-looking or wrapped block, not descending into them."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, MoELayer):  # the user's own: nothing to replace
            continue
        if isinstance(child, WrappedMoEBlock) or looks_like_moe(child):
            yield path, child
        else:
            yield from _walk(child, path)


def _install_output_recorders(model: nn.Module) -> None:
    # Installing on the innermost PreTrainedModels only: transformers installs an
    # outer model's hooks on its inner models again without checking, which would
    # record everything twice once the inner one has its own.
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and not any(
            isinstance(m, PreTrainedModel) for m in module.modules() if m is not module
        ):
            maybe_install_capturing_hooks(module)


def _copy_recording_hooks(router: nn.Module, tap: RouterLogitsTap) -> None:
    # torch has no public API to list a module's hooks. Hooks registered with kwargs
    # expect a different signature and are left behind.
    for hook_id, hook in router._forward_hooks.items():
        if hook_id not in router._forward_hooks_with_kwargs:
            tap.register_forward_hook(hook)


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner), attr)


def _strip(block: nn.Module, name: str) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = block.get_submodule(owner_name)
    value = getattr(owner, attr)
    meta = torch.empty_like(value, device="meta")
    if isinstance(value, nn.Parameter):
        meta = nn.Parameter(meta, requires_grad=value.requires_grad)
    setattr(owner, attr, meta)

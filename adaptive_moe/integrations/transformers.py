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

import copy
import dataclasses
import os
import warnings
from collections.abc import Iterator
from typing import Any

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
from adaptive_moe.integrations.parallelize import exclude_experts_from_ddp
from adaptive_moe.runtime.layer import MoELayer
from adaptive_moe.tuning.table import StrategyTable

try:
    from transformers import PreTrainedModel, TrainerCallback
    from transformers.utils.output_capturing import maybe_install_capturing_hooks
except ImportError as err:  # the optional extra is missing
    raise ImportError(
        "adaptive_moe.wrap / unwrap need transformers >= 5: "
        "pip install 'adaptive_moe[transformers]'"
    ) from err

__all__ = [
    "RouterLogitsTap",
    "ShardedExpertsCallback",
    "WrappedMoEBlock",
    "export_state_dict",
    "full_expert_tensor",
    "stage_for_save",
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
    # DistributedDataParallel(model) -- as transformers' Trainer builds it -- must leave
    # the expert shards alone (see integrations.parallelize).
    exclude_experts_from_ddp(model)
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
        self._staged: _Staged | None = None
        # Original owner path -> ours ("gate" -> "moe.router"), where the leaf names agree:
        # tools that resolve state-dict keys by attribute (torch.distributed.checkpoint's
        # get_model_state_dict) find the original names' tensors.
        self._aliases = {
            theirs.rpartition(".")[0]: f"moe.{ours.rpartition('.')[0]}"
            for theirs, ours in spec.names
            if "." in theirs and theirs.rpartition(".")[2] == ours.rpartition(".")[2]
        }
        self.register_state_dict_post_hook(_present_original_names)
        self.register_load_state_dict_pre_hook(_accept_original_names)

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

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            aliases = self.__dict__.get("_aliases", {})
            if name in aliases:
                return self.get_submodule(aliases[name])
            raise

    def __deepcopy__(self, memo: dict[int, object]) -> WrappedMoEBlock:
        # The process group is shared by copies (it cannot be copied); the rest is copied.
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        new = WrappedMoEBlock.__new__(WrappedMoEBlock)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def stage_full_state(self, keep: bool) -> None:
        """Gather the full expert tensors now (a collective over the expert group) and,
        where ``keep``, hold them for the next ``state_dict`` (see ``stage_for_save``)."""
        state = {
            theirs: value
            for theirs, value in self.original_state().items()
            if dict(self.spec.names)[theirs] in EXPERT_TENSORS
        }
        self._staged = _Staged(_versions(self.moe), state) if keep else None

    def _staged_state(self) -> dict[str, torch.Tensor] | None:
        """The staged full expert tensors, if the weights have not changed since."""
        staged = self._staged
        if staged is None or staged.versions != _versions(self.moe):
            self._staged = None
            return None
        return staged.tensors

    def restore(self) -> nn.Module:
        """The original block holding this wrapper's current weights (a collective)."""
        block = self._original.module
        block.load_state_dict(self.original_state(), strict=True, assign=True)
        block.train(self.training)
        return block


@dataclasses.dataclass(frozen=True)
class _Staged:
    """Full expert tensors gathered for a save, and the parameter versions they show."""

    versions: tuple[int, ...]
    tensors: dict[str, torch.Tensor]


def _versions(layer: MoELayer) -> tuple[int, ...]:
    # Every in-place update (optimizer step, load) bumps a tensor's version counter.
    return tuple(p._version for p in layer.experts.parameters())


def _present_original_names(
    block: WrappedMoEBlock, state_dict: dict[str, torch.Tensor], prefix: str, _meta: object
) -> None:
    """``state_dict`` of a wrapped block under the original block's names.

    Expert tensors: on one process the full tensors in the transformers layout (views of
    the parameters); on several ranks with E >= W DTensors of that same layout
    (``Shard(0)``), so DCP checkpoints reshard between one process, any E >= W world and
    plain transformers models; with E < W the global view of ``runtime.placement``
    (``gate_up_proj`` as [E, 2, h, d]: a hidden slice of [E, 2h, d] is not one box), which
    reshards between E < W worlds only. Or, on a rank that
    ``stage_for_save`` prepared, the full tensors it gathered (what ``save_pretrained``
    on rank 0 alone needs: the other ranks are not there to gather with)."""
    staged = block._staged_state()
    for theirs, ours in block.spec.names:
        value = state_dict.pop(f"{prefix}moe.{ours}", None)
        if value is None:
            continue
        if ours in EXPERT_TENSORS:
            layout = block.moe.layout
            if staged is not None:
                value = staged[theirs]
            elif layout.world == 1:
                value = value.reshape(_tensor(block._original.module, theirs).shape)
            elif layout.shards == 1:
                # Whole experts per rank: the transformers layout itself is one box per
                # rank, so the key keeps its shape on every world size with E >= W.
                experts = block.moe.experts
                leaf = ours.split(".")[1]
                value = experts.transformers_view(leaf, getattr(experts, leaf).detach())
        state_dict[prefix + theirs] = value


def _accept_original_names(
    block: WrappedMoEBlock, state_dict: dict[str, torch.Tensor], prefix: str, *_: object
) -> None:
    # The expert tensors arrive full (transformers layout or global view) or as DTensors;
    # ``Experts`` keeps this rank's shard of them.
    for theirs, ours in block.spec.names:
        if prefix + theirs in state_dict:
            state_dict[f"{prefix}moe.{ours}"] = state_dict.pop(prefix + theirs)


def stage_for_save(model: nn.Module, rank: int | None = 0) -> None:
    """Prepare a rank-0-only ``save_pretrained`` of a wrapped model on several ranks:
    gathers every wrapped block's full expert tensors (a collective: call it on every
    rank) and keeps them on global rank ``rank`` (None: on every rank) until the next
    ``state_dict`` after which the weights change. transformers' ``Trainer.save_model``
    writes from rank 0 alone; ``ShardedExpertsCallback`` calls this for it."""
    me = dist.get_rank() if dist.is_initialized() else 0
    blocks = [m for m in model.modules() if isinstance(m, WrappedMoEBlock)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no block wrapped by adaptive_moe.wrap")
    for block in blocks:
        block.stage_full_state(keep=rank is None or me == rank)


class ShardedExpertsCallback(TrainerCallback):
    """transformers ``Trainer`` callback for wrapped models on several ranks.

    ``Trainer(..., callbacks=[ShardedExpertsCallback()])``. Before every checkpoint save
    and at the end of training (so that a following ``trainer.save_model()`` writes the
    trained experts) it gathers the full expert tensors onto rank 0 (``stage_for_save``),
    so the checkpoint holds the original transformers names and layout. Warns when
    gradient clipping is on: ``clip_grad_norm_`` would compute a different norm on every
    rank (each sees only its own expert shard) and the replicas would drift apart."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1 and args.max_grad_norm:
            warnings.warn(
                f"max_grad_norm={args.max_grad_norm}: Trainer clips with a norm that each "
                f"rank computes over its own expert shard, so ranks clip differently; "
                f"set max_grad_norm=0 with sharded experts (in your own loop, "
                f"adaptive_moe.clip_grad_norm_ clips by the global norm)",
                UserWarning,
                stacklevel=2,
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save:
            stage_for_save(kwargs["model"])

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save:
            stage_for_save(kwargs["model"])

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        stage_for_save(kwargs["model"])


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

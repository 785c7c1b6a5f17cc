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
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from adaptive_moe.comm import default_group
from adaptive_moe.core.config import CompileBackend
from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.integrations.hf_blocks import (
    EXPERT_TENSORS,
    BlockSpec,
    check_block,
    looks_like_moe,
    read_block,
)
from adaptive_moe.integrations.parallelize import clip_grad_norm_, exclude_experts_from_ddp
from adaptive_moe.runtime.experts.placement import (
    GATE_UP,
    local_of_sliced_view,
    sliced_transformers_view,
)
from adaptive_moe.runtime.experts.stacked import Experts, is_expert_param
from adaptive_moe.runtime.inference.config import InferenceConfig
from adaptive_moe.runtime.layer import MoELayer
from adaptive_moe.tuning.table import StrategyTable

try:
    from packaging.version import Version  # a dependency of transformers
    from transformers import DefaultFlowCallback, PreTrainedModel, TrainerCallback
    from transformers import __version__ as _TRANSFORMERS_VERSION
    from transformers.utils.output_capturing import maybe_install_capturing_hooks
except ImportError as err:  # the optional extra is missing
    raise ImportError(
        "adaptive_moe.wrap / unwrap need transformers >= 5: "
        "pip install 'adaptive_moe[transformers]'"
    ) from err

if TYPE_CHECKING:
    from transformers import Trainer  # needs accelerate; wrap / unwrap do not

__all__ = [
    "GlobalBalanceLoss",
    "RouterLogitsTap",
    "ShardedExpertsCallback",
    "WrappedMoEBlock",
    "cpu_resume_problem",
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
    inference: InferenceConfig | None = None,
    compile_experts: CompileBackend | None = None,
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
        inference: passed to every ``MoELayer``: how a forward without gradients (as in
            ``generate``) runs. ``InferenceConfig(cuda_graph_tokens=1)`` replays each
            layer's batch-1 decode step as a CUDA graph (one process on CUDA); None:
            the layer's default (the static inference path, no graphs).
        compile_experts: passed to every ``MoELayer``: ``"inductor"`` runs a
            one-process training forward's ``grouped_mm`` experts (grouping, both
            GEMMs, activation, combine) as one compiled graph; None: eager.

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

    Warns (``UserWarning``) when the process was launched as one of several ranks
    (``WORLD_SIZE`` > 1, as ``torchrun`` sets it) but no default process group exists
    yet and no ``process_group`` is given: each rank would keep every expert. Call
    ``torch.distributed.init_process_group`` (or build the ``TrainingArguments``, which
    initialise it) before ``wrap``.
    """
    _warn_if_launched_without_group(process_group)
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
                    inference=inference,
                    compile_experts=compile_experts,
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
    _accept_checkpoint_format(model)
    return model


def _warn_if_launched_without_group(process_group: dist.ProcessGroup | None) -> None:
    # WORLD_SIZE only detects a multi-process launch (torchrun sets it); the group used
    # is still the one given or initialised, never one derived from the environment.
    if process_group is not None or (dist.is_available() and dist.is_initialized()):
        return
    launched = os.environ.get("WORLD_SIZE", "1")
    if launched.isdigit() and int(launched) > 1:
        warnings.warn(
            f"adaptive_moe.wrap: WORLD_SIZE={launched} (a launch of {launched} processes) "
            f"but no default process group is initialised, so the experts are sharded "
            f"over this process alone (every rank keeps all of them) and a Trainer on "
            f"{launched} ranks will refuse the model. Call "
            f"torch.distributed.init_process_group(...) (or build the TrainingArguments, "
            f"which initialise it) before wrap, or pass wrap(model, process_group=...)",
            UserWarning,
            stacklevel=3,
        )


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
    (``Shard(0)``); with E < W the same transformers shapes: DTensors of the global view
    where a rank's hidden slice is one box, and for ``gate_up_proj`` (its gate rows and
    its up rows: two boxes of [E, 2h, d]) a ``ShardedTensor`` with two local shards
    (``runtime.experts.placement.sliced_transformers_view``). So DCP checkpoints reshard between
    one process, E >= W and E < W worlds and plain transformers models. Or, on a rank that
    ``stage_for_save`` prepared, the full tensors it gathered (what ``save_pretrained``
    on rank 0 alone needs: the other ranks are not there to gather with).

    Every other entry (the router's weight, DeepSeek's score bias, ...) has the dtype of
    the original block's tensor, so ``save_pretrained`` of a model loaded in bf16 writes
    bf16 routers, as ``config.json`` says: the fp32 router weight is rounded to it there
    (and in every checkpoint made from ``state_dict``); an fp32 model's stays exact."""
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
            elif ours.split(".")[1] in GATE_UP:
                # E < W: gate rows and up rows of a hidden slice, two boxes of [E, 2h, d].
                experts = block.moe.experts
                leaf = ours.split(".")[1]
                value = sliced_transformers_view(
                    leaf,
                    getattr(experts, leaf).detach(),
                    experts.full_shape(leaf),
                    layout,
                    block.process_group,
                )
        else:
            # The router runs in fp32; its entry keeps the dtype the model was loaded in
            # (the one config.json names), as export_state_dict / unwrap write it.
            value = value.to(_tensor(block._original.module, theirs).dtype)
        state_dict[prefix + theirs] = value


def _accept_original_names(
    block: WrappedMoEBlock, state_dict: dict[str, torch.Tensor], prefix: str, *_: object
) -> None:
    # The expert tensors arrive full (transformers layout or global view) or as DTensors;
    # ``Experts`` keeps this rank's shard of them.
    experts = block.moe.experts
    for theirs, ours in block.spec.names:
        if prefix + theirs not in state_dict:
            continue
        value = state_dict.pop(prefix + theirs)
        if isinstance(value, ShardedTensor):  # ours (E < W gate_up_proj), or refused
            leaf = ours.split(".")[-1]
            local = local_of_sliced_view(leaf, value, experts.full_shape(leaf), experts.layout)
            if local is None:
                raise ValueError(
                    f"{prefix}{theirs}: a ShardedTensor that is not this rank's layout of "
                    f"it; load checkpoints with torch.distributed.checkpoint "
                    f"(dcp.load(model.state_dict(), checkpoint_id=path)), then "
                    f"model.load_state_dict of that state dict"
                )
            value = experts.global_view(leaf, local)
        state_dict[f"{prefix}moe.{ours}"] = value


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
    """transformers ``Trainer`` callback for ``wrap``-ed models on several ranks.

    ``Trainer(..., callbacks=[ShardedExpertsCallback()])``, or
    ``ShardedExpertsCallback.attach(trainer)`` after building it (with ``report_to``
    integrations: see below), with any ``TrainingArguments``.
    On one process it changes nothing. On W > 1 ranks it does three things Trainer cannot
    do for per-rank shards:

    - **Gradient clipping by the global norm.** Trainer's own clipping
      (``max_grad_norm``, default 1.0) computes the norm on each rank over that rank's
      expert shard, so ranks would clip by different factors and the dense replicas
      drift apart. The callback turns Trainer's clipping off for the span of each step
      in which Trainer reads it (``args.max_grad_norm = 0`` from ``on_step_begin`` to
      ``on_pre_optimizer_step``, so every other callback, ``training_args.bin`` and the
      integrations' run configs see the user's value) and clips in
      ``on_pre_optimizer_step`` with ``adaptive_moe.clip_grad_norm_`` and the user's
      ``max_grad_norm`` (experts' squared norms summed over the ranks). The logged
      ``grad_norm`` becomes that global norm (in ``state.log_history`` and for every
      callback after this one). Trainer places the ``report_to`` integrations
      (TensorBoard, W&B, ...) before user callbacks, where they would see the norm of
      rank 0's own shard: build the Trainer, then ``ShardedExpertsCallback.attach(trainer)``
      puts the callback right after Trainer's flow control and before all others.
      (Trainer still computes its rank-local norm every step, an unused pass over the
      gradients that no public argument turns off.)
    - **Checkpoints that hold every rank's expert optimizer state.** Trainer writes
      ``optimizer.pt`` from rank 0 alone. Before each checkpoint the callback gathers
      the full ``[E, ...]`` expert moments (a collective) onto rank 0, whose
      ``optimizer.state_dict()`` then carries them; on ``resume_from_checkpoint`` each
      rank keeps its shard of them (``on_train_begin``, which runs after Trainer loaded
      ``optimizer.pt``). The moments are saved as full tensors, like the weights. A
      checkpoint written without the callback holds rank 0's shards only: resuming
      from it on W > 1 ranks raises ``ValueError``. On CPU ranks transformers < 5.18
      cannot load its own ``optimizer.pt`` at all (``cpu_resume_problem``): the callback
      warns once, when the Trainer is built.
    - **The router load-balancing loss of the global batch** (models that add
      ``router_aux_loss_coef * aux_loss`` to their loss: Mixtral, Qwen2/3-MoE, OLMoE).
      transformers computes that loss from each rank's own tokens, a product of
      per-rank means rather than a per-token sum, and with
      ``average_tokens_across_devices`` (default True) Trainer multiplies every rank's
      loss by W so that its token-normalised cross entropy sums right: the aux part
      came out ~W times too large (and, without it, as the mean of per-rank losses,
      not the global batch's). The callback hooks the model's forward
      (``GlobalBalanceLoss``) so that its ``loss`` carries this rank's share of the
      global-batch aux loss, scaled for the Trainer setting: the losses and gradients
      of a W-rank run equal one process on the global batch with either value of
      ``average_tokens_across_devices``.
    - **Model checkpoints in transformers format** (``wrap``-ed blocks). Before every
      checkpoint save and at the end of training (so that a following
      ``trainer.save_model()`` writes the trained experts) it gathers the full expert
      tensors onto rank 0 (``stage_for_save``): original transformers names and layout.
    """

    def __init__(self) -> None:
        self._user_max_grad_norm: float | None = None
        self._grad_norm: float | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._hook: Any = None
        self._staged_optim: dict[int, dict[str, torch.Tensor]] | None = None
        self._staged_versions: tuple[int, ...] = ()
        self._balance_hook: Any = None

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Once per Trainer, before any step: the resume failure below happens before the
        # first step of a resumed run, so the earliest place that sees the arguments.
        problem = cpu_resume_problem(args)
        if problem is not None and args.process_index == 0:  # one warning per run
            warnings.warn(problem, UserWarning, stacklevel=2)

    @classmethod
    def attach(cls, trainer: Trainer) -> ShardedExpertsCallback:
        """Give ``trainer`` a ``ShardedExpertsCallback`` (the one it has, else a new one)
        placed right after its ``DefaultFlowCallback`` (which decides when to save, read
        here) and before every other callback, ``report_to`` integrations included, so
        that all of them see the global ``grad_norm``. Call it after building the
        Trainer, before ``train``; uses only ``Trainer.pop_callback`` / ``add_callback``.
        Returns the callback."""
        callbacks = list(trainer.callback_handler.callbacks)
        ours = next((cb for cb in callbacks if isinstance(cb, cls)), None)
        if ours is None:
            ours = cls()
            ours.on_init_end(trainer.args, trainer.state, trainer.control)
        # Trainer puts DefaultFlowCallback first; it stays there, and every other callback
        # is re-added behind ours in its current order.
        behind = [
            cb for cb in callbacks if cb is not ours and not isinstance(cb, DefaultFlowCallback)
        ]
        for cb in [*behind, ours]:
            trainer.pop_callback(cb)
        for cb in [ours, *behind]:
            trainer.add_callback(cb)
        return ours

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not _distributed():
            return
        model = kwargs["model"]
        _check_expert_world(model)
        if self._balance_hook is None and _has_balance_loss(model):
            share = GlobalBalanceLoss(bool(args.average_tokens_across_devices))
            self._balance_hook = model.register_forward_hook(share, with_kwargs=True)
        if self._user_max_grad_norm is None:
            self._user_max_grad_norm = float(args.max_grad_norm or 0.0)
        optimizer = _torch_optimizer(kwargs.get("optimizer"))
        if optimizer is None:
            return
        if optimizer is not self._optimizer:
            if self._hook is not None:
                self._hook.remove()
            self._optimizer = optimizer
            self._hook = optimizer.register_state_dict_post_hook(self._full_expert_state)
        _keep_own_expert_state(model, optimizer, resumed=state.global_step > 0)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._user_max_grad_norm is not None:
            # Trainer's clip, read between here and on_pre_optimizer_step, would use
            # per-rank norms; this callback clips instead.
            args.max_grad_norm = 0.0

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._user_max_grad_norm is None:
            return
        if args.max_grad_norm:
            raise RuntimeError(
                "ShardedExpertsCallback: Trainer clipped this step's gradients by each "
                "rank's own norm (args.max_grad_norm was not 0 at the clip: on_step_begin "
                "did not run before it, or a callback set max_grad_norm in between)"
            )
        args.max_grad_norm = self._user_max_grad_norm
        # max_grad_norm=0 (no clipping) still logs the global norm: inf clips nothing.
        max_norm = self._user_max_grad_norm or float("inf")
        self._grad_norm = float(clip_grad_norm_(kwargs["model"], max_norm))

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        logs = kwargs.get("logs")
        if self._grad_norm is None or not logs or "grad_norm" not in logs:
            return
        logs["grad_norm"] = self._grad_norm
        last = state.log_history[-1] if state.log_history else None
        if last is not None and "grad_norm" in last and last.get("step") == state.global_step:
            last["grad_norm"] = self._grad_norm

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save:
            self._stage(kwargs["model"], args)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save:
            self._stage(kwargs["model"], args)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._staged_optim = None  # written: free the full moments

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._balance_hook is not None:
            self._balance_hook.remove()
            self._balance_hook = None
        if self._user_max_grad_norm is not None:
            args.max_grad_norm = self._user_max_grad_norm
            self._user_max_grad_norm = None
        _stage_weights(kwargs["model"])

    def _stage(self, model: nn.Module, args: Any) -> None:
        """Gather what Trainer's rank-0-only checkpoint needs (collectives, every rank)."""
        _stage_weights(model)
        if self._optimizer is None or not _distributed():
            return
        full = _gather_expert_state(model, self._optimizer)
        if dist.get_rank() == 0:
            self._staged_optim = full
            self._staged_versions = _state_versions(self._optimizer)

    def _full_expert_state(
        self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
    ) -> dict[str, Any]:
        """``state_dict`` post-hook: the expert moments of every rank, full ``[E, ...]``
        tensors, in place of rank 0's shards -- when gathered for this very state."""
        staged = self._staged_optim
        if staged is None:
            return state_dict
        if self._staged_versions != _state_versions(optimizer):  # stepped since: stale
            self._staged_optim = None
            return state_dict
        for index, full in staged.items():
            if full:  # an optimizer without moments (SGD, no momentum) has no entry
                state_dict["state"][index] = {**state_dict["state"][index], **full}
        return state_dict


class GlobalBalanceLoss:
    """Forward hook (``register_forward_hook(..., with_kwargs=True)``) on a transformers
    MoE causal LM (``router_aux_loss_coef``, ``num_experts``, ``num_experts_per_tok``)
    trained by ``Trainer`` on the W ranks of the default process group.

    transformers' ``load_balancing_loss_func`` is E * sum_e (C_e / R) * (S_e / R): C the
    top-k assignments per expert, S the router probabilities summed, R the rows (all
    over every layer, padding masked out) -- of this rank's tokens only. With C and R
    all-reduced (they carry no gradient) this rank's share E * sum_e C_e S_e / R^2 sums
    over the ranks to the global-batch loss, value and gradient. ``output.loss`` gets
    ``coef *`` that share in place of ``coef *`` the local loss, times W unless Trainer
    multiplies the loss by W itself (``average_tokens_across_devices`` and the model
    given ``num_items_in_batch``), since Trainer's DDP averages the ranks' gradients;
    ``output.aux_loss`` is W times the share (its mean over the ranks is the global
    loss). A model whose aux loss is another function of its router logits is left as
    it is, with a warning."""

    def __init__(self, average_tokens_across_devices: bool) -> None:
        self.average_tokens_across_devices = average_tokens_across_devices
        self._warned = False

    def __call__(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        logits = getattr(output, "router_logits", None)
        aux = getattr(output, "aux_loss", None)
        loss = getattr(output, "loss", None)
        if loss is None or not isinstance(aux, torch.Tensor) or not isinstance(logits, tuple):
            return None
        local, share = _balance_share(
            logits, model.num_experts, model.num_experts_per_tok, kwargs.get("attention_mask")
        )
        if not torch.allclose(local.detach(), aux.detach().float(), rtol=1e-4, atol=1e-7):
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"ShardedExpertsCallback: {type(model).__name__}'s aux_loss is not "
                    f"transformers' load_balancing_loss_func of its router logits; left "
                    f"per rank (on W ranks its gradient is the mean of the ranks' losses, "
                    f"times W with average_tokens_across_devices=True: pass "
                    f"TrainingArguments(average_tokens_across_devices=False))",
                    UserWarning,
                    stacklevel=2,
                )
            return None
        world = dist.get_world_size()
        trainer_scales = (
            self.average_tokens_across_devices and kwargs.get("num_items_in_batch") is not None
        )
        coef = model.router_aux_loss_coef
        part = share if trainer_scales else world * share
        output.loss = loss - coef * aux.to(loss.dtype) + coef * part.to(loss.dtype)
        output.aux_loss = world * share
        return output


def _has_balance_loss(model: nn.Module) -> bool:
    return all(
        hasattr(model, name)
        for name in ("router_aux_loss_coef", "num_experts", "num_experts_per_tok")
    )


def _balance_share(
    logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(transformers' load-balancing loss of this rank's tokens, this rank's share of the
    global batch's; one all-reduce of E + 1 values over the world)."""
    device = logits[0].device
    counts = torch.zeros(num_experts, device=device)  # C [E]
    probs = torch.zeros(num_experts, device=device)  # S [E]
    rows = torch.zeros((), device=device)  # R
    for layer in logits:
        p = torch.softmax(layer.to(device).float(), dim=-1)  # [T, E]
        chosen = torch.topk(p, top_k, dim=-1).indices  # [T, k]
        if attention_mask is None:
            weight = torch.ones(p.shape[0], device=device)  # [T]
        else:
            weight = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)  # [T]
        counts = counts.scatter_add(0, chosen.reshape(-1), weight.repeat_interleave(top_k))
        probs = probs + (p * weight.unsqueeze(-1)).sum(dim=0)
        rows = rows + weight.sum()
    local = num_experts * torch.sum(counts / rows * probs / rows)
    totals = torch.cat([counts, rows.reshape(1)]).detach()  # [E + 1]
    dist.all_reduce(totals)
    share = num_experts * torch.sum(totals[:-1] * probs) / totals[-1] ** 2
    return local, share


# transformers' Trainer._load_optimizer_and_scheduler up to 5.17 loads optimizer.pt with
# map_location=args.device whenever world_size > 1. On CPU ranks accelerate makes that
# device torch.device("cpu", local rank % torch.cpu.device_count()), i.e. "cpu:0" (its
# PartialState.set_device), and torch.load restores a storage on the CPU only for the
# exact location "cpu" (serialization._cpu_deserialize), so every multi-process CPU
# resume fails ("... tagged with cpu:0"), with or without adaptive_moe. 5.18.0 maps CPU
# devices to plain "cpu" (checked in the 5.17.0 and 5.18.0 wheels). DeepSpeed and FSDP
# load the optimizer another way.
_CPU_RESUME_FIXED_IN = Version("5.18.0")


def cpu_resume_problem(args: Any, transformers_version: str = _TRANSFORMERS_VERSION) -> str | None:
    """Why ``Trainer.train(resume_from_checkpoint=...)`` will fail for these
    ``TrainingArguments`` under ``transformers_version`` (default: the installed one), or
    None: transformers < 5.18 on several processes whose device is an indexed CPU device
    (``cpu:0``, what accelerate gives every gloo CPU rank) cannot load its own
    ``optimizer.pt``. ``ShardedExpertsCallback`` warns with this text."""
    device = args.device
    if (
        Version(transformers_version) >= _CPU_RESUME_FIXED_IN
        or args.world_size <= 1
        or device.type != "cpu"
        or device.index is None
        or getattr(args, "deepspeed", None)
        or getattr(args, "fsdp", None)
    ):
        return None
    return (
        f"transformers {transformers_version} on {args.world_size} CPU processes (device "
        f"{device}): Trainer.train(resume_from_checkpoint=...) will fail inside "
        f"transformers' own torch.load of optimizer.pt (map_location={str(device)!r}; "
        f"torch restores CPU storages for 'cpu' only: 'don't know how to restore data "
        f"location ... tagged with {device}'). Training and saving checkpoints work; to "
        f"resume, upgrade to transformers >= {_CPU_RESUME_FIXED_IN}"
    )


def _stage_weights(model: nn.Module) -> None:
    # Only wrap-ed blocks have a transformers format to save; own MoELayers are skipped.
    if any(isinstance(m, WrappedMoEBlock) for m in model.modules()):
        stage_for_save(model)


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _check_expert_world(model: nn.Module) -> None:
    world = dist.get_world_size()
    for module in model.modules():
        if isinstance(module, Experts) and module.layout.world != world:
            raise ValueError(
                f"ShardedExpertsCallback: an MoE layer shards its experts over "
                f"{module.layout.world} ranks, Trainer runs on {world}: the expert group "
                f"must be the world (Trainer's data-parallel group). Call "
                f"torch.distributed.init_process_group(...) (or build the "
                f"TrainingArguments, which initialise it) before adaptive_moe.wrap(model), "
                f"or pass wrap(model, process_group=...) a group of all {world} ranks"
            )


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    # accelerate's AcceleratedOptimizer delegates state_dict to the optimizer it wraps.
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def _expert_params(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> list[tuple[int, nn.Parameter, Experts, str]]:
    """(index in ``optimizer.state_dict()["state"]``, parameter, its Experts, its name)
    for every expert parameter the optimizer holds."""
    owner = {
        id(p): (module, name)
        for module in model.modules()
        if isinstance(module, Experts)
        for name, p in module.named_parameters(recurse=False)
    }
    # Optimizer.state_dict numbers the parameters in param_groups order from 0.
    order = [p for group in optimizer.param_groups for p in group["params"]]
    return [(i, p, *owner[id(p)]) for i, p in enumerate(order) if id(p) in owner]


def _moments(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> dict[str, torch.Tensor]:
    """The optimizer state tensors of ``param`` shaped like it (AdamW's exp_avg, ...);
    scalars such as ``step`` are the same on every rank and stay as they are."""
    return {
        k: v
        for k, v in optimizer.state.get(param, {}).items()
        if isinstance(v, torch.Tensor) and v.shape == param.shape
    }


def _gather_expert_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[int, dict[str, torch.Tensor]]:
    """Full ``[E, ...]`` expert moments (transformers layout), by state-dict index; a
    collective over the expert group, in the same order on every rank."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for index, param, experts, name in _expert_params(model, optimizer):
        full = {}
        for key, local in sorted(_moments(optimizer, param).items()):
            whole = experts.global_view(name, local.detach()).full_tensor()
            full[key] = whole.reshape(experts.full_shape(name))
        out[index] = full
    return out


def _state_versions(optimizer: torch.optim.Optimizer) -> tuple[int, ...]:
    # Every optimizer step updates the moments in place and bumps their versions.
    return tuple(
        v._version
        for group in optimizer.param_groups
        for p in group["params"]
        if is_expert_param(p)
        for v in optimizer.state.get(p, {}).values()
        if isinstance(v, torch.Tensor) and v.shape == p.shape
    )


@torch.no_grad()
def _keep_own_expert_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, resumed: bool
) -> None:
    """After Trainer loaded ``optimizer.pt``: full expert moments -> this rank's shard.
    Moments of the shard's own shape after a resume came from rank 0 alone."""
    for _, param, experts, name in _expert_params(model, optimizer):
        full_shape = experts.full_shape(name)
        for key, value in optimizer.state.get(param, {}).items():
            if not isinstance(value, torch.Tensor):
                continue
            if tuple(value.shape) == full_shape:
                optimizer.state[param][key] = experts.shard_of(name, value).clone()
            elif resumed and value.shape == param.shape:
                raise ValueError(
                    f"the optimizer state loaded for {name} ({key}) is one rank's shard: "
                    f"the checkpoint was written without ShardedExpertsCallback (Trainer "
                    f"saves rank 0's optimizer state alone). Resume from a checkpoint "
                    f"saved with callbacks=[ShardedExpertsCallback()], or without "
                    f"resume_from_checkpoint's optimizer state (delete optimizer.pt)"
                )


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


def _accept_checkpoint_format(model: nn.Module) -> None:
    """Let ``model.load_state_dict`` take a state dict in the *checkpoint* format that
    ``save_pretrained`` writes (transformers 5 reverts its weight conversions on save:
    Mixtral's ``block_sparse_moe.experts.0.w1.weight`` instead of
    ``mlp.experts.gate_up_proj``). transformers' ``Trainer`` resumes a checkpoint with a
    plain ``model.load_state_dict(weights, strict=False)``, which would leave every
    expert and router weight of an MoE model as it was, with no error; here the
    checkpoint keys go through the model's own conversion mapping first, as
    ``from_pretrained`` does. Installed once on the outermost ``PreTrainedModel``."""
    if not isinstance(model, PreTrainedModel) or getattr(model, "_moe_checkpoint_format", False):
        return
    model._moe_checkpoint_format = True
    model.register_load_state_dict_pre_hook(_convert_checkpoint_keys)


def _convert_checkpoint_keys(
    model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *_: object
) -> None:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        PrefixChange,
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    ours = set(model.state_dict(keep_vars=True))
    foreign = [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] not in ours]
    if not foreign:
        return
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:  # not loaded by from_pretrained: the mapping of its class
        conversions = [
            c
            for c in get_model_conversion_mapping(model, add_legacy=False)
            if not isinstance(c, PrefixChange)
        ]
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    pending: dict[str, Any] = {}  # target key -> converter collecting its sources
    for key in sorted(foreign, key=dot_natural_key):
        target, pattern = rename_source_key(key[len(prefix) :], renamings, converters)
        if pattern is None:
            if target in ours:
                state_dict[prefix + target] = state_dict.pop(key)
            continue
        converter = pending.setdefault(target, copy.deepcopy(by_pattern[pattern]))
        converter.add_tensor(target, key, pattern, state_dict.pop(key))
    for target, converter in pending.items():
        for name, value in converter.convert(target, model=model, config=model.config).items():
            state_dict[prefix + name] = value[0] if isinstance(value, list) else value


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

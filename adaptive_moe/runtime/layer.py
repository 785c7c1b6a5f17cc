"""``MoELayer``: route -> choose a strategy -> run it (dispatch -> experts -> combine) ->
shared experts. The layer holds the parameters, the configs and this forward; its parts
are built in ``layer_build``, the strategy is chosen by ``policy.StrategyPolicy`` and run
by one of three path objects (``dispatch.counted``, ``inference.static_path``,
``inference.device_grouped``).

    x        [..., d]    any leading shape; flattened to [T, d]
    counts   [W, 2E]     per rank: kept slots per expert, then demanded slots per expert
                         (one small all-gather: dropless dispatch needs it anyway)
    y        [..., d]    same shape and dtype as x

All ranks see the same ``counts``, hence the same workload key and the same strategy.
"""

from __future__ import annotations

import copy
import itertools
import os
import weakref
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
from torch import nn

from adaptive_moe.comm import default_group
from adaptive_moe.core.config import CompileBackend, ExpertConfig, RouterConfig, SharedExpertConfig
from adaptive_moe.core.dtypes import name_of
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.runtime.agreement import check_layer_agreement
from adaptive_moe.runtime.dispatch.counted import CountedCall
from adaptive_moe.runtime.dispatch.executor import Executor
from adaptive_moe.runtime.experts.grouping import expert_counts
from adaptive_moe.runtime.experts.kernels import KernelChoice
from adaptive_moe.runtime.experts.stacked import mark_expert
from adaptive_moe.runtime.inference.config import InferenceConfig
from adaptive_moe.runtime.inference.ran import Ran
from adaptive_moe.runtime.inference.static_path import StaticCall, static_losses
from adaptive_moe.runtime.layer_args import call_errors, first_error, flat_input, routing_checks
from adaptive_moe.runtime.layer_build import (
    BuildOptions,
    build_parts,
    check_configs,
    configs_from_keywords,
)
from adaptive_moe.runtime.layer_hooks import _check_data_parallel, divide_grad, profiling_routing
from adaptive_moe.runtime.policy.stats import StrategyStats
from adaptive_moe.runtime.routing.router import Routing, balance_loss, z_loss
from adaptive_moe.tuning.online import Exploration
from adaptive_moe.tuning.table import Fingerprint, LayerShape, StrategyTable
from adaptive_moe.tuning.workload import Buckets


class _DeferredLoss:
    """``MoELayer.aux_loss`` / ``z_loss`` after a one-process inference forward: computed
    from that forward's routing (``_pending_losses``) on first read, then stored as a
    plain attribute. A non-data descriptor: any assignment (the training forward's, a
    user's) lands in the instance ``__dict__`` and shadows it, as for any attribute."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, layer: MoELayer | None, owner: type | None = None) -> object:
        if layer is None:
            return self
        layer._resolve_losses()
        return layer.__dict__[self.name]


class MoELayer(nn.Module):
    """A Mixture-of-Experts layer that runs any strategy over one fixed parameter layout.

    Built from the typed configs with ``MoELayer.from_config(ExpertConfig, RouterConfig,
    SharedExpertConfig)``; this keyword form is a convenience that builds those configs
    (``layer_build.configs_from_keywords``). The router keywords ``score_func``,
    ``num_groups``, ``topk_groups``, ``routed_scaling_factor``, ``score_correction_bias``,
    ``batch_prioritized``, ``random_second_expert``, ``top1_gate``, ``gate_noise``
    (applied in training mode only), ``noise_scale``, ``router_type``, ``cosine_dim``,
    ``cosine_temperature`` and ``gate_position`` are the ``RouterConfig`` fields of the
    same names, documented there; ``router_matmul_dtype`` is ``RouterConfig.matmul_dtype``.

    Args:
        d_model: d, the token width.
        d_ff: h, the hidden size of each expert.
        num_experts: E, routed experts.
        top_k: the default k; a forward may pass another.
        glu: gated expert MLP (``gate_up_proj``) instead of a plain one (``up_proj``).
        activation: a name or any parameter-free elementwise callable (``ExpertConfig``).
        bias: expert MLP biases.
        capacity_factor: ``> 0`` fixed factor, ``0`` dropless, ``< 0`` dropless capped at
            ``|f|`` (``RouterConfig.capacity_factor``).
        renormalize: renormalise the k gate weights to sum to 1.
        process_group: the expert group; default the world group if initialised, else
            a single process. Building the layer is collective over the world group.
        ranks_per_node: default ``LOCAL_WORLD_SIZE``, else the group size.
        table: a ``StrategyTable`` or a path to one; None runs the default strategy.
        shared_d_ff: hidden size of an always-on shared expert MLP (0: none).
        shared_gate: scale the shared expert by ``sigmoid(shared_gate(x))`` (Qwen2-MoE).
        buckets: how workloads are bucketed when no table is given (tables carry theirs).
        allow_table_mismatch: use a table measured elsewhere, with a warning.
        explore: re-measure the table's top candidates online (``online.Exploration``).
        inference: when a forward needing no gradient takes the static-shape, sync-free
            inference path and how it dispatches across ranks (``InferenceConfig``).
        compile_experts: ``"inductor"`` (or ``"aot_eager"``, for debugging): on one
            process, a training forward whose strategy runs the ``grouped_mm`` kernel on
            dropless routing runs its grouping, experts, combine and losses as one
            ``torch.compile`` graph (``inference.compiled``): far fewer launches, the same
            function. The first forward per T compiles (seconds). None: eager.
        dtype: of the expert and shared weights (the router's are always fp32).
        device: of the expert, shared and router weights.

    Attributes:
        aux_loss, z_loss: the load-balancing and router z-loss of the last forward (0-dim
            fp32). They hold that forward's autograd graph: after a forward whose loss is
            never back-propagated (an evaluation with gradients enabled), its activations
            stay alive until the next forward replaces them. Evaluate under
            ``torch.no_grad()``. After a one-process inference forward they are
            computed when first read (the same values; nothing is spent on them when
            nobody reads them).
        last_strategy: the ``Strategy`` the last forward ran (None before the first).
        router: the router; ``router.weight`` is ``[E, d_model]`` fp32, replicated on
            every rank.
        experts: this rank's expert weights. GLU: ``gate_up_proj [E_local, 2*d_ff_local,
            d_model]`` (gate rows first); plain FFN: ``up_proj [E_local, d_ff_local,
            d_model]``; both: ``down_proj [E_local, d_model, d_ff_local]``.
        shared: the always-on shared expert MLP, or None.
    """

    aux_loss = _DeferredLoss()
    z_loss = _DeferredLoss()

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int = 2,
        glu: bool = True,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = "silu",
        bias: bool = False,
        capacity_factor: float = 0.0,
        renormalize: bool = True,
        process_group: dist.ProcessGroup | None = None,
        ranks_per_node: int | None = None,
        table: StrategyTable | str | os.PathLike[str] | None = None,
        *,
        score_func: str = "softmax",
        num_groups: int = 1,
        topk_groups: int = 1,
        routed_scaling_factor: float = 1.0,
        score_correction_bias: bool = False,
        batch_prioritized: bool = False,
        random_second_expert: bool = False,
        top1_gate: str = "probability",
        gate_noise: str = "none",
        noise_scale: float | None = None,
        router_type: str = "linear",
        cosine_dim: int = 256,
        cosine_temperature: float = 0.5,
        gate_position: str = "output",
        router_matmul_dtype: str = "float32",
        shared_d_ff: int = 0,
        shared_gate: bool = False,
        buckets: Buckets | None = None,
        allow_table_mismatch: bool = False,
        explore: Exploration | None = None,
        inference: InferenceConfig | None = None,
        compile_experts: CompileBackend | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        # Every argument by its keyword: the builder gives each to the config field of
        # its name, so the signature is the one list of them.
        keywords = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self._build(*configs_from_keywords(keywords))

    @classmethod
    def from_config(
        cls,
        experts: ExpertConfig,
        router: RouterConfig,
        shared: SharedExpertConfig | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
        ranks_per_node: int | None = None,
        table: StrategyTable | str | os.PathLike[str] | None = None,
        buckets: Buckets | None = None,
        allow_table_mismatch: bool = False,
        explore: Exploration | None = None,
        inference: InferenceConfig | None = None,
        compile_experts: CompileBackend | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> MoELayer:
        """The layer of the typed configs (the keyword form builds these same configs):

            MoELayer.from_config(ExpertConfig(1024, 2816, 8), RouterConfig(8, top_k=2))

        The other arguments are the keyword form's. (A subclass's own ``__init__`` is not
        run: subclasses that need one override this too.)"""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        options = BuildOptions(process_group, ranks_per_node, table, buckets,
                               allow_table_mismatch, explore, inference, compile_experts,
                               dtype, device)  # fmt: skip
        layer._build(experts, router, shared, options)
        return layer

    def _build(
        self,
        experts: ExpertConfig,
        router: RouterConfig,
        shared: SharedExpertConfig | None,
        options: BuildOptions,
    ) -> None:
        group = default_group(options.process_group)
        check_layer_agreement(group, experts, router, shared, **options.agreement_arguments())
        device = check_configs(experts, router, shared, options)
        self.expert_cfg, self.router_cfg, self.shared_cfg = experts, router, shared
        parts = build_parts(experts, router, shared, options, device)
        self.layout, self.mesh, self.inference = parts.layout, parts.mesh, parts.inference
        self.router, self.experts = parts.router, parts.experts
        self.shared, self.shared_gate = parts.shared, parts.shared_gate
        # The strategy choice: table, lagged choice, exploration, measured default, replay.
        self.policy = parts.policy
        # The execution paths, each behind the one dispatcher contract.
        self._counted, self._static_path = parts.counted, parts.static_path
        self._device_grouped = parts.device_grouped
        self._stats = StrategyStats()
        self.aux_loss = torch.zeros(())
        self.z_loss = torch.zeros(())
        self._pending_losses: Routing | None = None  # see ``_record_ran``
        self.last_strategy: Strategy | None = None
        self.last_max_tokens = 0
        self.last_router_logits: torch.Tensor | None = None
        if options.table is not None:
            self.use_table(options.table, allow_mismatch=options.allow_table_mismatch)
        # Data parallelism (``integrations.parallelize``): expert gradients are divided by
        # the data-parallel size, which the first forward under DDP (or parallelize) sets.
        self.grad_divisor = 1
        self._grad_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._checked_ddp: set[int] = set()
        self.register_forward_pre_hook(_check_data_parallel)

    # ---- what this layer is -------------------------------------------------------------

    @property
    def executor(self) -> Executor:
        """The training dispatchers of every strategy, which the counted path runs
        through; assignable (a replacement is what the path runs from then on)."""
        return self._counted.executor

    @executor.setter
    def executor(self, value: Executor) -> None:
        self._counted.executor = value

    @property
    def local_experts(self) -> range:
        """Global ids of the experts stored on this rank."""
        return self.layout.local_experts

    @property
    def local_hidden(self) -> slice:
        """The slice of d_ff stored on this rank."""
        return self.layout.local_hidden

    @property
    def _device(self) -> torch.device:
        return self.experts.down_proj.device

    @property
    def _dtype(self) -> torch.dtype:
        """The experts' compute dtype: inside ``torch.autocast`` the autocast dtype (the
        kernels cast x and the weights to it), else the weights'."""
        device = self.experts.down_proj.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return self.experts.down_proj.dtype

    @property
    def _where(self) -> tuple[torch.device, torch.dtype]:
        """(device, dtype) of the expert compute: what the valid strategies depend on."""
        return (self._device, self._dtype)

    @property
    def default_strategy(self) -> Strategy:
        """EP+DP, linear all-to-all, no pipelining, the device's default kernel."""
        return self.policy.default(self._where)

    @property
    def table(self) -> StrategyTable | None:
        """The strategy table in use (``use_table``), or None."""
        return self.policy.table

    @property
    def buckets(self) -> Buckets:
        """How workloads are bucketed when no table is given (the constructor's)."""
        return self.policy.buckets

    @property
    def explore(self) -> Exploration | None:
        """The online exploration of the table's top candidates (the constructor's)."""
        return self.policy.explore

    @property
    def kernel_choice(self) -> KernelChoice:
        """The expert kernels measured per workload key without a table (CUDA only)."""
        return self.policy.kernel_choice

    def strategies(self) -> list[Strategy]:
        """Every valid strategy for this layer on this group and device."""
        return list(self.policy.strategies(self._where))

    def layer_shape(self) -> LayerShape:
        cfg = self.expert_cfg
        return LayerShape(
            d_model=cfg.d_model,
            d_ff=cfg.d_ff,
            num_experts=cfg.num_experts,
            top_k=self.router_cfg.top_k,
            glu=cfg.glu,
            dtype=name_of(self._dtype),
            shards=self.layout.shards,
        )

    def fingerprint(self) -> Fingerprint:
        mesh = self.mesh
        backend = dist.get_backend(mesh.group) if mesh is not None else "none"
        rpn = mesh.ranks_per_node if mesh is not None else 1
        return Fingerprint.current(self.layout.world, rpn, str(backend), self._device)

    # ---- tables and statistics ----------------------------------------------------------

    def use_table(
        self, table: StrategyTable | str | os.PathLike[str], *, allow_mismatch: bool = False
    ) -> None:
        """Look strategies up in ``table`` from now on (checked against this run)."""
        shape, fingerprint = self.layer_shape(), self.fingerprint()
        self.policy.use_table(table, fingerprint, shape, self._where, allow_mismatch=allow_mismatch)

    def reset_stats(self) -> None:
        """Forget the strategy statistics (profiling leaves them as they were)."""
        self._stats = StrategyStats()

    def stats(self) -> dict[Strategy, dict[str, float]]:
        """Per strategy that ran: ``count`` and ``mean_ms`` (forward, dispatch to combine)."""
        return self._stats.report()

    def choose_strategy(self, max_tokens: int) -> Strategy:
        """The strategy the table names for this workload (the default without a table)."""
        return self.policy.lookup(max_tokens, self._where)

    # ---- forward ------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        top_k: int | None = None,
        strategy: Strategy | None = None,
        capacity_factor: float | None = None,
    ) -> torch.Tensor:
        """y = MoE(x); ``top_k`` and ``capacity_factor`` override the layer's for this
        call (Tutel's dynamic top-ANY and dynamic capacity), ``strategy`` forces one.

        route -> choose a strategy -> run it (dispatch -> experts -> combine) -> shared
        experts, on one of three paths: static (no autograd graph recorded: it routes
        and chooses inside, for its CUDA graphs), device-grouped (one process, the lagged
        kernel reads device offsets) or counted (training, any world)."""
        x2 = flat_input(x, self.expert_cfg.d_model, self._device)  # [T, d]
        code, err = call_errors(top_k, capacity_factor, self.router_cfg.num_experts)
        if err is not None and (not self._distributed or self._runs_static(x2)):
            raise err  # the static path has no count exchange to carry it: a local error
        if self._runs_static(x2):
            return self._forward_static(x2, top_k, strategy, capacity_factor).view(x.shape)
        grouped = (
            None if err is not None else self._device_grouped.choose(len(x2), strategy, self._where)
        )
        routing = self.router(x2, top_k, capacity_factor) if err is None else None
        if grouped is not None:
            ran = self._device_grouped.run(
                x2, routing, grouped, self.experts, self._stats, self._where
            )
            self._record_ran(ran)
            return self._add_shared(x2, ran.y).view(x.shape)
        e = self.router_cfg.num_experts
        if routing is not None:
            self.last_router_logits = routing.logits
            kept, demand = routing.kept_counts(e), routing.counts
        else:  # take part in the exchange so that every rank raises, then raise
            kept = demand = torch.zeros(e, dtype=torch.long, device=x.device)
        counts = self._counted.exchange_counts(kept, demand, self._where, code, strategy, err)
        self.aux_loss = balance_loss(routing.scores, counts.demand, counts.demand_total)
        self.z_loss = z_loss(routing.logits)
        call = CountedCall(x2, routing.topk_ids, routing.gates, counts, strategy, self._where,
                           self.experts, self._stats, self._record)  # fmt: skip
        if self.router_cfg.gate_position == "input":
            return self._add_shared(x2, self._counted.run_gated_inputs(call)).view(x.shape)
        return self._add_shared(x2, self._counted.run(call)).view(x.shape)

    def _runs_static(self, x: torch.Tensor) -> bool:
        """The static inference path: no autograd graph is recorded (``InferenceConfig``)."""
        cfg = self.inference
        if cfg.mode == "off" or not cfg.static_dispatch(self.layout.world):
            return False
        if self.router_cfg.gate_position == "input":
            return False  # per-slot scaled inputs run on the dynamic path only
        if not torch.is_grad_enabled():
            return True
        return not x.requires_grad and not any(p.requires_grad for p in self.parameters())

    # Eager under torch.compile (``StaticPath.run`` says why): recording its result
    # touches the instance ``__dict__``, which dynamo would trace.
    @torch.compiler.disable
    def _forward_static(
        self,
        x2: torch.Tensor,
        top_k: int | None,
        strategy: Strategy | None,
        capacity_factor: float | None = None,
    ) -> torch.Tensor:
        """The inference forward (``StaticPath``); its losses deferred on one process."""
        ran = self._static_path.run(StaticCall(
            x2, top_k, capacity_factor, strategy, self._where, self.router, self.experts,
            self._add_shared, self._weight_pointers, self.training,
        ))  # fmt: skip
        self._record_ran(ran)
        return ran.y

    def _record_ran(self, ran: Ran) -> None:
        """The last-forward attributes of a static or device-grouped forward. Losses the
        path deferred (``ran.losses`` None) are computed from its routing when first read
        (``_DeferredLoss``)."""
        self.last_router_logits = ran.routing.logits
        if not ran.recomputed:
            self.last_strategy, self.last_max_tokens = ran.strategy, ran.max_tokens
        if ran.losses is not None:
            self.aux_loss, self.z_loss = ran.losses
            return
        self.__dict__.pop("aux_loss", None)
        self.__dict__.pop("z_loss", None)
        self._pending_losses = ran.routing

    def _weight_pointers(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in itertools.chain(self.parameters(), self.buffers()))

    def _resolve_losses(self) -> None:
        """Compute the losses a one-process inference forward deferred (once)."""
        routing = self.__dict__.get("_pending_losses")
        if routing is None:
            raise AttributeError("MoELayer has no pending losses")
        self._pending_losses = None
        # Read back outside the forward: its autocast / grad mode no longer apply.
        with torch.autocast(routing.scores.device.type, enabled=False), torch.no_grad():
            self.aux_loss, self.z_loss = static_losses(routing, self.router_cfg.num_experts)

    def _add_shared(self, x2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y plus the (gated) shared expert's output, where the layer has one."""
        if self.shared is None:
            return y
        shared = self.shared(x2)
        if self.shared_gate is not None:
            shared = torch.sigmoid(self.shared_gate(x2)) * shared
        return y + shared

    def forward_routed(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        strategy: Strategy | None = None,
    ) -> torch.Tensor:
        """Dispatch -> experts -> combine with a given routing (no router, no shared
        expert): x [T, d], topk_ids [T, k] integer (-1 = dropped), topk_weights [T, k]
        floating. A bad routing on any rank raises the same ValueError on every rank."""
        x2 = flat_input(x, self.expert_cfg.d_model, self._device)  # [T, d]
        e = self.router_cfg.num_experts
        code, err = first_error(*routing_checks(x2.shape[0], e, topk_ids, topk_weights))
        if err is not None and not self._distributed:
            raise err
        if err is None:
            kept = expert_counts(topk_ids.long(), e)
        else:  # take part in the exchange so that every rank raises, then raise
            kept = torch.zeros(e, dtype=torch.long, device=x.device)
        counts = self._counted.exchange_counts(kept, kept, self._where, code, strategy, err)
        call = CountedCall(x2, topk_ids.long(), topk_weights.float(), counts, strategy,
                           self._where, self.experts, self._stats, self._record)  # fmt: skip
        return self._counted.run(call).view(x.shape)

    @property
    def _distributed(self) -> bool:
        return self.mesh is not None and self.mesh.world > 1

    def _record(self, strategy: Strategy | None, max_tokens: int) -> None:
        """The counted path's ``last_*`` (strategy None: the last one stays)."""
        self.last_max_tokens = max_tokens
        if strategy is not None:
            self.last_strategy = strategy

    # ---- weights ------------------------------------------------------------------------

    def load_expert_weights(
        self, weights: Mapping[str, torch.Tensor] | None = None, /, **full: torch.Tensor
    ) -> None:
        """Load full ``[E, ...]`` expert tensors (``gate_up_proj``/``up_proj``,
        ``down_proj`` and their ``_bias``), given as keywords or as one mapping; this rank
        keeps its shard."""
        if weights is not None:
            if not isinstance(weights, Mapping):
                raise ValueError(
                    "load_expert_weights takes a mapping of name -> full [E, ...] tensor or "
                    f"keyword tensors (gate_up_proj=..., down_proj=...), got "
                    f"{type(weights).__name__}"
                )
            full = {**weights, **full}
        self.experts.load_full(full)

    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients this layer reduces itself (skip them in DP all-reduce)."""
        return list(self.experts.parameters())

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Router and shared-expert parameters: identical on every rank; all-reduce their
        gradients over the data-parallel group as for any dense parameter."""
        expert_ids = {id(p) for p in self.experts.parameters()}
        return [p for p in self.parameters() if id(p) not in expert_ids]

    # ---- profiling hook (non-public: ``profiling.profiler`` only) -------------------------

    def _profiling_routing(
        self, replace: Callable[[Routing], Routing]
    ) -> AbstractContextManager[None]:
        """``layer_hooks.profiling_routing`` on this layer (this name: older callers')."""
        return profiling_routing(self, replace)

    # ---- data parallelism, copies, dtype conversion ------------------------------------

    def set_grad_divisor(self, divisor: int) -> None:
        """Divide every expert gradient by ``divisor`` from now on (1: no division).

        Under data parallelism each rank's loss is the mean over its own batch, and DDP
        (or FSDP2) divides the dense gradients it all-reduces by the data-parallel size
        n. An expert gradient instead arrives summed over the n ranks whose tokens the
        expert served, so it needs the same 1/n. The division runs in a hook on each
        expert parameter's incoming gradient -- once per backward, before accumulation --
        so gradient accumulation over micro-batches (DDP's ``no_sync``) is scaled right.
        Set automatically by the first forward under ``DistributedDataParallel`` and by
        ``adaptive_moe.parallelize``."""
        if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
            raise ValueError(f"divisor must be a positive integer, got {divisor!r}")
        self.grad_divisor = divisor
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []
        if divisor > 1:
            me = weakref.ref(self)
            for p in self.experts.parameters():
                self._grad_hooks.append(p.register_hook(lambda g, me=me: divide_grad(g, me)))

    def __deepcopy__(self, memo: dict[int, object]) -> MoELayer:
        """A copy with its own weights (EMA, evaluation copies), at any time.

        Shared, not copied: the process groups and mesh, the executor (references only),
        the strategy table. The last forward's losses and logits are copied detached
        (their autograd graph belongs to the original's pending backward); the copy
        starts with empty strategy statistics."""
        if self._pending_losses is not None:
            self._resolve_losses()  # the copy gets values, not the routing behind them
        for shared in (self.mesh, self.executor, self.policy.table, self.experts.device_mesh):
            if shared is not None:
                memo[id(shared)] = shared
        for name in ("aux_loss", "z_loss", "last_router_logits"):
            value = self.__dict__.get(name)
            if isinstance(value, torch.Tensor):
                memo[id(value)] = value.detach().clone()
        memo[id(self._stats)] = StrategyStats()
        memo[id(self._grad_hooks)] = []
        new = MoELayer.__new__(MoELayer)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        # nn.Parameter.__deepcopy__ keeps neither attributes nor hooks.
        for p in new.experts.parameters():
            mark_expert(p)
        new.set_grad_divisor(self.grad_divisor)
        return new

    def _apply(self, fn: object, recurse: bool = True) -> MoELayer:
        """``.to()``, ``.half()``, ``.cuda()``...: the router keeps fp32 weights (it
        scores in fp32 whatever the model dtype) and follows only device moves."""
        if not recurse:
            return super()._apply(fn, recurse)

        def device_only(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.is_floating_point() and out.dtype != t.dtype:
                return t.to(device=out.device)
            return out

        for name, child in self.named_children():
            child._apply(device_only if name == "router" else fn)
        super()._apply(fn, recurse=False)
        self.policy.forget_devices()
        return self

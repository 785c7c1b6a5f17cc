"""How an ``MoELayer`` is built: the keyword form's typed configs, the construction
options and their checks, and the parts the layer is composed of.

    keywords    MoELayer(d_model, d_ff, num_experts, top_k, ..., router_type=...)
        -> ExpertConfig, RouterConfig, SharedExpertConfig | None, BuildOptions
                                                        (``configs_from_keywords``)
    configs, options
        -> LayerParts: the shard layout, the mesh, the router, the experts, the shared
           expert and its gate, the strategy policy and the three execution paths
                                                        (``build_parts``)

Building is collective over the expert group: the layer runs ``check_layer_agreement``
first, then ``build_parts`` builds the mesh's subgroups.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from adaptive_moe.comm import Mesh, build_mesh, default_group
from adaptive_moe.core.checks import int_at_least
from adaptive_moe.core.config import (
    COMPILE_BACKENDS,
    CompileBackend,
    ExpertConfig,
    RouterConfig,
    SharedExpertConfig,
)
from adaptive_moe.core.dtypes import name_of
from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.runtime.dispatch.counted import CountedPath
from adaptive_moe.runtime.dispatch.executor import Executor
from adaptive_moe.runtime.experts.shared import SharedMLP
from adaptive_moe.runtime.experts.stacked import Experts
from adaptive_moe.runtime.inference.compiled import CompiledExperts
from adaptive_moe.runtime.inference.config import InferenceConfig
from adaptive_moe.runtime.inference.device_grouped import DeviceGroupedPath
from adaptive_moe.runtime.inference.static import StaticDispatcher
from adaptive_moe.runtime.inference.static_path import StaticPath
from adaptive_moe.runtime.layer_args import check_device
from adaptive_moe.runtime.layer_hooks import check_expert_bytes
from adaptive_moe.runtime.policy.policy import StrategyPolicy
from adaptive_moe.runtime.routing.router import Router
from adaptive_moe.tuning.online import Exploration
from adaptive_moe.tuning.table import StrategyTable
from adaptive_moe.tuning.workload import Buckets

# The keyword form's names of RouterConfig fields, where they differ from the field's.
_ROUTER_KEYWORDS = {"matmul_dtype": "router_matmul_dtype"}
# Keywords that build the SharedExpertConfig (checked here: it has no "none" value).
_SHARED_KEYWORDS = ("shared_d_ff", "shared_gate")


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """The construction arguments that are not a config (both forms of ``MoELayer``).

    Attributes:
        process_group: the expert group; None: the world group if initialised, else a
            single process.
        ranks_per_node: None: ``LOCAL_WORLD_SIZE``, else the group size.
        table: a ``StrategyTable`` or a path to one; None runs the default strategy.
        buckets: how workloads are bucketed when no table is given.
        allow_table_mismatch: use a table measured elsewhere, with a warning.
        explore: online re-measurement of the table's top candidates, or None.
        inference: the inference path's config; None: ``InferenceConfig()``.
        compile_experts: a ``torch.compile`` backend for the one-process training
            forward's ``grouped_mm`` experts (``CompiledExperts``), or None: eager.
        dtype: of the expert and shared weights (the router's are always fp32).
        device: of the expert, shared and router weights.
    """

    process_group: dist.ProcessGroup | None = None
    ranks_per_node: int | None = None
    table: StrategyTable | str | os.PathLike[str] | None = None
    buckets: Buckets | None = None
    allow_table_mismatch: bool = False
    explore: Exploration | None = None
    inference: InferenceConfig | None = None
    compile_experts: CompileBackend | None = None
    dtype: torch.dtype | None = None
    device: torch.device | str | None = None

    def agreement_arguments(self) -> dict[str, object]:
        """The options every rank of the group must pass alike (``check_layer_agreement``:
        all but the group itself)."""
        fields = dataclasses.fields(self)
        return {f.name: getattr(self, f.name) for f in fields if f.name != "process_group"}


def configs_from_keywords(
    keywords: Mapping[str, object],
) -> tuple[ExpertConfig, RouterConfig, SharedExpertConfig | None, BuildOptions]:
    """The configs and options of ``MoELayer``'s keyword form, ``keywords`` being every
    argument by its keyword name: each config field takes the keyword of its name
    (``RouterConfig.matmul_dtype``: ``router_matmul_dtype``), and the shared expert is
    built from ``shared_d_ff`` / ``shared_gate``."""
    used = set(_SHARED_KEYWORDS)

    def fields_of(cls: type, renamed: Mapping[str, str]) -> dict[str, object]:
        names = {f.name: renamed.get(f.name, f.name) for f in dataclasses.fields(cls)}
        used.update(names.values())
        return {field: keywords[keyword] for field, keyword in names.items()}

    experts = ExpertConfig(**fields_of(ExpertConfig, {}))
    router = RouterConfig(**fields_of(RouterConfig, _ROUTER_KEYWORDS))
    shared_d_ff, shared_gate = (keywords[name] for name in _SHARED_KEYWORDS)
    int_at_least("shared_d_ff", shared_d_ff, 0)
    if shared_gate and not shared_d_ff:
        raise ValueError("shared_gate=True needs a shared expert (shared_d_ff > 0)")
    shared = SharedExpertConfig(shared_d_ff, gated=shared_gate) if shared_d_ff else None
    options = BuildOptions(**fields_of(BuildOptions, {}))
    unmapped = sorted(set(keywords) - used)
    if unmapped:  # a keyword added to the signature without a field to build
        raise TypeError(f"MoELayer keywords that build nothing: {unmapped}")
    return experts, router, shared, options


def check_configs(
    experts: object, router: object, shared: object, options: BuildOptions
) -> torch.device | None:
    """ValueError for configs of the wrong type or that disagree, an inference config of
    the wrong type, an unsupported dtype or a device this machine lacks; else the
    device, as a torch.device (or None)."""
    for name, cfg, kind in (("experts", experts, ExpertConfig), ("router", router, RouterConfig)):
        if not isinstance(cfg, kind):
            raise ValueError(f"{name} must be of type {kind.__name__}, got {type(cfg).__name__}")
    if shared is not None and not isinstance(shared, SharedExpertConfig):
        raise ValueError(f"shared must be a SharedExpertConfig or None, got {shared!r}")
    if router.num_experts != experts.num_experts:
        raise ValueError(
            f"router.num_experts={router.num_experts} must equal "
            f"experts.num_experts={experts.num_experts}"
        )
    inference = options.inference
    if inference is not None and not isinstance(inference, InferenceConfig):
        raise ValueError(f"inference must be an InferenceConfig or None, got {inference!r}")
    if options.compile_experts is not None and options.compile_experts not in COMPILE_BACKENDS:
        raise ValueError(
            f"compile_experts must be one of {COMPILE_BACKENDS} or None, "
            f"got {options.compile_experts!r}"
        )
    if options.dtype is not None:
        name_of(options.dtype)  # ValueError for an unsupported dtype
    return check_device(options.device)


@dataclasses.dataclass(frozen=True)
class LayerParts:
    """What ``build_parts`` builds; the layer keeps each part under the same name.

    Attributes:
        layout: the fixed shard layout of this rank.
        mesh: the expert group's mesh, or None for one process.
        router: the router (fp32 weights ``[E, d_model]``, replicated).
        experts: this rank's stacked expert weights.
        shared: the always-on shared expert MLP, or None.
        shared_gate: its sigmoid gate ``Linear(d_model, 1)``, or None.
        inference: the inference path's config (the default where none was given).
        policy: the strategy choice, shared by the three paths.
        counted: the training path on host counts, any world.
        static_path: the inference path (no autograd graph recorded).
        device_grouped: the one-process training path with no host sync.
    """

    layout: ShardLayout
    mesh: Mesh | None
    router: Router
    experts: Experts
    shared: SharedMLP | None
    shared_gate: nn.Linear | None
    inference: InferenceConfig
    policy: StrategyPolicy
    counted: CountedPath
    static_path: StaticPath
    device_grouped: DeviceGroupedPath


def build_parts(
    experts: ExpertConfig,
    router: RouterConfig,
    shared: SharedExpertConfig | None,
    options: BuildOptions,
    device: torch.device | None,
) -> LayerParts:
    """The layer's parts on this rank (collective: the mesh's subgroups). ``device``:
    ``options.device`` as ``check_configs`` returned it."""
    dtype, d_model = options.dtype, experts.d_model
    group = default_group(options.process_group)
    world = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    layout = ShardLayout(world, rank, experts.num_experts, experts.d_ff)
    check_expert_bytes(experts, world, dtype, device)
    mesh = build_mesh(group, options.ranks_per_node, layout.shards) if group is not None else None
    kw = {"dtype": dtype, "device": device}
    gated = shared is not None and shared.gated
    # The modules in this order: it is the order their initial weights draw from the RNG.
    router_module = Router(d_model, router, device=device)
    expert_module = Experts(experts, layout, dtype=dtype, device=device, process_group=group)
    shared_mlp = SharedMLP(d_model, shared, experts.activation, **kw) if shared else None
    shared_gate = nn.Linear(d_model, 1, bias=False, **kw) if gated else None
    inference = options.inference or InferenceConfig()
    executor = Executor(experts, layout, mesh)
    static = StaticDispatcher(experts, layout, mesh, inference.tokens_per_rank)
    policy = StrategyPolicy(experts, layout, mesh, buckets=options.buckets, explore=options.explore)
    distributed = mesh is not None and mesh.world > 1
    # Not across ranks (the all-to-all splits need host counts), nor with gated inputs
    # (per-slot scaled rows run on the counted path only).
    grouped_on_device = not (distributed or router.gate_position == "input")
    backend = options.compile_experts
    compiled = CompiledExperts(experts, backend) if backend and grouped_on_device else None
    return LayerParts(
        layout=layout, mesh=mesh, router=router_module, experts=expert_module,
        shared=shared_mlp, shared_gate=shared_gate, inference=inference, policy=policy,
        counted=CountedPath(experts, layout, mesh, executor, policy),
        static_path=StaticPath(static, policy, inference, experts.num_experts, distributed),
        device_grouped=DeviceGroupedPath(
            static, policy, experts.num_experts, grouped_on_device, compiled
        ),
    )  # fmt: skip

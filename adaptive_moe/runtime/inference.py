"""Decode-time inference: a forward with static shapes and no device-to-host sync.

The training forward copies the per-expert counts to the host once per call (they size
the all-to-all splits and the grouped buffers). That sync, and every allocation sized by
the routing, keeps a forward out of a CUDA graph and costs a round trip per layer at
decode sizes. When no gradient is needed the layer runs this path instead:

    route       the router on the device (its counts are scatter-adds, ``expert_counts``)
    dispatch    W = 1: nothing. W > 1: all-gather the tokens and their expert ids over
                the expert group (every rank pads to the same T_pad rows first)
    group       every one of the N = W * T_pad * k slots is sorted by local expert on the
                device; ``offsets`` [E_l + 1] stay on the device, slots of experts stored
                elsewhere (and dropped slots) sort last and are never computed
    experts     the Triton kernels (``scatter`` or the small-batch ``gemv``) read offsets
                from device memory and launch a grid sized by the upper bound of tiles
    combine     W > 1: reduce-scatter the slot outputs (each slot is computed by the ranks
                storing its expert: one rank, or the s ranks of a sliced expert whose
                partial outputs the sum adds); then the gated sum of each token's k slots

Shapes (notation in ``core.config``):
    x          [T, d]              this rank's tokens
    x_all      [W * T_pad, d]      gathered tokens (rank r's rows at r * T_pad)
    ids_all    [W * T_pad, k]      gathered global expert ids, -1 = dropped or padding
    y_all      [W * T_pad * k, d]  slot outputs of this rank's experts, 0 elsewhere
    y_slots    [T_pad * k, d]      this rank's slots, summed over the group
    y          [T, d]

Every shape is a function of (T, k, W, T_pad) alone, so one forward can be captured with
``torch.cuda.CUDAGraph`` and replayed on new tokens. Capacity modes work unchanged: the
capacity is computed from T on the host. The kernels ``loop``, ``bmm`` and
``grouped_mm`` need host counts for their shapes; on CPU (and if a table picks them on
GPU) this path copies the counts once, like the training forward.

Weights are never moved: each rank computes only with the shard it stores (the layout's
expert slicing, E < W, included), unlike the r = 0 strategy that gathers weights.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from adaptive_moe.comm import all_gather_rows, reduce_scatter_rows
from adaptive_moe.comm.order import CollectiveOrder
from adaptive_moe.core.strategy import Strategy
from adaptive_moe.runtime.dispatcher import Counts, Dispatcher
from adaptive_moe.runtime.experts import Experts
from adaptive_moe.runtime.grouping import ExpertRows
from adaptive_moe.runtime.kernels import (
    _TRITON_DTYPES,
    ActivationFn,
    _autocast_inputs,
    _check_grouped_mm,
    _mlp_grouped_mm,
    _scatter_mlp,
    _triton_usable,
    activation_torch,
    combine_slots,
    expert_mlp,
)
from csrc_triton._common import dot_precision

Mode = Literal["auto", "off"]
Dispatch = Literal["auto", "gather", "exchange"]
MODES: tuple[str, ...] = ("auto", "off")
DISPATCHES: tuple[str, ...] = ("auto", "gather", "exchange")
# Kernels that read the grouping offsets from device memory (no host counts).
DEVICE_OFFSET_KERNELS: tuple[str, ...] = ("scatter", "gemv")
# ... and those that need no host count when every slot is routed (``StaticRows.complete``).
COMPLETE_ROWS_KERNELS: tuple[str, ...] = (*DEVICE_OFFSET_KERNELS, "grouped_mm")
# Up to this many rows per expert on average the small-batch kernel is the default.
SMALL_BATCH_ROWS = 16


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """When and how the layer runs its inference path.

    Attributes:
        mode: ``"auto"``: whenever the forward records no autograd graph (under
            ``torch.no_grad()`` / ``torch.inference_mode()``, or when neither the input
            nor any parameter requires a gradient); ``"off"``: always the training path.
        dispatch: across ranks, ``"gather"``: the static token all-gather + local
            experts + reduce-scatter of this module (no host sync); ``"exchange"``: the
            training path's variable-split all-to-all (one host sync per forward);
            ``"auto"``: gather when the group has one rank or ``tokens_per_rank`` is
            set, else exchange (gather needs every rank to pass the same T).
        tokens_per_rank: T_pad, the fixed number of rows every rank contributes to the
            gather (its tokens, padded): ranks may then pass different T <= T_pad.
            None: every rank must pass the same T.
        cuda_graph_tokens: 0 (default): off. N > 0: on one process on CUDA, in eval
            mode, the layer captures its inference forward for each T <= N as a CUDA
            graph (``GraphCache``: the second call at a given (T, dtype, top_k,
            capacity, strategy) captures, later calls replay) and returns a copy of the
            graph's output. Never inside the caller's own capture, under autocast, or
            with hooks on the router; captured graphs are dropped when a weight tensor
            is replaced (``.to()``, a new ``Parameter``). ``last_router_logits`` is then
            the graph's buffer, overwritten by the next replay at the same T.
    """

    mode: Mode = "auto"
    dispatch: Dispatch = "auto"
    tokens_per_rank: int | None = None
    cuda_graph_tokens: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"InferenceConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.dispatch not in DISPATCHES:
            raise ValueError(
                f"InferenceConfig.dispatch must be one of {DISPATCHES}, got {self.dispatch!r}"
            )
        t = self.tokens_per_rank
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(
                f"InferenceConfig.tokens_per_rank must be a positive integer or None, got {t!r}"
            )
        g = self.cuda_graph_tokens
        if isinstance(g, bool) or not isinstance(g, int) or g < 0:
            raise ValueError(
                f"InferenceConfig.cuda_graph_tokens must be an integer >= 0 (0: off), got {g!r}"
            )

    def static_dispatch(self, world: int) -> bool:
        """Whether a group of ``world`` ranks runs the static gather path."""
        if world == 1 or self.dispatch == "gather":
            return True
        return self.dispatch == "auto" and self.tokens_per_rank is not None


# ---------------------------------------------------------------- grouping on the device


@dataclasses.dataclass(frozen=True)
class StaticRows:
    """Every slot grouped by local expert, with device offsets (no host counts).

    Attributes:
        sorted_slots: [N] int64, all N slots: expert 0's first (stable), then expert 1's,
            ...; slots of no local expert last (past ``offsets[-1]``).
        offsets: [E_l + 1] int64 on the device: expert e owns positions
            [offsets[e], offsets[e + 1]).
        fan_out: slots per input row.
        complete: True when the caller knows every slot has a local expert (one process,
            nothing dropped): slot-space outputs are then fully written by the kernels.
    """

    sorted_slots: Tensor
    offsets: Tensor
    fan_out: int
    complete: bool = False

    @property
    def num_slots(self) -> int:
        return int(self.sorted_slots.numel())

    @property
    def covers_all_slots(self) -> bool:
        """Whether every slot is known to be routed here (``complete``): then no
        slot-space output needs zeroing first."""
        return self.complete

    @property
    def num_experts(self) -> int:
        return int(self.offsets.numel()) - 1

    def to_expert_rows(self) -> ExpertRows:
        """The host-count form the ``loop`` / ``bmm`` / ``grouped_mm`` kernels need (one
        device-to-host copy of the offsets)."""
        bounds = self.offsets.tolist()
        counts = tuple(b - a for a, b in itertools.pairwise(bounds))
        return ExpertRows(
            sorted_slots=self.sorted_slots[: bounds[-1]],
            offsets=self.offsets,
            counts=counts,
            fan_out=self.fan_out,
            num_slots=self.num_slots,
        )


def group_static(
    expert_of_slot: Tensor,
    num_experts: int,
    fan_out: int,
    complete: bool = False,
    *,
    bounds: Tensor | None = None,
) -> StaticRows:
    """Group slots by expert on the device. ``expert_of_slot`` [N] int, -1 = not here
    (``complete``: the caller knows there is no -1, so nothing is moved last).
    ``bounds``: ``arange(num_experts + 1)`` int64 on the slots' device, if the caller
    keeps one (saves a fill per call)."""
    if expert_of_slot.dim() != 1:
        raise ValueError(f"expert_of_slot must be 1-D, got shape {tuple(expert_of_slot.shape)}")
    keys = expert_of_slot.long()
    if not complete:
        keys = keys.remainder(num_experts + 1)  # -1 -> E: unrouted slots sort last  [N]
    sorted_keys, order = torch.sort(keys, stable=True)  # [N] each
    # offsets[e] = first position whose expert is >= e: the cumulative counts, no count op.
    if bounds is None:
        bounds = torch.arange(num_experts + 1, device=keys.device)
    offsets = torch.searchsorted(sorted_keys, bounds)  # [E_l + 1] int64
    return StaticRows(order, offsets, fan_out, complete)


# ---------------------------------------------------------------- expert compute


def static_expert_mlp(
    x: Tensor,
    rows: StaticRows,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    *,
    glu: bool,
    activation: ActivationFn,
    kernel: str,
    launch_configs: dict | None = None,
) -> Tensor:
    """Slot outputs y [N, d] of every grouped slot, 0 for slots past ``offsets[-1]``.

    ``scatter`` / ``gemv`` (where Triton runs) read the offsets on the device over
    fixed-size buffers, and so does ``grouped_mm`` when every slot is routed
    (``rows.complete``: its buffer is sized by a bound, and no slot-space output needs a
    zero fill); any other case runs through ``expert_mlp`` with host counts.
    ``launch_configs``: a dict the caller keeps, in which ``gemv`` remembers the
    autotuner's choice per problem and then launches it directly
    (``csrc_triton.gemv.launch_gemv``)."""
    x, w1, b1, w2 = _autocast_inputs(x, w1, b1, w2)  # as every matmul under autocast
    _check_mlp_inputs(x, w1, w2)
    if kernel == "grouped_mm" and rows.complete:
        _check_grouped_mm(x, w1, w2, w2.shape[2], w1.shape[0])
        with torch.autocast(x.device.type, enabled=False):
            return _mlp_grouped_mm(x, rows, w1, b1, w2, glu, activation)
    if kernel not in DEVICE_OFFSET_KERNELS or not _triton_usable(x.device, x.dtype):
        return expert_mlp(
            x, rows.to_expert_rows(), w1, b1, w2, glu=glu, activation=activation, kernel=kernel
        )
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2)):
        # One-process training without host counts (MoELayer's device-grouped forward).
        return _scatter_mlp(x, rows, w1, b1, w2, glu, activation, small=kernel == "gemv")
    n, slots, offsets = rows.num_slots, rows.sorted_slots, rows.offsets
    tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    if kernel == "gemv":
        # The layer's own tensors, consistent by construction: the unchecked launcher
        # (the checked ``grouped_gemv`` would validate the same arguments every call).
        from csrc_triton.gemv import launch_gemv

        precision = dot_precision(x.dtype, tf32)

        def gemm(a: Tensor, w: Tensor, b: Tensor | None, grouped: bool, out: Tensor | None):
            return launch_gemv(
                a, w, b, slots, offsets, out=out, fan_out=rows.fan_out, num_slots=n,
                x_grouped=grouped, y_grouped=not grouped, precision=precision,
                configs=launch_configs,
            )  # fmt: skip
    else:
        from csrc_triton.scatter_gemm import scatter_gemm

        def gemm(a: Tensor, w: Tensor, b: Tensor | None, grouped: bool, out: Tensor | None):
            return scatter_gemm(
                a, w, b, slots, offsets, fan_out=rows.fan_out, num_slots=n,
                x_grouped=grouped, y_grouped=not grouped, allow_tf32=tf32, out=out,
            )  # fmt: skip

    # hcat [N, 2h or h] grouped: rows past offsets[-1] are never written nor read again.
    hcat = gemm(x, w1, b1, False, None)
    a = _activation(hcat, glu, activation)  # [N, h]
    fill = torch.empty if rows.complete else torch.zeros  # unrouted slots stay 0
    y = fill((n, w2.shape[1]), dtype=x.dtype, device=x.device)  # [N, d]
    return gemm(a, w2, None, True, y)


def _activation(hcat: Tensor, glu: bool, activation: ActivationFn) -> Tensor:
    """[M, h] of hcat [M, 2h or h]: the Triton kernel for a named activation, torch for
    a callable one (``ExpertConfig``)."""
    if isinstance(activation, str):
        from csrc_triton.elementwise import launch_activation

        return launch_activation(hcat, glu=glu, activation=activation)
    return activation_torch(hcat, glu=glu, activation=activation)


def combine_static(y_slots: Tensor, gates: Tensor) -> Tensor:
    """``kernels.combine_slots``, without its autograd node when no gradient is recorded:
    y [T, d] of y_slots [T*k, d] and gates [T, k] (shapes are the layer's)."""
    recording = torch.is_grad_enabled() and (y_slots.requires_grad or gates.requires_grad)
    triton = _triton_usable(y_slots.device, y_slots.dtype) and gates.dtype in _TRITON_DTYPES
    if triton and not recording:
        from csrc_triton.elementwise import launch_combine

        return launch_combine(y_slots, gates)
    return combine_slots(y_slots, gates)


def _check_mlp_inputs(x: Tensor, w1: Tensor, w2: Tensor) -> None:
    if w1.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(
            f"x is {x.dtype} but the expert weights are {w1.dtype}; "
            "cast the input (or the layer) to one dtype"
        )


# ---------------------------------------------------------------- losses


def balance_loss_static(scores: Tensor, demand: Tensor) -> Tensor:
    """``E * sum_e f_e * P_e`` as ``router.balance_loss``, with the total number of slots
    summed on the device (padding rows are not slots, so it is not known on the host)."""
    if scores.shape[0] == 0:
        return scores.sum() * 0.0
    f = demand.to(scores.dtype) / demand.sum().clamp(min=1).to(scores.dtype)  # [E]
    return scores.shape[1] * torch.sum(f * scores.mean(dim=0))


# ---------------------------------------------------------------- the dispatcher


@dataclasses.dataclass(frozen=True)
class StaticPlan:
    """Host-side shapes of one static forward (nothing here depends on the routing).

    Attributes:
        tokens: T, this rank's tokens.
        padded: T_pad >= T, rows every rank contributes.
        topk_ids: [T_pad, k] this rank's expert ids, -1 on padding rows.
        kernel: the expert-compute variant.
        complete: every slot is routed to a local expert (one process, nothing dropped,
            no padding): see ``StaticRows.complete``.
    """

    tokens: int
    padded: int
    topk_ids: Tensor
    kernel: str
    complete: bool = False


@dataclasses.dataclass(frozen=True)
class StaticDispatched:
    """x_all [W * T_pad, d], ids_all [W * T_pad, k] and the local weights."""

    x_all: Tensor
    ids_all: Tensor
    experts: Experts


@dataclasses.dataclass(frozen=True)
class StaticComputed:
    """y_all [W * T_pad * k, d] and the local weights (for the down-projection bias)."""

    y_all: Tensor
    experts: Experts


@dataclasses.dataclass
class StaticDispatcher(Dispatcher[StaticPlan, StaticDispatched, StaticComputed]):
    """The static-shape family (module docstring): token all-gather, local experts,
    reduce-scatter; on one process just the device-side grouping and the kernels.

    ``tokens_per_rank``: T_pad (see ``InferenceConfig``); None: every rank's T."""

    tokens_per_rank: int | None = None
    # arange(E_l + 1) per device, the searchsorted bounds of the grouping (read only).
    _bounds: dict[torch.device, Tensor] = dataclasses.field(
        default_factory=dict, repr=False, compare=False
    )
    # The gemv launch configs the autotuner chose, per problem (``launch_gemv``).
    _launch_configs: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def bounds(self, device: torch.device) -> Tensor:
        """[E_l + 1] int64 ``arange`` on ``device``, made once per device. Not kept when
        made during a CUDA-graph capture: it would live in that graph's memory pool."""
        b = self._bounds.get(device)
        if b is None:
            b = torch.arange(self.layout.experts_per_rank + 1, device=device)
            if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
                self._bounds[device] = b
        return b

    def forward_local(
        self,
        x: Tensor,
        topk_ids: Tensor,
        gates: Tensor,
        kernel: str,
        experts: Experts,
        *,
        complete: bool,
    ) -> Tensor:
        """y [T, d] on one process: group -> experts -> combine, nothing exchanged and no
        per-phase objects (what ``forward`` computes when the group has one rank).
        ``complete``: no id of topk_ids [T, k] is -1 (no capacity drop), so the
        grouping moves nothing last and the slot outputs need no zero fill."""
        k = topk_ids.shape[1]
        num_experts = self.layout.experts_per_rank
        rows = group_static(
            topk_ids.reshape(-1), num_experts, k, complete,
            bounds=self.bounds(topk_ids.device),
        )  # fmt: skip
        cfg = self.cfg
        # y_slots [T * k, d]
        y_slots = static_expert_mlp(
            x, rows, experts.w1, experts.b1, experts.down_proj, glu=cfg.glu,
            activation=cfg.activation, kernel=kernel, launch_configs=self._launch_configs,
        )  # fmt: skip
        y = combine_static(y_slots, gates)  # [T, d]
        b2 = experts.down_proj_bias
        if b2 is None:
            return y
        return y + _bias_sum(b2.reshape(num_experts, cfg.d_model), topk_ids, gates, y.dtype)

    @property
    def _group(self) -> object:
        if self.mesh is None or self.mesh.world == 1:
            return None
        return self.mesh.group

    def padded_tokens(self, num_tokens: int) -> int:
        """T_pad for a rank passing ``num_tokens`` tokens."""
        pad = self.tokens_per_rank
        if pad is None or self._group is None:
            return num_tokens
        if num_tokens > pad:
            raise ValueError(
                f"x has {num_tokens} tokens but InferenceConfig.tokens_per_rank={pad}: "
                "raise tokens_per_rank or split the batch"
            )
        return pad

    def exchange_counts(
        self, kept: Tensor, demand: Tensor, *, num_tokens: int | None = None
    ) -> Counts:
        """Phase 1 without a host sync: ``demand`` [E] is summed over the group on the
        device (one all-reduce); ``kept`` is not needed. ``num_tokens`` (this rank's T) is
        required: ``max_tokens`` is its static bound W * T_pad (a token picks an expert at
        most once) and ``demand_total`` the same bound, since the true total is only on
        the device (``balance_loss_static`` normalises there)."""
        del kept  # the static family plans from shapes, not counts
        if num_tokens is None:
            raise ValueError("StaticDispatcher.exchange_counts needs num_tokens (this rank's T)")
        group = self._group
        demand = demand.long().clone()
        if group is not None:
            torch.distributed.all_reduce(demand, group=group)
        world = 1 if group is None else self.mesh.world
        bound = world * self.padded_tokens(num_tokens)
        return Counts(kept=None, max_tokens=bound, demand=demand, demand_total=bound)

    def plan(
        self, topk_ids: Tensor, counts: Counts, strategy: Strategy, *, complete: bool = False
    ) -> StaticPlan:
        """``complete``: the caller knows no slot is dropped (see ``StaticPlan``); it
        holds only on one process without padding."""
        t = topk_ids.shape[0]
        padded = self.padded_tokens(t)
        if padded > t:
            pad = topk_ids.new_full((padded - t, topk_ids.shape[1]), -1)
            topk_ids = torch.cat([topk_ids, pad])  # [T_pad, k]
        complete = complete and padded == t and self.layout.experts_per_rank == self.cfg.num_experts
        return StaticPlan(t, padded, topk_ids, strategy.kernel, complete)

    def forward(
        self,
        x: Tensor,
        topk_ids: Tensor,
        gates: Tensor,
        counts: Counts,
        strategy: Strategy,
        experts: Experts,
        *,
        complete: bool = False,
    ) -> Tensor:
        """The contract's forward, passing ``complete`` to ``plan``."""
        order = CollectiveOrder(x.device)
        plan = self.plan(topk_ids, counts, strategy, complete=complete)
        computed = self.experts(self.dispatch(x, plan, experts, order), plan, order)
        return self.combine(computed, plan, gates, order)

    def dispatch(
        self, x: Tensor, plan: StaticPlan, experts: Experts, order: CollectiveOrder
    ) -> StaticDispatched:
        if plan.padded > plan.tokens:
            x = torch.cat([x, x.new_zeros(plan.padded - plan.tokens, x.shape[1])])  # [T_pad, d]
        group = self._group
        x_all = all_gather_rows(x, group)  # [W * T_pad, d]
        ids_all = all_gather_rows(plan.topk_ids, group)  # [W * T_pad, k]
        return StaticDispatched(x_all, ids_all, experts)

    def experts(
        self, dispatched: StaticDispatched, plan: StaticPlan, order: CollectiveOrder
    ) -> StaticComputed:
        """y_all [W * T_pad * k, d]: this rank's experts' (partial) slot outputs."""
        ids = dispatched.ids_all.flatten()  # [N]
        lay = self.layout
        first = lay.local_experts.start
        if lay.experts_per_rank < self.cfg.num_experts:  # some experts live elsewhere
            local = ids - first
            mine = (ids >= first) & (local < lay.experts_per_rank)
            ids = torch.where(mine, local, torch.full_like(local, -1))
        rows = group_static(ids, lay.experts_per_rank, dispatched.ids_all.shape[1], plan.complete)
        ex = dispatched.experts
        x = dispatched.x_all
        cfg = self.cfg
        y_all = static_expert_mlp(
            x, rows, ex.w1, ex.b1, ex.down_proj,
            glu=cfg.glu, activation=cfg.activation, kernel=plan.kernel,
            launch_configs=self._launch_configs,
        )  # fmt: skip
        return StaticComputed(y_all, ex)

    def combine(
        self, computed: StaticComputed, plan: StaticPlan, gates: Tensor, order: CollectiveOrder
    ) -> Tensor:
        """Phase 5: y [T, d] from y_all (reduce-scatter, gated sum, down-projection bias)."""
        k = gates.shape[1]
        y_slots = reduce_scatter_rows(computed.y_all, self._group)  # [T_pad * k, d]
        if plan.padded > plan.tokens:  # a full-range slice would cost a zero-filled copy
            y_slots = y_slots[: plan.tokens * k]  # [T * k, d]  in backward
        y = combine_static(y_slots, gates)  # [T, d]
        topk_ids = plan.topk_ids[: plan.tokens]  # [T, k]
        b2 = computed.experts.down_proj_bias
        if b2 is None:
            return y
        group = self._group
        if group is not None:
            b2 = all_gather_rows(b2, group)  # [W * E_l, d / s]
        b2 = b2.reshape(self.cfg.num_experts, self.cfg.d_model)  # [E, d]
        return y + _bias_sum(b2, topk_ids, gates, y.dtype)


def _bias_sum(b2: Tensor, topk_ids: Tensor, gates: Tensor, dtype: torch.dtype) -> Tensor:
    """[T, d] ``sum_j gates[t, j] * b2[ids[t, j]]`` in fp32, cast to ``dtype``; b2 [E, d]
    (dropped slots have gate 0: any expert's bias row stands in for them)."""
    bias = (gates.unsqueeze(-1) * b2[topk_ids.clamp(min=0)].float()).sum(1)  # [T, d]
    return bias.to(dtype)


# ---------------------------------------------------------------- CUDA-graph cache

# Graphs one layer keeps at most (least recently used dropped first): each holds its
# own memory pool (intermediates of one forward at its T).
MAX_GRAPHS = 16


@dataclasses.dataclass
class _Captured:
    """One captured forward: its static input and output, and what the forward returned
    besides (host objects and graph buffers, refreshed by every replay)."""

    graph: torch.cuda.CUDAGraph
    x: Tensor  # [T, d] static input, allocated outside the graph's pool
    y: Tensor  # [T, d] static output
    state: object


class GraphCache:
    """The layer's captured inference forwards (``InferenceConfig.cuda_graph_tokens``).

    ``run(key, x, forward, weights)``: the first call with a key runs ``forward(x)``
    eagerly (it compiles and autotunes the kernels, which a capture cannot), the second
    captures ``forward`` on a static copy of x and replays it, later calls copy x into
    the static input and replay. ``forward`` returns (y, state): ``run`` returns a copy
    of y and the state of the captured call. Each graph has a private memory pool, so
    a replay never overwrites another graph's buffers. ``weights``: the data pointers of
    every weight; when they change (a move, a reassigned parameter) every graph is
    dropped. Copies (``copy.deepcopy``, pickling) start empty: a graph belongs to its
    buffers."""

    def __init__(self, max_graphs: int = MAX_GRAPHS) -> None:
        self.max_graphs = max_graphs
        self._graphs: collections.OrderedDict[tuple, _Captured] = collections.OrderedDict()
        self._seen: set[tuple] = set()
        self._weights: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()
        self._seen.clear()

    def __deepcopy__(self, memo: dict[int, object]) -> GraphCache:
        return GraphCache(self.max_graphs)

    def __getstate__(self) -> dict[str, object]:
        return {"max_graphs": self.max_graphs}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["max_graphs"])

    def run(
        self,
        key: tuple,
        x: Tensor,
        forward: Callable[[Tensor], tuple[Tensor, object]],
        weights: tuple[int, ...],
    ) -> tuple[Tensor, object]:
        """(y [T, d], state) of ``forward(x [T, d])``, see the class docstring."""
        if weights != self._weights:
            self.clear()
            self._weights = weights
        captured = self._graphs.get(key)
        if captured is None:
            if key not in self._seen:
                self._seen.add(key)
                return forward(x)
            static_x = x.clone()  # [T, d], outside the graph's pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y, state = forward(static_x)
            captured = self._graphs[key] = _Captured(graph, static_x, static_y, state)
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
            captured.x.copy_(x)
        captured.graph.replay()  # also right after the capture, which ran nothing
        return captured.y.clone(), captured.state


def default_inference_kernel(
    device: torch.device, dtype: torch.dtype, tokens: int, top_k: int, num_experts: int
) -> str | None:
    """The small-batch kernel where Triton runs on a GPU and the experts average at most
    ``SMALL_BATCH_ROWS`` rows each (``tokens`` * k / E, tokens: the static bound); None:
    the layer's usual default. Measured on one H200 (benchmarks/RESULTS.md): gemv beats
    scatter at 1-128 tokens on fine256 (E 256, k 8) and at 1-16 on mixtral (E 8, k 2),
    scatter wins at 128 tokens on mixtral (32 rows per expert)."""
    if device.type != "cuda" or not _triton_usable(device, dtype):
        return None
    if tokens * top_k > SMALL_BATCH_ROWS * num_experts:
        return None
    return "gemv"


__all__ = [
    "COMPLETE_ROWS_KERNELS",
    "DEVICE_OFFSET_KERNELS",
    "GraphCache",
    "InferenceConfig",
    "StaticDispatcher",
    "StaticRows",
    "balance_loss_static",
    "combine_static",
    "default_inference_kernel",
    "group_static",
    "static_expert_mlp",
]

"""Token exchange between the ranks of an expert group: linear and 2DH all-to-all with
variable split sizes, autograd, and a start/wait form that overlaps with compute.

Notation: W ranks, m = ranks_per_node, N = W / m nodes, group rank g = node*m + local
(see ``mesh``). ``sizes[src][dst]`` = rows rank src sends to rank dst; every rank knows
the whole W x W matrix, so no sizes are exchanged. The rows src holds for dst form the
chunk (src, dst); an exchange moves every chunk from src to dst, keeping row order:

    x    [sum_dst sizes[me][dst], *rest]    send buffer, chunks in destination order
    out  [sum_src sizes[src][me], *rest]    receive buffer, chunks in source order

linear  one all_to_all_single over the group.
2dh     Tutel's two-dimensional hierarchical all-to-all, with variable chunk sizes:
        stage 1: reorder my chunks from dst = n*m + l order to (l, n) order and run
                 all_to_all_single over ``intra``: local peer l gets every chunk for the
                 ranks with local index l. I then hold chunks (node*m + j -> n*m + local)
                 in (j, n) order.
        stage 2: reorder them to (n, j) order and run all_to_all_single over ``inter``:
                 my peer on node n gets the chunks for it. Chunks arrive in (n, j) order,
                 which is source-rank order.
        With one node, or one rank per node, 2dh is the linear exchange.

The combine direction is the exchange with the transposed matrix (``plan.inverse()``),
which is also the backward of an exchange: it is a permutation of rows across ranks, so
its adjoint is the inverse permutation.

Overlap (``exchange_start`` / ``PendingExchange.wait``): start launches the first stage
with ``async_op=True`` and returns at once; wait makes the current stream wait for it
(on GPU the host is not blocked), then runs the 2dh reorder and stage 2 in line. So
between start and wait the linear exchange, or stage 1 of 2dh, overlaps with whatever
the caller does; stage 2 of 2dh overlaps only with exchanges already in flight. Backward
mirrors this: the backward of wait launches the reverse exchange of the incoming
gradient's first stage, the backward of start finishes it, and autograd runs the nodes
in between (the other chunks' compute) while it is in flight.

Collective discipline: every rank of the group must run every exchange, and in backward
every rank must backpropagate through every exchange whose input requires grad (an
empty output still has to reach the loss). Backward collectives are issued when
autograd runs the wait node (the reverse first stage) and, for 2dh, the start node (the
reverse second stage); if rank graphs can differ in structure, pass the forward's
``comm.order.CollectiveOrder`` so every rank issues them alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.distributed import ProcessGroup

from adaptive_moe.comm.mesh import Mesh
from adaptive_moe.comm.order import CollectiveOrder
from adaptive_moe.core.strategy import A2A, A2A_ALGOS
from adaptive_moe.core.transfer import HostBatch

Axis = Literal["group", "intra", "inter"]
Matrix = tuple[tuple[int, ...], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class _Stage:
    """One all_to_all_single: reorder the rows, then exchange them over ``axis``.

    order: [rows_in] int64 row index on the device applied before sending; None: keep.
        (While planning, before ``PreparedExchange.finish``: its index in the batch.)
    send / recv: rows to / from each rank of the axis group.
    idle: no rank of the axis group moves a row (the same on all its ranks): skip it.
    """

    axis: Axis
    order: Tensor | int | None
    send: tuple[int, ...]
    recv: tuple[int, ...]
    idle: bool


@dataclasses.dataclass(frozen=True, eq=False)
class _Route:
    """The stages of one direction of an exchange, as run on this rank."""

    stages: tuple[_Stage, ...]
    rows_in: int
    rows_out: int


@dataclasses.dataclass(frozen=True, eq=False)
class ExchangePlan:
    """Everything host-side about one exchange, computed once per forward.

    Attributes:
        algo: ``"linear"`` or ``"2dh"``.
        sizes: sizes[src][dst] = rows src sends to dst (group ranks).
        rank: the group rank the plan was made for.
        route: the stages this rank runs (split lists, row orders as device tensors).
        reverse: the route of the inverse exchange (kept so ``inverse()`` is free).
    """

    algo: A2A
    sizes: Matrix
    rank: int
    route: _Route
    reverse: _Route

    @property
    def send_rows(self) -> int:
        """Rows this rank sends: sum_dst sizes[rank][dst]."""
        return self.route.rows_in

    @property
    def recv_rows(self) -> int:
        """Rows this rank receives: sum_src sizes[src][rank]."""
        return self.route.rows_out

    def inverse(self) -> ExchangePlan:
        """The combine direction: sizes transposed, every row sent back where it came from."""
        sizes = tuple(zip(*self.sizes))
        return ExchangePlan(self.algo, sizes, self.rank, self.reverse, self.route)


def plan_exchange(
    sizes: Sequence[Sequence[int]] | Tensor | np.ndarray,
    mesh: Mesh,
    algo: A2A,
    device: torch.device,
) -> ExchangePlan:
    """Plan the exchange of ``sizes`` (W x W, sizes[src][dst]) on ``mesh`` with ``algo``;
    the row orders of 2dh are built on the host and copied to ``device`` once."""
    batch = HostBatch()
    prepared = prepare_exchange(sizes, mesh, algo, batch)
    return prepared.finish(batch.upload(torch.device(device)))


class PreparedExchange:
    """An exchange planned on the host whose row orders wait in a ``HostBatch``.

    ``prepare_exchange`` queues the orders; after the caller's one ``batch.upload``,
    ``finish(views)`` builds the ``ExchangePlan`` on the device views. So a forward
    that plans several exchanges (and other metadata) copies it all in one transfer."""

    def __init__(self, algo: A2A, matrix: np.ndarray, rank: int, routes: list[_Route]):
        self._algo, self._matrix, self._rank, self._routes = algo, matrix, rank, routes

    def finish(self, views: Sequence[Tensor]) -> ExchangePlan:
        """The plan, its row orders read from the uploaded ``views`` of the batch."""
        forward, backward = (_bind(route, views) for route in self._routes)
        return ExchangePlan(self._algo, _as_tuples(self._matrix), self._rank, forward, backward)


def prepare_exchange(
    sizes: Sequence[Sequence[int]] | Tensor | np.ndarray,
    mesh: Mesh,
    algo: A2A,
    batch: HostBatch,
) -> PreparedExchange:
    """Plan the exchange of ``sizes`` on the host, queueing its row orders in ``batch``
    (see ``PreparedExchange``); ValueError for bad sizes or algo."""
    if algo not in A2A_ALGOS:
        raise ValueError(f"algo must be one of {A2A_ALGOS}, got {algo!r}")
    matrix = _check_sizes(sizes, mesh.world)  # [W, W] int64
    two_d = algo == "2dh" and 1 < mesh.ranks_per_node < mesh.world
    build = _route_2dh if two_d else _route_linear
    routes = [build(matrix, mesh, batch), build(matrix.T, mesh, batch)]
    return PreparedExchange(algo, matrix, mesh.rank, routes)


def exchange(
    x: Tensor, plan: ExchangePlan, mesh: Mesh, order: CollectiveOrder | None = None
) -> Tensor:
    """Exchange the rows of ``x`` [send_rows, *rest] (chunks in destination order) and
    return [recv_rows, *rest] (chunks in source order). Differentiable; the backward is
    ``exchange(grad, plan.inverse(), mesh)``. With one rank it returns ``x`` itself.
    ``order``: see ``exchange_start``."""
    return exchange_start(x, plan, mesh, order).wait()


class PendingExchange:
    """An exchange in flight; ``wait()`` returns what ``exchange`` would have returned.

    Call ``wait`` exactly once, on the stream that was current at start, and on every
    rank in the same order relative to other collectives on the same groups.
    """

    def __init__(
        self,
        token: Tensor | None,
        state: _State | None,
        ready: Tensor | None,
        order: CollectiveOrder | None = None,
    ):
        self._token, self._state, self._ready, self._order = token, state, ready, order

    def wait(self) -> Tensor:
        """The received rows [recv_rows, *rest], differentiable with respect to ``x``."""
        if self._ready is not None:
            out, self._ready = self._ready, None
            return out
        if self._state is None:
            raise RuntimeError("PendingExchange.wait() was already called")
        out = _tied(_Wait, self._token, self._state, self._order)
        self._token = self._state = None
        return out


def exchange_start(
    x: Tensor, plan: ExchangePlan, mesh: Mesh, order: CollectiveOrder | None = None
) -> PendingExchange:
    """Launch the exchange of ``x`` (see ``exchange``) and return at once.

    ``order``: the forward's ``CollectiveOrder``. The start node and the wait node each
    issue backward collectives; each takes the order's token and returns the next one
    (``CollectiveOrder.link``), so autograd runs them in exactly the reverse forward
    order on every rank, whatever else the ranks' graphs differ in."""
    if mesh.world != len(plan.sizes) or mesh.rank != plan.rank:
        raise ValueError(
            f"plan was made for rank {plan.rank} of {len(plan.sizes)}, but mesh is rank "
            f"{mesh.rank} of {mesh.world}"
        )
    if x.dim() < 1 or x.shape[0] != plan.send_rows:
        raise ValueError(
            f"x must have sum_dst sizes[{plan.rank}][dst] = {plan.send_rows} rows, got shape "
            f"{tuple(x.shape)}"
        )
    if not plan.route.stages:
        return PendingExchange(None, None, x)
    state = _State(plan, mesh)
    token = _tied(_Start, x, state, order)
    return PendingExchange(token, state, None, order)


def _tied(
    node: type[torch.autograd.Function], x: Tensor, state: _State, order: CollectiveOrder | None
) -> Tensor:
    """``node(x)``; with an active ``order`` the node itself is the chain's next link."""
    if order is None or not (torch.is_grad_enabled() and x.requires_grad):
        return node.apply(x, x.new_empty(0), state)[0]
    return order.link(lambda token: node.apply(x, token, state))


# --- planning -----------------------------------------------------------------------


def _check_sizes(sizes: Sequence[Sequence[int]] | Tensor | np.ndarray, world: int) -> np.ndarray:
    """sizes as a [W, W] int64 array, or ValueError."""

    def bad(what: str) -> ValueError:
        shown = sizes.tolist() if isinstance(sizes, Tensor | np.ndarray) else sizes
        return ValueError(f"sizes must be {what}, got {shown!r}")

    try:
        matrix = np.asarray(sizes.cpu() if isinstance(sizes, Tensor) else sizes)
    except ValueError as err:  # ragged rows
        raise bad(f"a {world} x {world} matrix") from err
    if matrix.shape != (world, world):
        raise bad(f"a {world} x {world} matrix (the group size)")
    if matrix.dtype.kind not in "iu":
        raise bad("integers")
    if (matrix < 0).any():
        raise bad("non-negative")
    return matrix.astype(np.int64, copy=False)


def _as_tuples(matrix: np.ndarray) -> Matrix:
    return tuple(map(tuple, matrix.tolist()))


def _ints(values: np.ndarray) -> tuple[int, ...]:
    return tuple(values.tolist())


def _route_linear(sizes: np.ndarray, mesh: Mesh, batch: HostBatch) -> _Route:
    send, recv = sizes[mesh.rank], sizes[:, mesh.rank]  # [W], [W]
    rows_in, rows_out = int(send.sum()), int(recv.sum())
    if mesh.world == 1:
        return _Route((), rows_in, rows_out)
    stage = _Stage("group", None, _ints(send), _ints(recv), not sizes.any())
    return _Route((stage,), rows_in, rows_out)


def _route_2dh(sizes: np.ndarray, mesh: Mesh, batch: HostBatch) -> _Route:
    m, n_nodes, node, local = mesh.ranks_per_node, mesh.nodes, mesh.node, mesh.local_rank
    # blocks[a, i, b, j] = rows from rank a*m + i to rank b*m + j
    blocks = sizes.reshape(n_nodes, m, n_nodes, m)
    mine = blocks[node, local]  # [N, m]: my chunks, by (dst node, dst local)
    # Stage 1: my chunks, stored in dst = n*m + j order, sent in (j, n) order to local
    # peer j. Afterwards I hold the chunks (node*m + i -> n*m + local) in (i, n) order.
    order1 = np.arange(n_nodes * m).reshape(n_nodes, m).T.ravel()
    held = blocks[node, :, :, local]  # [m, N]
    stage1 = _Stage(
        "intra",
        _segment_order(mine.ravel(), order1, batch),
        _ints(mine.sum(0)),
        _ints(held.sum(1)),
        not blocks[node].any(),
    )
    # Stage 2: those chunks reordered to (n, i) and sent to my peer on node n.
    order2 = np.arange(m * n_nodes).reshape(m, n_nodes).T.ravel()
    arriving = blocks[:, :, node, local]  # [N, m]: chunks for me, by source
    stage2 = _Stage(
        "inter",
        _segment_order(held.ravel(), order2, batch),
        _ints(held.sum(0)),
        _ints(arriving.sum(1)),
        not blocks[:, :, :, local].any(),
    )
    return _Route((stage1, stage2), int(mine.sum()), int(arriving.sum()))


def _segment_order(length: np.ndarray, order: np.ndarray, batch: HostBatch) -> int | None:
    """Row index that concatenates the segments of a buffer (lengths ``length``, stored
    in index order) in the segment order ``order``, queued in ``batch`` (its view's
    index); None when that keeps every row."""
    start = np.cumsum(length) - length
    length, start = length[order], start[order]
    # Output row i of segment k is input row start[k] + (i - first output row of k).
    shift = np.repeat(start - (np.cumsum(length) - length), length)
    if not shift.any():
        return None
    return batch.add(shift + np.arange(shift.size, dtype=np.int64))


def _bind(route: _Route, views: Sequence[Tensor]) -> _Route:
    """``route`` with each stage's queued order index replaced by its uploaded view."""
    stages = tuple(
        s if s.order is None else dataclasses.replace(s, order=views[s.order]) for s in route.stages
    )
    return dataclasses.replace(route, stages=stages)


# --- running ------------------------------------------------------------------------


def _axis_group(mesh: Mesh, axis: Axis) -> ProcessGroup | None:
    return {"group": mesh.group, "intra": mesh.intra, "inter": mesh.inter}[axis]


class _Transfer:
    """One route in flight on this rank: its first stage is launched at construction,
    ``finish`` waits for it and runs the remaining stages."""

    def __init__(self, x: Tensor, route: _Route, mesh: Mesh):
        self._route, self._mesh = route, mesh
        self._out, self._work, self._sent = self._launch(x, route.stages[0])

    def _launch(self, x: Tensor, stage: _Stage) -> tuple[Tensor, Any, Tensor]:
        send = x.contiguous() if stage.order is None else x.index_select(0, stage.order)
        out = send.new_empty((sum(stage.recv), *send.shape[1:]))  # [rows received, *rest]
        if stage.idle:
            return out, None, send
        work = dist.all_to_all_single(
            out,
            send,
            list(stage.recv),
            list(stage.send),
            group=_axis_group(self._mesh, stage.axis),
            async_op=True,
        )
        return out, work, send

    def finish(self) -> Tensor:
        out = self._wait()
        for stage in self._route.stages[1:]:
            self._out, self._work, self._sent = self._launch(out, stage)
            out = self._wait()
        return out

    def _wait(self) -> Tensor:
        if self._work is not None:
            self._work.wait()
        out, self._work, self._sent = self._out, None, None  # the send buffer may go now
        return out


class _State:
    """Shared by the start and wait nodes of one exchange: the transfers in flight."""

    def __init__(self, plan: ExchangePlan, mesh: Mesh):
        self.plan, self.mesh = plan, mesh
        self.forward: _Transfer | None = None
        self.backward: _Transfer | None = None


class _Start(torch.autograd.Function):
    """(x, order token) -> (an empty token carrying the autograd edge to x, the next order
    token); launches the exchange of x."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, order_token: Tensor, state: _State
    ) -> tuple[Tensor, Tensor]:
        ctx.state = state
        state.forward = _Transfer(x, state.plan.route, state.mesh)
        # The token: the result is not valid before wait.
        return x.new_empty(0), order_token.new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, token_grad: Tensor, order_grad: Tensor
    ) -> tuple[Tensor, Tensor, None]:
        state: _State = ctx.state
        assert state.backward is not None  # launched by _Wait.backward, which ran first
        transfer, state.backward = state.backward, None
        return transfer.finish(), order_grad.new_zeros(0), None


class _Wait(torch.autograd.Function):
    """(token, order token) -> (the received rows, the next order token); its backward
    launches the reverse exchange."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, token: Tensor, order_token: Tensor, state: _State
    ) -> tuple[Tensor, Tensor]:
        ctx.state = state
        assert state.forward is not None  # launched by _Start.forward
        transfer, state.forward = state.forward, None
        return transfer.finish(), order_token.new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor, order_grad: Tensor) -> tuple[Tensor, Tensor, None]:
        state: _State = ctx.state
        state.backward = _Transfer(grad, state.plan.reverse, state.mesh)
        return grad.new_empty(0), order_grad.new_zeros(0), None

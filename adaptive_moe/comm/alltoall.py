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
reverse second stage); if rank graphs can differ in structure, chain the exchanges in a
fixed order (``comm.order.CollectiveOrder``) so every rank issues them alike.
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
from adaptive_moe.core.strategy import A2A, A2A_ALGOS

Axis = Literal["group", "intra", "inter"]
Matrix = tuple[tuple[int, ...], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class _Stage:
    """One all_to_all_single: reorder the rows, then exchange them over ``axis``.

    order: [rows_in] int64 row index on the device applied before sending; None: keep.
    send / recv: rows to / from each rank of the axis group.
    idle: no rank of the axis group moves a row (the same on all its ranks): skip it.
    """

    axis: Axis
    order: Tensor | None
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
    if algo not in A2A_ALGOS:
        raise ValueError(f"algo must be one of {A2A_ALGOS}, got {algo!r}")
    matrix = _check_sizes(sizes, mesh.world)  # [W, W] int64
    two_d = algo == "2dh" and 1 < mesh.ranks_per_node < mesh.world
    build = _route_2dh if two_d else _route_linear
    forward, backward = build(matrix, mesh), build(matrix.T, mesh)
    forward, backward = _to_device([forward, backward], torch.device(device))
    return ExchangePlan(algo, _as_tuples(matrix), mesh.rank, forward, backward)


def exchange(x: Tensor, plan: ExchangePlan, mesh: Mesh) -> Tensor:
    """Exchange the rows of ``x`` [send_rows, *rest] (chunks in destination order) and
    return [recv_rows, *rest] (chunks in source order). Differentiable; the backward is
    ``exchange(grad, plan.inverse(), mesh)``. With one rank it returns ``x`` itself."""
    return exchange_start(x, plan, mesh).wait()


class PendingExchange:
    """An exchange in flight; ``wait()`` returns what ``exchange`` would have returned.

    Call ``wait`` exactly once, on the stream that was current at start, and on every
    rank in the same order relative to other collectives on the same groups.
    """

    def __init__(self, token: Tensor | None, state: _State | None, ready: Tensor | None):
        self._token, self._state, self._ready = token, state, ready

    def wait(self) -> Tensor:
        """The received rows [recv_rows, *rest], differentiable with respect to ``x``."""
        if self._ready is not None:
            out, self._ready = self._ready, None
            return out
        if self._state is None:
            raise RuntimeError("PendingExchange.wait() was already called")
        out = _Wait.apply(self._token, self._state)
        self._token = self._state = None
        return out


def exchange_start(x: Tensor, plan: ExchangePlan, mesh: Mesh) -> PendingExchange:
    """Launch the exchange of ``x`` (see ``exchange``) and return at once."""
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
    token = _Start.apply(x, state)
    return PendingExchange(token, state, None)


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


def _route_linear(sizes: np.ndarray, mesh: Mesh) -> _Route:
    send, recv = sizes[mesh.rank], sizes[:, mesh.rank]  # [W], [W]
    rows_in, rows_out = int(send.sum()), int(recv.sum())
    if mesh.world == 1:
        return _Route((), rows_in, rows_out)
    stage = _Stage("group", None, _ints(send), _ints(recv), not sizes.any())
    return _Route((stage,), rows_in, rows_out)


def _route_2dh(sizes: np.ndarray, mesh: Mesh) -> _Route:
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
        _segment_order(mine.ravel(), order1),
        _ints(mine.sum(0)),
        _ints(held.sum(1)),
        not blocks[node].any(),
    )
    # Stage 2: those chunks reordered to (n, i) and sent to my peer on node n.
    order2 = np.arange(m * n_nodes).reshape(m, n_nodes).T.ravel()
    arriving = blocks[:, :, node, local]  # [N, m]: chunks for me, by source
    stage2 = _Stage(
        "inter",
        _segment_order(held.ravel(), order2),
        _ints(held.sum(0)),
        _ints(arriving.sum(1)),
        not blocks[:, :, :, local].any(),
    )
    return _Route((stage1, stage2), int(mine.sum()), int(arriving.sum()))


def _segment_order(length: np.ndarray, order: np.ndarray) -> Tensor | None:
    """Row index that concatenates the segments of a buffer (lengths ``length``, stored
    in index order) in the segment order ``order``; None when that keeps every row."""
    start = np.cumsum(length) - length
    length, start = length[order], start[order]
    # Output row i of segment k is input row start[k] + (i - first output row of k).
    shift = np.repeat(start - (np.cumsum(length) - length), length)
    if not shift.any():
        return None
    return torch.from_numpy(shift + np.arange(shift.size, dtype=np.int64))


def _to_device(routes: list[_Route], device: torch.device) -> list[_Route]:
    """Copy every row order of ``routes`` to ``device`` in one transfer."""
    orders = [s.order for r in routes for s in r.stages if s.order is not None]
    if not orders or device.type == "cpu":
        return routes
    flat = torch.cat(orders)
    if device.type == "cuda":
        flat = flat.pin_memory()
    moved = iter(flat.to(device, non_blocking=True).split([len(o) for o in orders]))
    return [
        dataclasses.replace(
            r,
            stages=tuple(
                s if s.order is None else dataclasses.replace(s, order=next(moved))
                for s in r.stages
            ),
        )
        for r in routes
    ]


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
    """x -> an empty token carrying the autograd edge; launches the exchange of x."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, state: _State) -> Tensor:
        ctx.state = state
        state.forward = _Transfer(x, state.plan.route, state.mesh)
        return x.new_empty(0)  # the token: the result is not valid before wait

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, token_grad: Tensor) -> tuple[Tensor, None]:
        state: _State = ctx.state
        assert state.backward is not None  # launched by _Wait.backward, which ran first
        transfer, state.backward = state.backward, None
        return transfer.finish(), None


class _Wait(torch.autograd.Function):
    """token -> the received rows; its backward launches the reverse exchange."""

    @staticmethod
    def forward(ctx: FunctionCtx, token: Tensor, state: _State) -> Tensor:
        ctx.state = state
        assert state.forward is not None  # launched by _Start.forward
        transfer, state.forward = state.forward, None
        return transfer.finish()

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        state: _State = ctx.state
        state.backward = _Transfer(grad, state.plan.reverse, state.mesh)
        return grad.new_empty(0), None

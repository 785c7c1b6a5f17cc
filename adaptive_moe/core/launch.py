"""Run a function on W ranks: in this process under ``torchrun``, or on spawned CPU workers.

    results = launch(fn, world_size=2, args=(cfg,), timeout_s=120)
    # fn(rank, world_size, *args) runs with the default process group initialised

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` set) or when a process group
already exists, ``fn`` runs here, once, on NCCL when CUDA is available and on gloo
otherwise. With no launcher, ``world_size`` CPU processes are spawned and joined by gloo
over a free port on 127.0.0.1. Either way every collective carries ``timeout_s``: a rank
that hangs or dies makes the others fail within that bound instead of waiting forever.

Spawned workers report back through a multiprocessing queue (the return value of ``fn``
travels pickled, by value, between our own processes; nothing read from disk is
unpickled). When
one rank raises or dies, the others get a short grace period to report their own errors,
are then terminated, and ``launch`` raises ``RuntimeError`` naming every failed rank and
what happened to it (the traceback, or the exit code / signal).
"""

from __future__ import annotations

import datetime
import math
import os
import pickle
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adaptive_moe.core.checks import check_ranks_per_node, positive_int

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR")
# After the first failure, how long the other ranks get to report (they usually fail
# fast: gloo raises as soon as a peer's connection closes), then how long a terminated
# worker gets before it is killed.
_GRACE_S = 3.0
_TERMINATE_S = 3.0
_POLL_S = 0.2


def launched_externally() -> bool:
    """True under ``torchrun`` (or any launcher that sets the env:// variables) or when
    the default process group is already initialised."""
    if dist.is_available() and dist.is_initialized():
        return True
    return all(v in os.environ for v in _TORCHRUN_VARS)


def external_world_size() -> int | None:
    """The world size the external launcher chose, or None when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if launched_externally():
        return int(os.environ["WORLD_SIZE"])
    return None


def launch(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...] = (),
    *,
    timeout_s: float = 300.0,
    ranks_per_node: int | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks (see module docstring).

    Returns ``[result]`` (this rank's) under an external launcher, else every rank's
    result in rank order. Raises ValueError for bad arguments and RuntimeError naming
    the failed rank(s) when a spawned rank raises or dies.
    """
    _check_args(world_size, timeout_s, ranks_per_node)
    if launched_externally():
        return [_run_here(fn, world_size, args, timeout_s)]
    return _spawn(fn, world_size, args, timeout_s, ranks_per_node or world_size)


def ranks_on_this_host(world_size: int) -> int:
    """How many of ``world_size`` ranks share this host (its memory): every spawned one;
    under a launcher, its ``LOCAL_WORLD_SIZE``."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if launched_externally() and local.isdigit() and int(local) > 0:
        return int(local)
    return world_size


def _check_args(world_size: object, timeout_s: object, ranks_per_node: object) -> None:
    positive_int("world_size", world_size)
    if not isinstance(timeout_s, (int, float)) or not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
    check_ranks_per_node(ranks_per_node, world_size)


# ---- under an external launcher ---------------------------------------------------------


def _run_here(
    fn: Callable[..., Any], world_size: int, args: tuple[Any, ...], timeout_s: float
) -> Any:
    launched = external_world_size()
    if launched != world_size:
        raise ValueError(
            f"world_size={world_size} was asked for, but the launcher started {launched} "
            f"ranks (WORLD_SIZE={launched}); make them agree"
        )
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    result = fn(dist.get_rank(), world_size, *args)
    # Only on success: after a failed collective, tearing NCCL down can itself hang, and
    # the launcher ends the process anyway.
    if created:
        dist.destroy_process_group()
    return result


# ---- spawned CPU workers ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple[Any, ...],
    port: int,
    timeout_s: float,
    ranks_per_node: int,
    threads: int,
    results: Any,
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank % ranks_per_node),
        LOCAL_WORLD_SIZE=str(ranks_per_node),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)
    failed = False
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        # Pickled here, by value: torch's queue would otherwise share tensors through file
        # descriptors that die with this process, before the parent has read them.
        results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException as exc:  # report everything, KeyboardInterrupt included
        failed = True
        summary = f"{type(exc).__name__}: {exc}".strip()
        results.put((rank, False, (summary, traceback.format_exc())))
    finally:
        if dist.is_initialized() and not failed:
            dist.destroy_process_group()
        results.close()
        results.join_thread()  # the report must reach the pipe before this process ends
    if failed:
        raise SystemExit(1)


class _Watch:
    """The parent's view of the spawned ranks: reports received, ranks that died."""

    def __init__(self, procs: list[Any], results: Any):
        self.procs, self.results = procs, results
        self.ok: dict[int, Any] = {}
        self.errors: dict[int, tuple[str, str]] = {}  # rank -> (summary, traceback)
        self.died: dict[int, int] = {}  # rank -> exit code, for ranks that never reported
        self.order: list[int] = []  # failed ranks, in the order their failure was seen

    def reported(self, rank: int) -> bool:
        return rank in self.ok or rank in self.errors

    def done(self) -> bool:
        return all(self.reported(r) or r in self.died for r in range(len(self.procs)))

    def failed(self) -> bool:
        return bool(self.errors or self.died)

    def poll(self, wait_s: float) -> None:
        try:
            rank, ok, payload = self.results.get(timeout=wait_s)
        except queue.Empty:
            self._check_exits()
            return
        self._record(rank, ok, payload)

    def _record(self, rank: int, ok: bool, payload: object) -> None:
        """A rank's report: its pickled result, or (summary, traceback) of its error."""
        if ok:
            self.ok[rank] = pickle.loads(payload)
        else:
            self.errors[rank] = payload
            self.order.append(rank)

    def _check_exits(self) -> None:
        for rank, p in enumerate(self.procs):
            if p.exitcode is None or self.reported(rank) or rank in self.died:
                continue
            # A report sent just before exiting may still be in the pipe: drain first.
            self._drain()
            if not self.reported(rank):
                self.died[rank] = p.exitcode
                self.order.append(rank)

    def _drain(self) -> None:
        while True:
            try:
                rank, ok, payload = self.results.get(timeout=_POLL_S)
            except queue.Empty:
                return
            self._record(rank, ok, payload)

    def error(self) -> RuntimeError:
        """Ranks that died without a word come first: when one rank dies, its peers
        raise too (their collectives break), but the dead one is the cause."""
        dead = [r for r in self.order if r in self.died]
        raised = [r for r in self.order if r in self.errors]
        lines = [f"rank {r} {_describe_exit(self.died[r])} without reporting" for r in dead]
        lines += [f"rank {r} raised {self.errors[r][0]}" for r in raised]
        stopped = [r for r in range(len(self.procs)) if not self.reported(r) and r not in self.died]
        if stopped:
            lines.append(f"ranks {stopped} were stopped")
        details = [f"--- rank {r} traceback ---\n{self.errors[r][1]}" for r in raised]
        head = f"rank(s) {dead + raised} failed: " + "; ".join(lines)
        return RuntimeError("\n".join([head, *details]))


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _spawn(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...],
    timeout_s: float,
    ranks_per_node: int,
) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    threads = max(1, _cpu_count() // world_size)
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, r, world_size, args, port, timeout_s, ranks_per_node, threads, results),
            name=f"adaptive-moe-rank{r}",
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    watch = _Watch(procs, results)
    try:
        while not watch.done() and not watch.failed():
            watch.poll(_POLL_S)
        grace_end = time.monotonic() + _GRACE_S
        while watch.failed() and not watch.done() and time.monotonic() < grace_end:
            watch.poll(_POLL_S)
    finally:
        _stop(procs, graceful=watch.done() and not watch.failed())
    if watch.failed():
        raise watch.error()
    return [watch.ok[r] for r in range(world_size)]


def _stop(procs: list[Any], graceful: bool) -> None:
    """End every worker: after a success let them exit by themselves first; otherwise
    (or if they linger) SIGTERM, then SIGKILL after ``_TERMINATE_S``."""
    deadline = time.monotonic() + _TERMINATE_S
    if graceful:
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + _TERMINATE_S
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()

"""Run a function on W spawned CPU processes joined by a gloo process group.

Every run has a deadline: a hung collective fails the test instead of stalling CI. Ports
are chosen free by the OS. Results travel back as pickled return values through a
multiprocessing queue (test-only; the library itself never unpickles).

    results = run_distributed(worker, world_size=4, args=(...,), timeout=120)
    # worker(rank, world_size, *args) runs with torch.distributed initialised
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
    collective_timeout: float,
    env: dict[str, str],
) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        try:
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=collective_timeout),
            )
        except dist.DistNetworkError as err:
            if "EADDRINUSE" not in str(err):
                raise
            # Another process took the free port between its probe and this bind.
            results.put((rank, "port", traceback.format_exc()))
            return
        out = fn(rank, world_size, *args)
        # Pickled here: torch's queue would share tensors through file descriptors that
        # die with this process before the parent reads them.
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            _leave_together(rank, world_size)
            dist.destroy_process_group()
        # Interpreter teardown after gloo sometimes stalls in native code: flush the
        # queue and leave at once.
        results.close()
        results.join_thread()
        os._exit(0)


def _leave_together(rank: int, world_size: int) -> None:
    """Rank 0 hosts the rendezvous store: it waits (up to 20 s) until every rank is done
    with it, so that a rank still finishing a collective's set-up never finds the store
    gone ("Connection reset by peer") because rank 0 returned first."""
    store = dist.distributed_c10d._get_default_store()
    try:
        store.set(f"dist_utils/done/{rank}", "1")
        if rank == 0:
            keys = [f"dist_utils/done/{r}" for r in range(world_size)]
            store.wait(keys, datetime.timedelta(seconds=20))
    except (RuntimeError, dist.DistError):
        pass  # a rank that died has reported (or will time out) on its own


class _PortTaken(Exception):
    """The rendezvous port was taken before rank 0 bound it (the run never started)."""


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...] = (),
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the
    per-rank results in rank order. Raises AssertionError with every failing rank's
    traceback, or TimeoutError if the ranks do not all finish within ``timeout`` s.
    A rendezvous port taken by another process before rank 0 binds it (free ports are
    probed, then released) is retried on a fresh port, up to three times."""
    for attempt in range(3):
        try:
            return _run_once(fn, world_size, args, timeout, env)
        except _PortTaken:
            if attempt == 2:
                raise AssertionError("three rendezvous ports in a row were taken") from None
    raise AssertionError("unreachable")


def _run_once(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...],
    timeout: float,
    env: dict[str, str] | None,
) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_entry,
            args=(r, world_size, port, fn, args, results, max(10.0, timeout / 2), env or {}),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    got: dict[int, tuple[str, Any]] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(got) < world_size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                raise TimeoutError(
                    f"distributed run of {fn.__name__} on {world_size} ranks did not finish "
                    f"in {timeout:.0f} s; ranks done: {sorted(got)}"
                )
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and all(i not in got for i in dead):
                    raise AssertionError(
                        f"ranks {dead} exited with codes "
                        f"{[procs[i].exitcode for i in dead]} before reporting"
                    ) from None
                continue
            if status == "port":
                raise _PortTaken(payload)
            got[rank] = (status, payload)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    errors = {r: v for r, (s, v) in got.items() if s == "error"}
    if errors:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise AssertionError(f"distributed run failed:\n{msg}")
    return [pickle.loads(got[r][1]) for r in range(world_size)]

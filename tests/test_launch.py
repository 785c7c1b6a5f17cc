"""adaptive_moe.core.launch: spawned gloo workers, the in-process torchrun path, and failures
(a rank that raises, dies or hangs) ending every rank within a bounded time."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

from adaptive_moe.core.launch import launch
from tests.dist_utils import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env_and_sum(rank: int, world: int, offset: int) -> dict[str, object]:
    t = torch.tensor([float(rank + offset)])
    dist.all_reduce(t)
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    return {"rank": rank, "world": world, "sum": t.item(), "env": env}


def _dies(rank: int, world: int, code: int) -> None:
    t = torch.ones(1)
    for step in range(10_000):
        if rank == 1 and step == 2:
            os._exit(code)
        dist.all_reduce(t)
        t.fill_(1.0)


def _raises(rank: int, world: int) -> None:
    dist.barrier()
    if rank == 0:
        raise ValueError("boom on purpose")
    dist.barrier()  # rank 1 waits here until it is stopped (or its peer's socket closes)


def _hangs(rank: int, world: int) -> None:
    if rank == 1:
        time.sleep(3600)  # never joins the collective below
    dist.all_reduce(torch.ones(1))


@pytest.mark.dist
@pytest.mark.timeout(60)
def test_spawn_returns_results_in_rank_order_with_env():
    out = launch(_env_and_sum, 2, (10,), timeout_s=30, ranks_per_node=1)
    assert [o["rank"] for o in out] == [0, 1]
    assert all(o["world"] == 2 and o["sum"] == 10 + 11 for o in out)
    assert out[1]["env"] == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
    }


@pytest.mark.dist
@pytest.mark.timeout(60)
def test_dead_rank_stops_the_others_and_is_named():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 exited with code 7 without reporting"):
        launch(_dies, 2, (7,), timeout_s=20)
    # gloo notices the closed connection at once; the bound is the collective timeout.
    assert time.monotonic() - start < 20


@pytest.mark.dist
@pytest.mark.timeout(60)
def test_raising_rank_is_named_with_its_error():
    with pytest.raises(RuntimeError) as info:
        launch(_raises, 2, timeout_s=20)
    msg = str(info.value)
    assert msg.startswith("rank(s) [0")
    assert "rank 0 raised ValueError: boom on purpose" in msg
    assert "--- rank 0 traceback ---" in msg


@pytest.mark.dist
@pytest.mark.timeout(60)
def test_hung_rank_hits_the_collective_timeout():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 0 raised"):
        launch(_hangs, 2, timeout_s=3)
    elapsed = time.monotonic() - start
    assert 3 <= elapsed < 30, elapsed


@pytest.mark.parametrize(
    ("world", "kw", "match"),
    [
        (0, {}, "world_size must be a positive integer"),
        (2, {"timeout_s": 0}, "timeout_s must be"),
        (2, {"timeout_s": float("inf")}, "timeout_s must be"),
        (4, {"ranks_per_node": 3}, "ranks_per_node must be a positive integer dividing"),
    ],
)
def test_bad_arguments(world, kw, match):
    with pytest.raises(ValueError, match=match):
        launch(_env_and_sum, world, (0,), **kw)


_TORCHRUN_CHILD = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from adaptive_moe.core.launch import launch

    def fn(rank, world, die):
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        if die and rank == 1:
            os._exit(5)
        for _ in range(1000):
            dist.all_reduce(t)
        return (rank, world, dist.get_backend())

    print("RESULT", launch(fn, int(sys.argv[1]), (sys.argv[2] == "die",), timeout_s=15))
    """
)


def _torchrun_like(world_asked: int, mode: str) -> list[subprocess.CompletedProcess]:
    """Two processes started the way torchrun starts them (env:// variables set)."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            PYTHONPATH=ROOT,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _TORCHRUN_CHILD, str(world_asked), mode],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.dist
@pytest.mark.timeout(90)
def test_under_torchrun_fn_runs_in_process():
    ok = _torchrun_like(2, "ok")
    for rank, res in enumerate(ok):
        assert res.returncode == 0, res.stderr
        assert f"RESULT [({rank}, 2, 'gloo')]" in res.stdout


@pytest.mark.dist
@pytest.mark.timeout(90)
def test_under_torchrun_a_dead_peer_makes_the_survivor_exit_nonzero():
    start = time.monotonic()
    dead, survivor = _torchrun_like(2, "die")[::-1]
    assert dead.returncode == 5
    assert survivor.returncode != 0
    assert "RESULT" not in survivor.stdout
    assert time.monotonic() - start < 60


def test_under_torchrun_a_world_size_mismatch_is_refused(monkeypatch):
    for name, value in {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    }.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(
        ValueError, match="world_size=3 was asked for, but the launcher started 2 ranks"
    ):
        launch(_env_and_sum, 3, (0,))
    assert not dist.is_initialized()

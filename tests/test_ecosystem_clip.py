"""``adaptive_moe.clip_grad_norm_`` under DDP (W = 2 and 4; E >= W and E < W): the clipped
step equals one process clipping with ``torch.nn.utils.clip_grad_norm_`` on the global
batch (model, data and comparison of ``test_ecosystem_ddp``)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import adaptive_moe as am
from tests.dist_utils import run_distributed
from tests.test_ecosystem_ddp import LR, TOL, _build, _data, _full_params, _rank_batch

pytestmark = pytest.mark.filterwarnings("ignore:MoELayer has no strategy table")

MAX_NORM = 0.1  # far below the gradient norm here: clipping is active


def _clipped_step(model, params, x, y, clip) -> torch.Tensor:
    opt = torch.optim.SGD(params, lr=LR)
    (model(x) - y).square().mean().backward()
    norm = clip()
    opt.step()
    return norm


def _reference(e: int) -> tuple[dict, float]:
    net = _build(e)
    x, y = _data()
    norm = _clipped_step(
        net,
        net.parameters(),
        x,
        y,
        lambda: torch.nn.utils.clip_grad_norm_(net.parameters(), MAX_NORM),
    )
    return _full_params(net), float(norm)


def _clip_runs(rank: int, world: int, experts: list[int]) -> dict:
    x, y = _rank_batch(rank, world)
    out = {}
    for e in experts:
        net = _build(e)
        am.exclude_experts_from_ddp(net)
        model = DistributedDataParallel(net, find_unused_parameters=e == 1)
        norm = _clipped_step(
            model, net.parameters(), x, y, lambda net=net: am.clip_grad_norm_(net, MAX_NORM)
        )
        out[e] = (_full_params(net), float(norm))
    return out


@pytest.mark.dist
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world,experts", [(2, [4, 1]), (4, [2])])
def test_clip_grad_norm_under_ddp_equals_one_process_clipping(world, experts):
    results = run_distributed(_clip_runs, world, (experts,), timeout=200)
    for e in experts:
        want, want_norm = _reference(e)
        assert want_norm > 10 * MAX_NORM
        for r in range(world):
            got, norm = results[r][e]
            assert norm == pytest.approx(want_norm, rel=1e-5), (r, e)
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=TOL, atol=TOL, msg=name)

"""Switching strategy between iterations is free and changes nothing.

A few optimizer steps that switch strategy every step give the same losses as steps that
never switch (fp32, relative 1e-5), and no parameter or optimizer-state tensor is moved,
copied or re-allocated (their data pointers never change).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import adaptive_moe as am
from adaptive_moe.runtime.experts import is_expert_param
from tests.dist_utils import run_distributed

D, H, STEPS = 8, 16, 6


def _train(rank, world, num_experts, switch):
    torch.manual_seed(0)  # same full weights on every rank before sharding
    layer = am.MoELayer(D, H, num_experts, 2, ranks_per_node=2)
    full = {
        "gate_up_proj": torch.randn(num_experts, 2 * H, D) * 0.3,
        "down_proj": torch.randn(num_experts, D, H) * 0.3,
    }
    layer.load_expert_weights(**full)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(num_experts, D))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    strategies = [s for s in layer.strategies() if s.kernel == "loop"]
    g = torch.Generator().manual_seed(100 + rank)
    param_ptrs = [p.data_ptr() for p in layer.parameters()]
    state_ptrs = None
    losses = []
    for step in range(STEPS):
        strategy = strategies[step * 7 % len(strategies)] if switch else layer.default_strategy
        x = torch.randn(11 + rank, D, generator=g)
        y = layer(x, strategy=strategy)
        loss = y.square().mean() + 0.01 * layer.aux_loss
        opt.zero_grad()
        loss.backward()
        for p in layer.parameters():  # data-parallel all-reduce of the replicated router only
            if not is_expert_param(p):
                dist.all_reduce(p.grad)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item())
        assert [p.data_ptr() for p in layer.parameters()] == param_ptrs, "a parameter moved"
        now = [t.data_ptr() for st in opt.state.values() for t in st.values() if t.dim() > 0]
        if state_ptrs is None:
            state_ptrs = now
        assert now == state_ptrs, "optimizer state was re-allocated"
    return losses, sorted({str(s) for s in strategies})


@pytest.mark.dist
@pytest.mark.timeout(240)
@pytest.mark.parametrize("num_experts", [2, 8])  # E < W (EP+MP possible) and E > W
def test_switching_every_step_changes_nothing(num_experts):
    def run(switch):
        return run_distributed(_switch_worker, 4, (num_experts, switch), timeout=200)

    fixed = run(False)
    switched = run(True)
    assert len(switched[0][1]) > 4  # many different strategies really ran
    for (a, _), (b, _) in zip(fixed, switched):
        for la, lb in zip(a, b):
            assert abs(la - lb) <= 1e-5 * max(1.0, abs(la)), (a, b)


def _switch_worker(rank, world, num_experts, switch):
    return _train(rank, world, num_experts, switch)

"""Plain ``DistributedDataParallel`` and FSDP2 ``fully_shard`` over models holding
``MoELayer``s (W = 2 and 4 gloo ranks; E >= W and E < W).

Reference: the same model in this (single) process, with the same initial weights, taking
one SGD step on the whole global batch (the mean loss over it). SGD, not AdamW, so that a
gradient off by a factor (the W-fold expert gradient) shows in the step. Every rank's
parameters after its step -- dense ones as they are (FSDP2: ``full_tensor()``), expert
ones gathered into NaN-poisoned full tensors by the layout rule -- must equal the
reference to fp32 rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import adaptive_moe as am
from adaptive_moe.runtime.layer import MoELayer
from tests.dist_utils import run_distributed

pytestmark = pytest.mark.filterwarnings("ignore:MoELayer has no strategy table")

D, H, TOKENS, LR = 8, 8, 16, 0.5  # TOKENS per rank at W = 4; global batch 64
GLOBAL = 64
TOL = 2e-6


class Block(nn.Module):
    def __init__(self, e: int):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.moe = MoELayer(D, H, e, top_k=min(2, e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.moe(self.norm(x))


class Net(nn.Module):
    def __init__(self, e: int):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.blocks = nn.ModuleList([Block(e), Block(e)])
        self.out = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h).squeeze(-1)


def _build(e: int) -> Net:
    """The same weights on any world size: dense ones drawn in name order, experts from
    full tensors (each rank keeps its shard)."""
    net = Net(e)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if not am.is_expert_param(p):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for block in net.blocks:
            block.moe.load_expert_weights(
                gate_up_proj=torch.randn(e, 2 * H, D, generator=g) * 0.5,
                down_proj=torch.randn(e, D, H, generator=g) * 0.5,
            )
    return net


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL, D, generator=g), torch.randn(GLOBAL, generator=g)


def _full_params(net: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter at full size: expert shards all-gathered and placed by the layout
    rule (E >= W: whole experts in rank order; E < W: rank e*s + j holds hidden rows
    [j*h/s, (j+1)*h/s) of gate and up, the same columns of down)."""
    world, out = (dist.get_world_size() if dist.is_initialized() else 1), {}
    for name, p in net.named_parameters():
        t = p.detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        if not am.is_expert_param(p) or world == 1:
            out[name.removeprefix("module.")] = t.clone()
            continue
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        e = net.get_submodule(name.rsplit(".", 2)[0]).expert_cfg.num_experts
        if e >= world:
            full = torch.cat(parts)
        else:
            s = world // e
            c = H // s
            rows = []
            for ex in range(e):
                sl = [parts[ex * s + j][0] for j in range(s)]
                if "gate_up" in name:
                    rows.append(torch.cat([q[:c] for q in sl] + [q[c:] for q in sl]))
                else:
                    rows.append(torch.cat(sl, dim=1))
            full = torch.stack(rows)
        out[name.removeprefix("module.")] = full
    return out


def _step(net: nn.Module, model: nn.Module, x, y, params, accumulate: bool = False) -> None:
    opt = torch.optim.SGD(params, lr=LR)
    if accumulate:  # two micro-batches, the first without gradient synchronisation
        half = x.shape[0] // 2
        with model.no_sync():
            ((model(x[:half]) - y[:half]).square().mean() / 2).backward()
        ((model(x[half:]) - y[half:]).square().mean() / 2).backward()
    else:
        (model(x) - y).square().mean().backward()
    opt.step()


def reference(e: int) -> dict[str, torch.Tensor]:
    net = _build(e)
    x, y = _data()
    _step(net, net, x, y, net.parameters())
    return _full_params(net)


def _rank_batch(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _data()
    n = GLOBAL // world
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def _ddp_runs(rank: int, world: int, experts: list[int]) -> dict:
    x, y = _rank_batch(rank, world)
    out = {}
    for e in experts:
        # E = 1: a softmax over one expert is constant, so autograd never reaches the
        # router weight; DDP then needs find_unused_parameters to complete its bucket.
        kw = {"find_unused_parameters": e == 1}
        # 1. plain DDP(model) after the helper, with gradient accumulation (no_sync)
        net = _build(e)
        am.exclude_experts_from_ddp(net)
        _step(net, DistributedDataParallel(net, **kw), x, y, net.parameters(), accumulate=True)
        out[("ddp", e)] = _full_params(net)
        # 2. parallelize(mode="ddp")
        net = _build(e)
        model = am.parallelize(net, mode="ddp", **kw)
        _step(net, model, x, y, net.parameters())
        out[("parallelize-ddp", e)] = _full_params(net)
        # 3. parallelize(mode="fsdp2"): dense parameters sharded, experts ignored
        net = _build(e)
        am.parallelize(net, mode="fsdp2")
        _step(net, net, x, y, am.param_groups(net))
        out[("fsdp2", e)] = _full_params(net)
        # 4. DDP built without the helper: refused at the first forward
        net = _build(e)
        try:
            DistributedDataParallel(net)(x)
            out[("unguarded", e)] = "no error"
        except RuntimeError as err:
            out[("unguarded", e)] = str(err)
    return out if rank == 0 else {k: v for k, v in out.items() if k[0] == "unguarded"}


@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,experts", [(2, [4, 1]), (4, [4, 2])])
def test_ddp_and_fsdp2_step_equals_one_process_on_the_global_batch(world, experts):
    results = run_distributed(_ddp_runs, world, (experts,), timeout=240)
    for e in experts:
        want = reference(e)
        for how in ("ddp", "parallelize-ddp", "fsdp2"):
            got = results[0][(how, e)]
            assert got.keys() == want.keys()
            for name in want:
                torch.testing.assert_close(
                    got[name], want[name], rtol=TOL, atol=TOL, msg=f"{how} E={e} {name}"
                )
        for r in range(world):
            assert "without ignoring the expert shards" in results[r][("unguarded", e)]

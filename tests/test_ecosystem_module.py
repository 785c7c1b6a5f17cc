"""Ordinary module behaviour of ``MoELayer``: ``copy.deepcopy`` at any time, ``.to(dtype)``
keeping the router fp32, ``torch.compile``, and activation checkpointing (the
recomputation replays the forward's strategy and is not counted again).

References: the original layer (a copy computes the same outputs and is independent of
it), the fp32 weights before conversion (bit-exact router), the eager layer (compiled
outputs and gradients), and the forward's own strategy record (checkpointing).
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import adaptive_moe as am
from adaptive_moe.runtime.dispatch.executor import Executor
from adaptive_moe.tuning.online import Exploration
from tests.dist_utils import run_distributed

pytestmark = pytest.mark.filterwarnings("ignore:MoELayer has no strategy table")

D, H, E, T = 8, 16, 4, 12


def _layer(**kw) -> am.MoELayer:
    torch.manual_seed(0)
    return am.MoELayer(D, H, E, top_k=2, **kw)


def test_deepcopy_after_a_training_forward_gives_an_independent_equal_layer():
    layer = _layer()
    x = torch.randn(T, D, requires_grad=True)
    y = layer(x)  # aux_loss, z_loss and the router logits now hold this graph
    twin = copy.deepcopy(layer)
    assert all(am.is_expert_param(p) for p in twin.experts.parameters())
    with torch.no_grad():
        assert torch.equal(twin(x), layer(x.detach()))
        twin.experts.down_proj.add_(1.0)
    assert not torch.equal(twin.experts.down_proj, layer.experts.down_proj)
    (y.sum() + layer.aux_loss).backward()  # the original's pending backward still runs
    assert layer.experts.down_proj.grad is not None and twin.experts.down_proj.grad is None


def test_deepcopy_of_a_wrapped_transformers_model_after_forward():
    pytest.importorskip("transformers")
    from tests.test_wrap import batch, build_model

    model = am.wrap(build_model("mixtral")).train()
    ids, _ = batch(2)
    loss = model(ids, labels=ids).loss  # its graph is held by the layers' aux losses
    twin = copy.deepcopy(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)
    loss.backward()  # the original's graph is intact


def _copy_on_ranks(rank: int, world: int, experts: int) -> bool:
    layer = am.MoELayer(D, H, experts, top_k=2)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    layer(x)
    twin = copy.deepcopy(layer)  # shares the process groups
    with torch.no_grad():
        return torch.equal(twin(x), layer(x))


@pytest.mark.dist
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("world", "experts"), [(2, 4), (4, 2)])  # E >= W; E < W (sliced)
def test_deepcopy_on_w_ranks_shares_the_groups(world, experts):
    assert run_distributed(_copy_on_ranks, world, (experts,), timeout=90) == [True] * world


def test_to_bfloat16_keeps_the_router_fp32_and_exact():
    layer = _layer()
    router = layer.router.weight.detach().clone()
    w1 = layer.experts.gate_up_proj
    layer.to(torch.bfloat16)
    assert layer.router.weight.dtype == torch.float32
    assert torch.equal(layer.router.weight, router)  # not rounded through bf16
    assert layer.experts.gate_up_proj is w1 and w1.dtype == torch.bfloat16
    x = torch.randn(T, D)
    fp32 = copy.deepcopy(layer).float()
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), fp32(x), rtol=0, atol=3e-2)
    layer.half()
    assert layer.router.weight.dtype == torch.float32 and w1.dtype == torch.float16


def _assert_same_step(xc, yc, layer, x, y, eager) -> None:
    """The compiled layer's output and every gradient of a backward equal eager's."""
    torch.testing.assert_close(yc, y, rtol=1e-6, atol=1e-6)
    yc.square().sum().backward()
    y.square().sum().backward()
    torch.testing.assert_close(xc.grad, x.grad, rtol=1e-5, atol=1e-6)
    for a, b in zip(layer.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_torch_compile_matches_eager_and_compile_time_stays_out_of_stats():
    eager, layer = _layer(), _layer()
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(T, D, requires_grad=True)
    xc = x.detach().clone().requires_grad_(True)
    started = time.perf_counter()
    yc = compiled(xc)
    first_call_ms = (time.perf_counter() - started) * 1e3
    _assert_same_step(xc, yc, layer, x, eager(x), eager)
    for _ in range(3):
        compiled(xc)
    (stats,) = layer.stats().values()
    assert stats["count"] == 4
    assert 1 <= stats["timed"] <= 3  # the compiling (first) call is counted, not timed
    assert stats["mean_ms"] < first_call_ms / 5, (stats, first_call_ms)


@pytest.mark.parametrize("kernel", ["loop", "bmm", "grouped_mm"])
def test_torch_compile_with_a_forced_strategy_matches_eager(kernel):
    # dynamo could not rebuild the strategy list's frozen dataclasses across the count
    # exchange's graph break (InternalTorchDynamoError) before that exchange ran eagerly
    eager, layer = _layer(), _layer()
    strategy = am.Strategy(kernel=kernel)
    compiled = torch.compile(lambda x: layer(x, strategy=strategy), backend="aot_eager")
    x = torch.randn(T, D, requires_grad=True)
    xc = x.detach().clone().requires_grad_(True)
    _assert_same_step(xc, compiled(xc), layer, x, eager(x, strategy=strategy), eager)
    assert layer.last_strategy == strategy


@pytest.mark.parametrize("train", [True, False])
def test_torch_compile_under_no_grad_matches_eager(train):
    # the static inference forward (no graph recorded) failed to compile (dynamo:
    # "frozenset not in co_names") before it ran eagerly like the training dispatch
    eager, layer = _layer(), _layer()
    eager.train(train)
    layer.train(train)
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(T, D)
    with torch.no_grad():
        for _ in range(2):  # the second call runs the compiled frames
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-6, atol=1e-6)


class _Recording(Executor):
    """The layer's executor, noting the strategy of each dispatch it hands out."""

    def __init__(self, *args):
        super().__init__(*args)
        self.seen = []

    def dispatcher(self, strategy):
        self.seen.append(strategy)
        return super().dispatcher(strategy)


def _checkpointed(rank: int, world: int, reentrant: bool, experts: int) -> dict:
    from tests.test_auto_switch import _synthetic_table

    torch.manual_seed(0)
    layer = am.MoELayer(D, H, experts, 2, explore=Exploration(every=2, candidates=3))
    layer.use_table(_synthetic_table(layer))
    layer.executor = _Recording(layer.expert_cfg, layer.layout, layer.mesh)
    seen = layer.executor.seen
    pairs = []
    for step in range(4):
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(10 * step + rank))
        x.requires_grad_(True)
        y = checkpoint(layer, x, use_reentrant=reentrant)
        forward = seen[-1]
        y.square().sum().backward()
        pairs.append((str(forward), str(seen[-1]), len(seen)))
    counted = sum(v["count"] for v in layer.stats().values())
    return {"pairs": pairs, "counted": counted}


@pytest.mark.dist
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("world", "experts", "reentrant"), [(2, 4, False), (2, 4, True), (4, 2, False)]
)  # E >= W both ways; E < W (hidden-sliced experts)
def test_activation_checkpointing_replays_the_forwards_strategy_uncounted(
    world, experts, reentrant
):
    for res in run_distributed(_checkpointed, world, (reentrant, experts), timeout=90):
        forwards = [f for f, _, _ in res["pairs"]]
        assert len(set(forwards)) >= 2, "exploration did not vary the strategy"
        for forward, recomputed, _ in res["pairs"]:
            assert recomputed == forward
        assert [runs for _, _, runs in res["pairs"]] == [2, 4, 6, 8]  # forward + recompute
        assert res["counted"] == 4

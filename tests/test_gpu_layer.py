"""MoELayer on CUDA: every kernel and dtype against the float64 CPU reference, and every
strategy on an NCCL process group of world size 1. Skipped without CUDA.

Tolerances (relative Frobenius error of outputs and gradients): bf16 <= 2e-2,
fp16 <= 5e-3, fp32 <= 5e-3 (fp32 matrix products may run on tf32 units).
"""

from __future__ import annotations

import datetime
import warnings

import pytest
import torch
import torch.distributed as dist

import adaptive_moe as am
from tests.dist_utils import free_port
from tests.reference import experts_forward, full_weights, rel_err, route

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 5e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _check(layer, x, strategy, tol):
    w = full_weights(layer)  # float64 copies
    ecfg = layer.expert_cfg
    xr = x.detach().cpu().double().requires_grad_(True)
    ids, gates, *_ = route(xr, w, k=layer.router_cfg.top_k)
    ref = experts_forward(xr, ids, gates, w, glu=ecfg.glu, activation=ecfg.activation)
    xl = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(xl, strategy=strategy)
    g = torch.randn_like(y)
    (y.float() * g.float()).sum().backward()
    (ref * g.cpu().double()).sum().backward()
    errs = {
        "y": rel_err(y.cpu(), ref),
        "grad x": rel_err(xl.grad.cpu(), xr.grad),
        "grad w1": rel_err(layer.experts.w1.grad.cpu(), w.w1.grad),
        "grad w2": rel_err(layer.experts.down_proj.grad.cpu(), w.w2.grad),
    }
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"{strategy} {x.dtype}: {bad}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("glu", [True, False])
@pytest.mark.parametrize("shape", [(256, 64, 128, 8, 2), (333, 600, 100, 16, 3)])
def test_every_kernel_on_cuda(dtype, glu, shape):
    t, d, h, e, k = shape
    torch.manual_seed(0)
    layer = am.MoELayer(
        d, h, e, k, glu=glu, activation="silu" if glu else "gelu", dtype=dtype, device="cuda"
    )
    x = torch.randn(t, d, device="cuda", dtype=dtype)
    for strategy in layer.strategies():
        _check(layer, x, strategy, TOL[dtype])


def test_every_strategy_on_nccl_world_size_one():
    if dist.is_initialized():
        pytest.skip("a process group already exists")
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        torch.manual_seed(0)
        warnings.simplefilter("ignore")
        layer = am.MoELayer(64, 128, 8, 2, dtype=torch.bfloat16, device="cuda")
        assert layer.mesh is not None and layer.mesh.world == 1
        strategies = layer.strategies()
        assert {s.r for s in strategies} == {0, 1} and {s.degree for s in strategies} == {
            1,
            2,
            4,
            8,
        }
        x = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16)
        for strategy in strategies:
            _check(layer, x, strategy, TOL[torch.bfloat16])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_attention_gqa_on_cuda(dtype):
    """The model's grouped-query attention on CUDA (fp32 widens k and v for the fused
    kernel, 16-bit passes enable_gqa) against the same module in float64 on CPU."""
    from adaptive_moe.training.model import Attention, ModelConfig

    cfg = ModelConfig(d_model=128, n_heads=8, n_kv_heads=2, max_seq_len=64)
    torch.manual_seed(0)
    ref = Attention(cfg, torch.device("cpu")).double()
    gpu = Attention(cfg, torch.device("cuda")).to(dtype)
    gpu.load_state_dict(ref.state_dict())
    x = torch.randn(2, 64, 128, dtype=torch.float64, requires_grad=True)
    xg = x.detach().to("cuda", dtype).requires_grad_(True)
    y_ref, y = ref(x), gpu(xg)
    g = torch.randn_like(y_ref)
    (y_ref * g).sum().backward()
    (y.float() * g.to("cuda", torch.float32)).sum().backward()
    assert rel_err(y.cpu(), y_ref) < TOL[dtype]
    assert rel_err(xg.grad.cpu(), x.grad) < TOL[dtype]


def test_no_table_measures_the_kernel_once_and_stays_correct():
    """Without a table, the first call times scatter and grouped_mm on its own problem,
    runs the faster one (correct against float64) and keeps it for the workload key;
    the measurement passes are not counted in the layer's statistics."""
    torch.manual_seed(0)
    layer = am.MoELayer(256, 512, 8, 2, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check(layer, x, None, TOL[torch.bfloat16])
        ((key, times),) = layer.kernel_choice.times.items()
        assert set(times) == {"scatter", "grouped_mm"} and all(t > 0 for t in times.values())
        assert layer.last_strategy.kernel == min(times, key=times.get)
        assert layer.stats()[layer.last_strategy]["count"] == 1
        layer(x)  # same workload key: no second measurement
    assert list(layer.kernel_choice.times) == [key]
    assert layer.stats()[layer.last_strategy]["count"] == 2


def test_one_process_training_step_never_syncs_and_matches_counted():
    """After the first call, a one-process training forward + backward with the
    measured kernel (scatter or grouped_mm: both read device offsets when nothing is
    dropped) issues no device-to-host synchronisation, and computes what the counted
    forward (host counts) computes with that kernel (scatter: bit for bit)."""
    torch.manual_seed(0)
    layer = am.MoELayer(256, 128, 64, 8, dtype=torch.bfloat16, device="cuda", bias=True)
    x = torch.randn(2048, 256, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)

    def step(lagged: bool):
        if not lagged:  # no previous workload: the forward counts on the host
            layer.policy.workload = type(layer.policy.workload)()
        layer.zero_grad(set_to_none=True)
        xl = x.clone().requires_grad_(True)
        y = layer(xl)
        (y.float() * g.float()).sum().backward()
        return [y.detach(), xl.grad, *(p.grad for p in layer.parameters())]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counted = step(lagged=False)  # measures scatter and grouped_mm, keeps the faster
        assert layer.policy.replay.recorded("path")[-1] is None
        step(lagged=True)  # warm-up of the device-grouped path
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            grouped = step(lagged=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert layer.policy.replay.recorded("path")[-1] == layer.last_strategy
    for a, b in zip(grouped, counted, strict=True):
        if layer.last_strategy.kernel == "scatter":  # the same launches on the same rows
            assert torch.equal(a, b)
        else:  # grouped_mm: its buffer is sized by a bound, so the GEMM shapes differ
            assert rel_err(a.float().cpu(), b.float().cpu()) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("kernel", ["grouped_mm", "scatter"])
def test_forced_kernel_on_device_grouped_rows(kernel):
    """A forced kernel that can read device offsets runs device-grouped from the first
    call (correct against float64, biases included) and its next step never syncs."""
    torch.manual_seed(1)
    layer = am.MoELayer(256, 128, 16, 4, dtype=torch.bfloat16, device="cuda", bias=True)
    x = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16)
    strategy = am.Strategy(kernel=kernel)
    _check(layer, x, strategy, TOL[torch.bfloat16])
    assert layer.policy.replay.recorded("path")[-1] == strategy
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x.clone().requires_grad_(True), strategy=strategy).float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("glu, bias", [(True, False), (False, True)])
def test_compiled_experts_on_cuda(glu, bias):
    """compile_experts="inductor": the grouped_mm experts as one generated graph are
    correct against float64 (biases included), the default strategy switches to them
    from the second call, and a compiled step never syncs with the host."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(2)
    layer = am.MoELayer(
        256, 128, 16, 4, glu=glu, activation="silu" if glu else "gelu", bias=bias,
        dtype=torch.bfloat16, device="cuda", compile_experts="inductor",
    )  # fmt: skip
    x = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16)
    strategy = am.Strategy(kernel="grouped_mm")
    _check(layer, x, strategy, TOL[torch.bfloat16])
    assert counters["stats"]["unique_graphs"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # the first measures the default kernel on host counts
            layer(x.clone().requires_grad_(True)).float().sum().backward()
    assert layer.last_strategy.kernel == "grouped_mm"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x.clone().requires_grad_(True)).float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert counters["stats"]["unique_graphs"] == 1

"""The inference path on CUDA: CUDA-graph capture and replay on new tokens equal the
training forward, and the forward issues no host synchronisation. Skipped without CUDA.

Tolerance: bf16, relative Frobenius error <= 2e-2 against the training forward of the same
tokens (both round the expert products to bf16; the kernels may sum in other orders).
"""

from __future__ import annotations

import pytest
import torch

import adaptive_moe as am
from adaptive_moe.runtime.inference import InferenceConfig
from tests.reference import rel_err

pytestmark = pytest.mark.gpu
TOL = 2e-2


def _layer(d: int, h: int, e: int, k: int, cf: float, bias: bool) -> am.MoELayer:
    torch.manual_seed(0)
    layer = am.MoELayer(d, h, e, k, capacity_factor=cf, bias=bias, dtype=torch.bfloat16,
                        device="cuda").eval()  # fmt: skip
    return layer.requires_grad_(False)


def _training_forward(layer: am.MoELayer, x: torch.Tensor, strategy: am.Strategy) -> torch.Tensor:
    saved = layer.inference
    layer.inference = InferenceConfig(mode="off")
    try:
        with torch.no_grad():
            return layer(x, strategy=strategy)
    finally:
        layer.inference = saved


SMALL, FINE, MID = (256, 512, 8, 2), (128, 256, 64, 8), (256, 384, 16, 4)


# (kernel, shape, capacity factor, bias, T): both kernels, k up to 8, every capacity mode.
@pytest.mark.parametrize(
    "kernel,shape,cf,bias,t",
    [("gemv", SMALL, 0.0, False, 1), ("gemv", SMALL, 0.0, False, 16),
     ("gemv", FINE, 1.0, True, 100), ("gemv", MID, -0.5, False, 16),
     ("scatter", SMALL, 0.0, False, 16), ("scatter", FINE, 1.0, True, 1)],
)  # fmt: skip
def test_graph_replay_matches_training_forward(kernel, shape, cf, bias, t):
    d, h, e, k = shape
    layer = _layer(d, h, e, k, cf, bias)
    strategy = am.Strategy(kernel=kernel)
    xs = [torch.randn(t, d, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    static_x = xs[0].clone()
    # no_grad, not inference_mode: the graph's output is poisoned in place below.
    with torch.no_grad():
        for x in xs[:2]:  # compile and autotune before capture
            layer(x, strategy=strategy)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x, strategy=strategy)
    for x in xs[1:]:
        static_y.fill_(float("nan"))  # poison: the replay must write every element
        static_x.copy_(x)
        graph.replay()
        ref = _training_forward(layer, x, strategy)
        assert torch.isfinite(static_y).all()
        assert rel_err(static_y.float(), ref.float()) <= TOL, (kernel, shape, cf, t)


@pytest.mark.parametrize("kernel", ["gemv", "scatter"])
def test_inference_forward_issues_no_host_sync(kernel):
    layer = _layer(*MID, 1.0, True)
    strategy = am.Strategy(kernel=kernel)
    x = torch.randn(16, MID[0], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x, strategy=strategy)  # warm-up: autotuning synchronises
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = layer(x, strategy=strategy)
            # The check can fail: the training path with a kernel that needs host
            # counts (bmm) copies them to the host.
            layer.inference = InferenceConfig(mode="off")
            with pytest.raises(RuntimeError, match="synchroniz"):
                layer(x, strategy=am.Strategy(kernel="bmm"))
        finally:
            torch.cuda.set_sync_debug_mode("default")
            layer.inference = InferenceConfig()
    ref = _training_forward(layer, x, strategy)
    assert rel_err(y.float(), ref.float()) <= TOL


def test_gemv_kernel_trains_like_scatter():
    """``gemv`` on the kernel axis: its forward (and scatter's backward) in training."""
    torch.manual_seed(0)
    layer = am.MoELayer(*MID, bias=True, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(40, MID[0], device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    out = {}
    for kernel in ("scatter", "gemv"):
        layer.zero_grad(set_to_none=True)
        xl = x.clone().requires_grad_(True)
        y = layer(xl, strategy=am.Strategy(kernel=kernel))
        (y.float() * g.float()).sum().backward()
        out[kernel] = (y, xl.grad, layer.experts.w1.grad, layer.experts.down_proj.grad)
    for a, b in zip(out["scatter"], out["gemv"]):
        assert rel_err(b.float(), a.float()) <= TOL


def test_gemv_remembered_config_launches_like_the_autotuner():
    """``launch_gemv(configs=...)``: the first launch autotunes and stores the choice,
    the second launches that config directly (no autotuner wrapper): both equal the
    checked ``grouped_gemv`` bit for bit, and only routed rows are written."""
    from adaptive_moe.runtime.inference.rows import group_static
    from csrc_triton.gemv import grouped_gemv, launch_gemv

    g = torch.Generator(device="cuda").manual_seed(0)
    e, n, kd, fan_out, tokens = 16, 384, 256, 4, 24
    ids = torch.randint(-1, e, (tokens * fan_out,), device="cuda", generator=g)
    rows = group_static(ids, e, fan_out)
    x = torch.randn(tokens, kd, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(e, n, kd, device="cuda", dtype=torch.bfloat16, generator=g)
    args = (x, w, None, rows.sorted_slots, rows.offsets)
    kw = dict(fan_out=fan_out, num_slots=tokens * fan_out, x_grouped=False, y_grouped=False)
    ref = grouped_gemv(*args, **kw)
    configs: dict = {}
    outs = []
    for _ in range(2):
        out = torch.full_like(ref, float("nan"))
        launch_gemv(*args, out=out, **kw, precision="tf32", configs=configs)
        outs.append(out)
    assert len(configs) == 1
    routed = rows.sorted_slots[: int(rows.offsets[-1])]
    unrouted = torch.ones(ref.shape[0], dtype=torch.bool, device="cuda")
    unrouted[routed] = False
    for out in outs:
        assert torch.equal(out[routed], ref[routed])
        assert out[unrouted].isnan().all()


def test_layer_graph_cache_replays_new_tokens():
    """``InferenceConfig(cuda_graph_tokens=N)``: call 1 eager, call 2 captures, later calls
    replay; every output (a copy, not the graph's buffer) and the losses read after it
    equal the training forward of the same tokens; another T gets its own graph."""
    layer = _layer(*FINE, 1.0, True)
    layer.inference = InferenceConfig(cuda_graph_tokens=64)
    strategy = am.Strategy(kernel="gemv")
    with torch.no_grad():
        outs = []
        for i in range(5):
            t = 16 if i < 4 else 8
            x = torch.randn(t, FINE[0], device="cuda", dtype=torch.bfloat16)
            y = layer(x, strategy=strategy)
            aux, z = layer.aux_loss.clone(), layer.z_loss.clone()
            outs.append(y)
            ref = _training_forward(layer, x, strategy)
            assert rel_err(y.float(), ref.float()) <= TOL, i
            assert rel_err(aux, layer.aux_loss) <= 1e-5 and rel_err(z, layer.z_loss) <= 1e-5
            assert len(layer._static_path.graphs) == (0 if i == 0 else 1), i  # T 8: first sighting
        assert outs[2].data_ptr() != outs[3].data_ptr()  # copies of the graph's output
        y16 = layer(x16 := torch.randn(16, FINE[0], device="cuda", dtype=torch.bfloat16),
                    strategy=strategy)  # fmt: skip
        layer.experts.down_proj.data = layer.experts.down_proj.data * 2  # a new tensor
        y2 = layer(x16, strategy=strategy)  # graphs dropped: eager on the new weights
        assert len(layer._static_path.graphs) == 0
        ref = _training_forward(layer, x16, strategy)
        assert rel_err(y2.float(), ref.float()) <= TOL < rel_err(y2.float(), y16.float())


def test_layer_graph_cache_stays_out_of_a_users_capture():
    """Inside the caller's own capture the layer captures nothing itself (no nesting);
    the caller's replay on new tokens is still right."""
    layer = _layer(*SMALL, 0.0, False)
    layer.inference = InferenceConfig(cuda_graph_tokens=64)
    strategy = am.Strategy(kernel="gemv")
    xs = [torch.randn(16, SMALL[0], device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    static_x = xs[0].clone()
    with torch.no_grad():
        layer(xs[0], strategy=strategy)  # first sighting: eager, compiles
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x, strategy=strategy)
        assert len(layer._static_path.graphs) == 0
        static_x.copy_(xs[2])
        graph.replay()
        ref = _training_forward(layer, xs[2], strategy)
    assert rel_err(static_y.float(), ref.float()) <= TOL

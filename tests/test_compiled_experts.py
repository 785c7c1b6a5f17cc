"""``MoELayer(compile_experts=...)``: the one-process training forward's grouped_mm
experts as one ``torch.compile`` graph (``runtime.inference.compiled``).

* ``grouped_mm_moe`` run eagerly (the function the compiler traces) equals the float64
  per-expert loop of ``tests/reference.py`` -- output and the gradients of x, the gates
  and every weight and bias -- in fp32 (relative error <= 1e-5), GLU and plain experts,
  with an expert that gets no row and odd T.
* A layer built with ``compile_experts="aot_eager"`` (the compiler's graphs and autograd
  split, run by eager ops) equals the same layer built without it, in bf16 on CPU:
  output, aux and z losses and every gradient; the graph is really traced (dynamo's
  counters), once for all layers of one shape; the default strategy switches to
  grouped_mm from the second forward (not over a table's choice); activation
  checkpointing recomputes through the graph; fp32 masters under autocast (the graph
  casts them) give the eager layer's fp32 gradients; capacity drops and fp32 weights fall back
  to the eager path; a copy shares the compiled function.
* ``"inductor"`` (generated C++ kernels on CPU) agrees with eager to bf16 rounding.
* A bad backend name is a ValueError naming ``compile_experts``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

import adaptive_moe as am
from adaptive_moe.runtime.inference.compiled import grouped_mm_moe
from adaptive_moe.tuning.table import Measurement, StrategyTable
from tests.reference import RefWeights, experts_forward, rel_err

D, H, E, K = 16, 24, 5, 2
GROUPED = am.Strategy(kernel="grouped_mm")
BF16_TOL = 2e-2  # bf16 inputs, fp32 accumulation: a few units of bf16's 2^-8


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("glu, bias", [(True, False), (False, True)])
def test_traced_function_equals_reference(glu: bool, bias: bool) -> None:
    g = torch.Generator().manual_seed(3)
    t, rows = 13, 2 * H if glu else H
    ids = torch.randint(0, E, (t, K), generator=g)
    ids[ids == 1] = 4  # expert 1 gets no row
    ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 2) % E, ids[:, 1])
    ids[ids == 1] = 0
    leaves = {
        "x": torch.randn(t, D, generator=g),
        "gates": torch.rand(t, K, generator=g),
        "w1": torch.randn(E, rows, D, generator=g) / D**0.5,
        "b1": torch.randn(E, rows, generator=g) if bias else None,
        "w2": torch.randn(E, D, H, generator=g) / H**0.5,
        "b2": torch.randn(E, D, generator=g) if bias else None,
    }
    grad_y = torch.randn(t, D, generator=g)

    def run(dtype):
        return {n: None if a is None else a.to(dtype, copy=True).requires_grad_(True)
                for n, a in leaves.items()}  # fmt: skip

    ours = run(torch.float32)
    y = grouped_mm_moe(ours["x"], ids, ours["gates"], ours["w1"], ours["b1"], ours["w2"],
                       ours["b2"], glu, "silu")  # fmt: skip
    y.backward(grad_y)
    ref = run(torch.float64)
    w = RefWeights(None, ref["w1"], ref["w2"], ref["b1"], ref["b2"])
    want = experts_forward(ref["x"], ids, ref["gates"], w, glu=glu, activation="silu")
    want.backward(grad_y.double())
    assert rel_err(y.detach(), want.detach()) <= 1e-5
    for name, leaf in ours.items():
        if leaf is not None:
            assert rel_err(leaf.grad, ref[name].grad) <= 1e-5, name


def make(seed: int = 0, **kw) -> am.MoELayer:
    torch.manual_seed(seed)
    kw = {"glu": True, "dtype": torch.bfloat16, **kw}
    return am.MoELayer(D, H, E, K, **kw)


def step(layer: am.MoELayer, x: torch.Tensor, **call) -> list[torch.Tensor]:
    """Output, losses and the gradients of a loss of all three w.r.t. x and every weight."""
    x = x.clone().requires_grad_(True)
    y = layer(x, **call)
    loss = (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
    loss = loss + layer.aux_loss + 0.1 * layer.z_loss
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params])
    return [y.detach(), layer.aux_loss.detach(), layer.z_loss.detach(), *grads]


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor], tol: float) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert rel_err(a.float(), b.float()) <= tol, f"tensor {i}: {rel_err(a, b)}"


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def tokens(t: int = 19, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, D, generator=g).to(torch.bfloat16)


@pytest.mark.parametrize("glu, bias", [(True, False), (False, True)])
def test_layer_equals_eager(glu: bool, bias: bool) -> None:
    x = tokens()
    eager = step(make(glu=glu, bias=bias, activation="gelu"), x, strategy=GROUPED)
    compiled = make(glu=glu, bias=bias, activation="gelu", compile_experts="aot_eager")
    assert graphs() == 0
    got = step(compiled, x, strategy=GROUPED)
    assert graphs() == 1  # traced, fwd + bwd in one graph
    assert_same(got, eager, 1e-6)  # the same ops, run eagerly by aot_eager
    assert compiled.last_strategy == GROUPED
    # Another layer of the same shape reuses the graph; another T traces a new one.
    other = make(seed=5, glu=glu, bias=bias, activation="gelu", compile_experts="aot_eager")
    step(other, x, strategy=GROUPED)
    assert graphs() == 1
    step(other, tokens(t=7), strategy=GROUPED)
    assert graphs() == 2


def test_fp32_masters_under_autocast() -> None:
    """As the trainer runs bf16: fp32 weights and input under autocast(bf16). The graph
    casts them itself; output, losses and the fp32 gradients of the masters equal the
    eager layer's."""
    x = tokens().float()
    results = []
    for backend in (None, "aot_eager"):
        layer = make(dtype=torch.float32, bias=True, compile_experts=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(step(layer, x, strategy=GROUPED))
        assert all(p.grad is None for p in layer.parameters())  # autograd.grad, not .grad
    assert graphs() == 1
    assert_same(results[1], results[0], 1e-6)
    assert all(g.dtype == torch.float32 for g in results[1][3:])


def test_default_strategy_prefers_compiled_grouped_mm() -> None:
    layer = make(compile_experts="aot_eager")
    x = tokens()
    step(layer, x)  # no previous workload: the counted path, the device's default kernel
    assert layer.last_strategy.kernel != "grouped_mm" and graphs() == 0
    step(layer, x)
    assert layer.last_strategy.kernel == "grouped_mm" and graphs() == 1
    # A table's choice is kept.
    table = StrategyTable(layer.fingerprint(), layer.layer_shape())
    how = Measurement(repeats=1, warmup=0, timer="perf_counter", tokens_per_rank=len(x),
                      max_tokens=1, skew=1.0, date="2026-12-07T00:00:00Z")  # fmt: skip
    loop = am.Strategy(kernel="loop")
    table.add_bucket(0, {loop: 1.0, GROUPED: 2.0}, how)
    layer.use_table(table)
    step(layer, x)
    assert layer.last_strategy.kernel == "loop"


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(use_reentrant: bool) -> None:
    """The gradients of the output's loss (the losses of a reentrant checkpoint's
    forward carry none) equal an uncheckpointed eager layer's. Non-reentrant: forward and
    recomputation run the graph. Reentrant: the forward runs without grad (the inference
    path), and so its recomputation takes the counted path."""
    x = tokens()
    results = []
    for layer, ckpt in ((make(), False), (make(compile_experts="aot_eager"), True)):
        x2 = x.clone().requires_grad_(True)
        call = lambda v, layer=layer: layer(v, strategy=GROUPED)
        y = checkpoint(call, x2, use_reentrant=use_reentrant) if ckpt else call(x2)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y.detach(), x2.grad, *(p.grad for p in layer.experts.parameters())])
    assert_same(results[1], results[0], 1e-6)
    assert graphs() == (0 if use_reentrant else 1)


def test_falls_back_to_eager() -> None:
    x = tokens()
    # Capacity drops: slots go unrouted, which the compiled graph does not take.
    want = step(make(capacity_factor=1.0), x, strategy=GROUPED)
    got = step(make(capacity_factor=1.0, compile_experts="aot_eager"), x, strategy=GROUPED)
    assert_same(got, want, 1e-6)
    # fp32 compute: torch's grouped GEMM traces in bf16 only.
    x32 = x.float()
    want = step(make(dtype=torch.float32), x32, strategy=GROUPED)
    got = step(make(dtype=torch.float32, compile_experts="aot_eager"), x32, strategy=GROUPED)
    assert_same(got, want, 1e-6)
    assert graphs() == 0


def test_copy_shares_compiled_function() -> None:
    layer = make(compile_experts="aot_eager")
    twin = copy.deepcopy(layer)
    assert twin._device_grouped.compiled is layer._device_grouped.compiled
    assert_same(step(twin, tokens(), strategy=GROUPED), step(layer, tokens(), strategy=GROUPED), 0)


@pytest.mark.slow
def test_inductor_agrees_with_eager() -> None:
    x = tokens(t=33)
    want = step(make(bias=True), x, strategy=GROUPED)
    got = step(make(bias=True, compile_experts="inductor"), x, strategy=GROUPED)
    assert graphs() == 1
    assert_same(got, want, BF16_TOL)


def test_bad_backend() -> None:
    with pytest.raises(ValueError, match="compile_experts must be one of"):
        make(compile_experts="tensorrt")

"""Issue 16's layer features against independent references: the dynamic capacity factor
(the formula written out, the float64 reference router), router options (gate noise,
cosine router, scaling before the experts, the k = 1 gate), any elementwise activation.

Tolerance: fp32 layer vs float64 reference, relative Frobenius error <= 1e-5."""

from __future__ import annotations

import math

import pytest
import torch

import adaptive_moe as am
from adaptive_moe.runtime.routing.router import capacity
from tests.reference import RefWeights, experts_forward, full_weights, rel_err, route

FP32_TOL = 1e-5
D, H = 16, 24


def make_layer(**kw) -> am.MoELayer:
    torch.manual_seed(kw.pop("seed", 0))
    layer = am.MoELayer(D, H, **kw)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)  # larger than the init, so routing is decisive
    return layer


# ---- dynamic capacity factor ------------------------------------------------------------


def test_capacity_formula_written_out():
    """C = min(T, max(1, ceil(|f| k T / E))); the two cases where Tutel's
    k * int(f * ceil(T / E)) differs, in both directions."""
    assert capacity(1.25, 10, 2, 4) == 7  # Tutel: 2 * int(1.25 * 3) = 6
    assert capacity(1.0, 9, 2, 4) == 5  # Tutel: 2 * int(1.0 * 3) = 6
    assert capacity(-1.25, 10, 2, 4) == 7
    assert capacity(0.0, 10, 2, 4) is None
    assert capacity(0.01, 10, 1, 4) == 1  # at least 1
    assert capacity(100.0, 10, 2, 4) == 10  # at most T
    for f in (0.1, 0.5, 1.0, 1.5, 3.3):
        for t, k, e in ((1, 1, 1), (37, 2, 4), (256, 3, 16), (5, 1, 8)):
            want = min(t, max(1, math.ceil(f * k * t / e)))
            assert capacity(f, t, k, e) == want


def _reference_output(layer, x, k, capacity_factor):
    ecfg = layer.expert_cfg
    w = full_weights(layer)
    xr = x.double()
    ids, gates, *_ = route(xr, w, k=k, capacity_factor=capacity_factor)
    return ids, experts_forward(xr, ids, gates, w, glu=ecfg.glu, activation=ecfg.activation)


@pytest.mark.parametrize("built,called", [(1.0, 0.0), (0.0, 0.5), (0.0, -0.5), (2.0, 0.25)])
def test_capacity_factor_per_call_matches_the_reference(built, called):
    """The override has the same three semantics as the constructor's factor (0 passed
    per call really means dropless: Tutel's bug #303 ignored a falsy 0)."""
    layer = make_layer(num_experts=4, top_k=2, capacity_factor=built)
    x = torch.randn(64, D)
    ids, ref = _reference_output(layer, x, 2, called)
    y = layer(x, capacity_factor=called)
    assert rel_err(y, ref) <= FP32_TOL
    kept = torch.bincount(ids[ids >= 0], minlength=4)
    cap = capacity(called, 64, 2, 4)
    if cap is None:
        assert (ids >= 0).all()
    else:
        assert int(kept.max()) <= cap and (ids < 0).any()
    assert layer.router_cfg.capacity_factor == built  # the layer's own is untouched
    _, ref_built = _reference_output(layer, x, 2, built)
    assert rel_err(layer(x), ref_built) <= FP32_TOL


def test_capacity_factor_and_top_k_together():
    layer = make_layer(num_experts=8, top_k=2)
    x = torch.randn(40, D)
    _, ref = _reference_output(layer, x, 3, 0.75)
    assert rel_err(layer(x, top_k=3, capacity_factor=0.75), ref) <= FP32_TOL


@pytest.mark.parametrize("bad", ["1", 1e30, float("nan"), True])
def test_capacity_factor_per_call_is_checked(bad):
    layer = make_layer(num_experts=4, top_k=2)
    with pytest.raises(ValueError, match=r"capacity_factor must be (a number|finite)"):
        layer(torch.randn(4, D), capacity_factor=bad)


# ---- the k = 1 gate ---------------------------------------------------------------------


def _task_grad(layer, x, **call):
    """Router gradient of a task loss alone (no auxiliary loss), and the output."""
    layer.zero_grad(set_to_none=True)
    y = layer(x, **call)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return layer.router.weight.grad, y


@pytest.mark.parametrize("built_k", [1, 2])
def test_switch_gate_at_k1_gives_the_router_a_task_gradient(built_k):
    """Switch / GShard: at k = 1 the gate is the raw probability p, so d(task)/d(router)
    is not zero, and it equals the float64 reference's (gates = p, no renormalising)."""
    layer = make_layer(num_experts=4, top_k=built_k)  # renormalize=True, the default
    x = torch.randn(37, D)
    grad, y = _task_grad(layer, x, top_k=1)
    assert grad is not None and grad.abs().max() > 1e-3
    w = full_weights(layer)
    ids, gates, *_ = route(x.double(), w, k=1, renormalize=False)
    ref = experts_forward(x.double(), ids, gates, w, glu=True, activation="silu")
    (ref * torch.linspace(-1, 1, ref.numel()).view_as(ref).double()).sum().backward()
    assert rel_err(y, ref) <= FP32_TOL
    assert rel_err(grad, w.router.grad) <= FP32_TOL


def test_gate_one_at_k1_gives_the_router_no_task_gradient():
    layer = make_layer(num_experts=4, top_k=1, top1_gate="one")
    grad, _ = _task_grad(layer, torch.randn(37, D))
    assert grad is None or torch.count_nonzero(grad) == 0  # p / p = 1: no path to the router
    w = full_weights(layer)
    _, gates, *_ = route(torch.randn(1, D).double(), w, k=1, top1_gate="one")
    assert torch.equal(gates, torch.ones_like(gates))


# ---- gate noise -------------------------------------------------------------------------


def _noisy_reference(layer, x, kind, eps, seed):
    """The formula of each noise kind written out in float64 (the noise drawn in fp32
    with the same generator calls, then widened)."""
    w = full_weights(layer)
    e = layer.router_cfg.num_experts
    k = layer.router_cfg.top_k
    torch.manual_seed(seed)
    xr = x.double()
    xin = xr
    if kind == "jitter":
        xin = xr * torch.empty_like(x).uniform_(1 - eps, 1 + eps).double()
    logits = xin @ w.router.T
    if kind == "gaussian":
        logits = logits + torch.randn(logits.shape).double() * eps / e
    scores = torch.softmax(logits, -1)
    choice = scores
    if kind == "rsample":
        gumbel = -torch.empty(logits.shape).exponential_().log().double()
        choice = torch.softmax(logits + eps * gumbel, -1)
    ids = torch.topk(choice, k, -1).indices
    gates = scores.gather(1, ids)
    gates = gates / gates.sum(-1, keepdim=True)
    return experts_forward(xr, ids, gates, w, glu=True, activation="silu"), ids


@pytest.mark.parametrize(
    "kind,eps", [("jitter", 0.3), ("rsample", 1.0), ("gaussian", 40.0), ("jitter", None)]
)
def test_gate_noise_in_training_and_off_in_eval(kind, eps):
    layer = make_layer(num_experts=8, top_k=2, gate_noise=kind, noise_scale=eps)
    eps = layer.router_cfg.noise_eps
    x = torch.randn(64, D)
    layer.train()
    torch.manual_seed(123)
    y = layer(x)
    ref, ids = _noisy_reference(layer, x, kind, eps, 123)
    assert rel_err(y, ref) <= FP32_TOL
    clean, clean_ids = _noisy_reference(layer, x, "none", eps, 0)
    assert not torch.equal(ids, clean_ids), "the noise changed no selection"
    layer.eval()
    assert rel_err(layer(x), clean) <= FP32_TOL


def test_gate_noise_defaults_and_validation():
    assert am.MoELayer(D, H, 4, 2, gate_noise="jitter").router_cfg.noise_eps == 1e-2
    assert am.MoELayer(D, H, 4, 2, gate_noise="rsample").router_cfg.noise_eps == 1.0
    with pytest.raises(ValueError, match="gate_noise"):
        am.MoELayer(D, H, 4, 2, gate_noise="Jitter")
    with pytest.raises(ValueError, match="noise_scale"):
        am.MoELayer(D, H, 4, 2, gate_noise="jitter", noise_scale=1.5)
    with pytest.raises(ValueError, match="noise_scale"):
        am.MoELayer(D, H, 4, 2, gate_noise="gaussian", noise_scale=-1.0)


# ---- cosine router ----------------------------------------------------------------------


def _cosine_reference(router, x):
    """float64 leaves of the cosine router's parameters and its logits, written out."""
    leaf = lambda t: t.detach().double().requires_grad_(True)
    p_w, p_b = leaf(router.proj.weight), leaf(router.proj.bias)
    emb, log_scale = leaf(router.expert_embedding), leaf(router.log_scale)
    proj = x @ p_w.T + p_b  # [T, p]
    cos = (proj / proj.norm(dim=-1, keepdim=True)) @ (emb / emb.norm(dim=-1, keepdim=True)).T
    scale = torch.exp(torch.minimum(log_scale, torch.tensor(math.log(100.0)).double()))
    return (p_w, p_b, emb, log_scale), cos * scale


@pytest.mark.parametrize("log_scale", [None, 10.0])
def test_cosine_router_matches_the_formula(log_scale):
    layer = make_layer(num_experts=4, top_k=2, router_type="cosine", cosine_dim=8)
    if log_scale is not None:  # beyond the clamp: the scale is 100 and gets no gradient
        with torch.no_grad():
            layer.router.log_scale.fill_(log_scale)
    assert layer.router.weight is None
    x = torch.randn(37, D)
    leaves, logits = _cosine_reference(layer.router, x.double())
    scores = torch.softmax(logits, -1)
    ids = torch.topk(scores, 2, -1).indices
    gates = scores.gather(1, ids)
    gates = gates / gates.sum(-1, keepdim=True)
    ex = layer.experts
    w = RefWeights(router=None, w1=ex.w1.detach().double(), w2=ex.down_proj.detach().double())
    ref = experts_forward(x.double(), ids, gates, w, glu=True, activation="silu")
    y = layer(x)
    assert rel_err(y, ref) <= FP32_TOL
    y.square().sum().backward()
    ref.square().sum().backward()
    r = layer.router
    for p, q in zip((r.proj.weight, r.proj.bias, r.expert_embedding, r.log_scale), leaves):
        assert p.grad is not None
        assert rel_err(p.grad, q.grad) <= FP32_TOL
    if log_scale is not None:
        assert float(r.log_scale.grad) == 0.0


def test_cosine_router_initial_temperature():
    layer = am.MoELayer(D, H, 4, 2, router_type="cosine", cosine_temperature=0.25)
    assert math.isclose(float(layer.router.log_scale.detach().exp()), 4.0, rel_tol=1e-6)
    with pytest.raises(ValueError, match="router_type"):
        am.MoELayer(D, H, 4, 2, router_type="cos")
    with pytest.raises(ValueError, match="cosine_temperature"):
        am.MoELayer(D, H, 4, 2, router_type="cosine", cosine_temperature=0.0)


# ---- scaling before the experts (is_postscore=False) ------------------------------------


def _gated_input_reference(x, ids, gates, w, glu, activation, act=None):
    """sum_j expert_{ids[t, j]}(gates[t, j] * x[t]) with a per-expert loop."""
    act = act or {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}[activation]
    out = torch.zeros_like(x)
    h = w.w2.shape[-1]
    for e in range(w.w1.shape[0]):
        for j in range(ids.shape[1]):
            rows = (ids[:, j] == e).nonzero().flatten()
            if rows.numel() == 0:
                continue
            xs = gates[rows, j : j + 1] * x[rows]
            hcat = xs @ w.w1[e].T + (0 if w.b1 is None else w.b1[e])
            a = act(hcat[:, :h]) * hcat[:, h:] if glu else act(hcat)
            out = out.index_add(0, rows, a @ w.w2[e].T + (0 if w.b2 is None else w.b2[e]))
    return out


@pytest.mark.parametrize(
    "glu,bias,cf,kernel",
    [(True, False, 0.0, "loop"), (False, True, 0.5, "bmm"), (True, True, -0.5, "grouped_mm")],
)
def test_gates_before_the_experts_match_a_per_expert_loop(glu, bias, cf, kernel):
    act = "silu" if glu else "gelu"
    layer = make_layer(
        num_experts=4, top_k=2, glu=glu, activation=act, bias=bias, capacity_factor=cf,
        gate_position="input",
    )  # fmt: skip
    x = torch.randn(48, D)
    w = full_weights(layer)
    xr = x.double().requires_grad_(True)
    ids, gates, *_ = route(xr, w, k=2, capacity_factor=cf)
    ref = _gated_input_reference(xr, ids, gates, w, glu, act)
    xl = x.clone().requires_grad_(True)
    y = layer(xl, strategy=am.Strategy(kernel=kernel))
    assert rel_err(y, ref) <= FP32_TOL
    post = experts_forward(xr.detach(), ids, gates.detach(), w, glu=glu, activation=act)
    assert rel_err(ref.detach(), post.detach()) > 1e-2  # really a different function
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g.double()).sum().backward()
    assert rel_err(xl.grad, xr.grad) <= FP32_TOL
    assert rel_err(layer.router.weight.grad, w.router.grad) <= FP32_TOL
    assert rel_err(layer.experts.w1.grad, w.w1.grad) <= FP32_TOL


# ---- any elementwise activation ---------------------------------------------------------


def quick_gelu(t: torch.Tensor) -> torch.Tensor:
    return t * torch.sigmoid(1.702 * t)


CPU_KERNELS = am.MoELayer(D, H, 4, 2).strategies()  # loop, bmm, grouped_mm (+ scatter)


@pytest.mark.parametrize("glu", [True, False])
@pytest.mark.parametrize("kernel", sorted({s.kernel for s in CPU_KERNELS}))
@pytest.mark.parametrize("act", [quick_gelu, torch.tanh], ids=["quick_gelu", "tanh"])
def test_callable_activation_matches_the_per_expert_loop(glu, kernel, act):
    layer = make_layer(num_experts=4, top_k=2, glu=glu, activation=act, bias=not glu, shared_d_ff=8)
    x = torch.randn(37, D)
    w = full_weights(layer)
    xr = x.double().requires_grad_(True)
    ids, gates, *_ = route(xr, w, k=2)
    ref = experts_forward(xr, ids, gates, w, glu=glu, activation=act)
    gate, up, down = w.shared
    ref = ref + (act(xr @ gate.T) * (xr @ up.T)) @ down.T  # the shared expert too
    xl = x.clone().requires_grad_(True)
    y = layer(xl, strategy=am.Strategy(kernel=kernel))
    assert rel_err(y, ref) <= FP32_TOL
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g.double()).sum().backward()
    assert rel_err(xl.grad, xr.grad) <= FP32_TOL
    assert rel_err(layer.experts.w1.grad, w.w1.grad) <= FP32_TOL
    assert rel_err(layer.experts.down_proj.grad, w.w2.grad) <= FP32_TOL


def test_activation_must_be_a_name_or_elementwise():
    with pytest.raises(ValueError, match="elementwise callable"):
        am.MoELayer(D, H, 4, 2, activation="tanh")
    with pytest.raises(ValueError, match="elementwise callable"):
        am.MoELayer(D, H, 4, 2, activation=3)
    with pytest.raises(ValueError, match="must be elementwise"):  # probed when built
        am.MoELayer(D, H, 4, 2, activation=lambda t: t.sum(-1, keepdim=True))


# ---- the same features across an expert group -------------------------------------------


def _group_worker(rank: int, world: int) -> list[float]:
    """Gates before the experts and a callable activation, with the experts sharded over
    the group (EP r=1 and gathered weights r=0): each rank's output against the float64
    per-expert loop on its own tokens with the full weights."""
    from tests.reference import RefWeights

    torch.manual_seed(0)  # the same full weights on every rank
    e = 4
    w1, w2, router = torch.randn(e, 2 * H, D) * 0.3, torch.randn(e, D, H) * 0.3, torch.randn(e, D)
    layer = am.MoELayer(D, H, e, 2, activation=quick_gelu, gate_position="input")
    layer.load_expert_weights(gate_up_proj=w1, down_proj=w2)
    with torch.no_grad():
        layer.router.weight.copy_(router)
    torch.manual_seed(1 + rank)
    x = torch.randn(9 + 4 * rank, D)  # ranks hold different numbers of tokens
    w = RefWeights(router=router.double(), w1=w1.double(), w2=w2.double())
    ids, gates, *_ = route(x.double(), w, k=2)
    ref = _gated_input_reference(x.double(), ids, gates, w, True, "silu", act=quick_gelu)
    return [rel_err(layer(x, strategy=am.Strategy(r=r)), ref) for r in (1, 0)]


@pytest.mark.timeout(120)
def test_gates_before_experts_and_callable_activation_on_two_ranks():
    from tests.dist_utils import run_distributed

    for errs in run_distributed(_group_worker, 2, timeout=100):
        assert max(errs) <= FP32_TOL, errs


def test_gates_before_the_experts_under_no_grad_take_the_dynamic_path():
    """Inference (no_grad) would take the static path; per-slot scaled inputs run on the
    dynamic one and give the same output as with gradients."""
    layer = make_layer(num_experts=4, top_k=2, gate_position="input")
    x = torch.randn(20, D)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), y.detach())

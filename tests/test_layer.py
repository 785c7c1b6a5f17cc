"""Single-process MoELayer against the independent float64 reference (tests/reference.py).

Tolerance: fp32 layer vs float64 reference, relative Frobenius error <= 1e-5.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import adaptive_moe as am
from adaptive_moe.core.config import ExpertConfig, RouterConfig, SharedExpertConfig
from tests.reference import (
    aux_losses,
    experts_forward,
    full_weights,
    rel_err,
    route,
    shared_forward,
)

FP32_TOL = 1e-5
D, H = 16, 24


def make_layer(**kw) -> am.MoELayer:
    torch.manual_seed(kw.pop("seed", 0))
    layer = am.MoELayer(D, H, **kw)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)  # larger than the init, so routing is decisive
    return layer


def check_against_reference(layer, x, *, k=None, router_kw=None, strategy=None):
    """Compare output, aux/z losses and gradients of x and every weight."""
    cfg, ecfg = layer.router_cfg, layer.expert_cfg
    k = k or cfg.top_k
    layer.zero_grad(set_to_none=True)
    w = full_weights(layer)
    xr = x.detach().double().requires_grad_(True)
    ids, gates, logits, scores, demand = route(
        xr,
        w,
        k=k,
        score_func=cfg.score_func,
        renormalize=cfg.renormalize,
        capacity_factor=cfg.capacity_factor,
        batch_prioritized=cfg.batch_prioritized,
        num_groups=cfg.num_groups,
        topk_groups=cfg.topk_groups,
        scaling=cfg.routed_scaling_factor,
        top1_gate=cfg.top1_gate,
        **(router_kw or {}),
    )
    ref = experts_forward(xr, ids, gates, w, glu=ecfg.glu, activation=ecfg.activation)
    if w.shared is not None:
        ref = ref + shared_forward(xr, w, ecfg.activation)
    ref_bal, ref_z = aux_losses(scores, logits, demand)

    xl = x.detach().clone().requires_grad_(True)
    y = layer(xl, top_k=k, strategy=strategy)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert rel_err(y, ref) <= FP32_TOL
    assert rel_err(layer.aux_loss, ref_bal) <= FP32_TOL
    assert rel_err(layer.z_loss, ref_z) <= FP32_TOL
    if x.shape[0] == 0:
        return
    g = torch.randn_like(y)
    loss = (y * g).sum() + 0.1 * layer.aux_loss + 0.01 * layer.z_loss
    loss.backward()
    ref_loss = (ref * g.double()).sum() + 0.1 * ref_bal + 0.01 * ref_z
    ref_loss.backward()
    assert rel_err(xl.grad, xr.grad) <= FP32_TOL
    assert rel_err(layer.router.weight.grad, w.router.grad) <= FP32_TOL
    pairs = [
        (layer.experts.w1, w.w1),
        (layer.experts.down_proj, w.w2),
        (layer.experts.b1, w.b1),
        (layer.experts.down_proj_bias, w.b2),
    ]
    if layer.shared is not None:
        s = layer.shared
        pairs += list(zip((s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight), w.shared))
    if layer.shared_gate is not None:
        pairs.append((layer.shared_gate.weight, w.shared_gate))
    for p, r in pairs:
        if p is None:
            continue
        assert p.grad is not None, "a weight got no gradient"
        assert rel_err(p.grad, r.grad) <= FP32_TOL


# Every (GLU, k, E, T) with every capacity mode; bias alternates so both settings meet
# every other value.
CASES = [
    (glu, k, e, t, cf, (i + j) % 2 == 1)
    for i, (glu, k, e, t) in enumerate(
        itertools.product((True, False), (1, 2, 3), (1, 4, 16), (0, 1, 37, 256))
    )
    if k <= e
    for j, cf in enumerate((0.0, 1.0, -0.5))
]


@pytest.mark.parametrize("glu,k,e,t,cf,bias", CASES)
def test_layer_matches_reference(glu, k, e, t, cf, bias):
    act = "silu" if glu else "gelu"
    layer = make_layer(
        num_experts=e,
        top_k=k,
        glu=glu,
        activation=act,
        bias=bias,
        capacity_factor=cf,
        seed=t * 31 + e,
    )
    x = torch.randn(t, D)
    check_against_reference(layer, x)


@pytest.mark.parametrize("kernel", ["loop", "bmm"])
def test_cpu_kernels_match_reference(kernel):
    layer = make_layer(num_experts=4, top_k=2)
    check_against_reference(layer, torch.randn(37, D), strategy=am.Strategy(kernel=kernel))


def test_relu_ffn_and_leading_dims():
    layer = make_layer(num_experts=4, top_k=2, glu=False, activation="relu")
    x = torch.randn(3, 5, D)
    y = layer(x)
    ref_layer_out = layer(x.reshape(15, D)).reshape(3, 5, D)
    assert torch.equal(y, ref_layer_out)
    check_against_reference(layer, x.reshape(15, D))


def test_dynamic_top_k():
    layer = make_layer(num_experts=8, top_k=2)
    x = torch.randn(37, D)
    for k in (1, 3, 8):
        check_against_reference(layer, x, k=k)
    assert layer.router_cfg.top_k == 2


def test_batch_prioritized_capacity():
    layer = make_layer(num_experts=4, top_k=2, capacity_factor=0.5, batch_prioritized=True)
    check_against_reference(layer, torch.randn(64, D))


def test_deepseek_style_routing():
    layer = make_layer(
        num_experts=16,
        top_k=4,
        score_func="sigmoid",
        num_groups=4,
        topk_groups=2,
        routed_scaling_factor=2.5,
        score_correction_bias=True,
        shared_d_ff=20,
    )
    with torch.no_grad():
        layer.router.e_score_correction_bias.normal_(0, 0.5)
    check_against_reference(layer, torch.randn(37, D))


def test_shared_expert_with_gate():
    layer = make_layer(num_experts=4, top_k=2, renormalize=False, shared_d_ff=12, shared_gate=True)
    check_against_reference(layer, torch.randn(37, D))


def test_random_second_expert_drops_only_second_choices():
    layer = make_layer(num_experts=4, top_k=2, random_second_expert=True)
    layer.train()
    routing = layer.router(torch.randn(512, D))
    assert (routing.topk_ids[:, 0] >= 0).all()
    dropped = (routing.topk_ids[:, 1] < 0).float().mean().item()
    assert 0.0 < dropped < 1.0
    layer.eval()
    assert (layer.router(torch.randn(512, D)).topk_ids >= 0).all()


def test_all_tokens_one_expert_and_empty_experts():
    # top1_gate="one": with every token at p ~ 1 the Switch gate's router gradient is
    # p (1 - p) ~ 1e-4 of the output, below fp32's relative resolution against float64.
    layer = make_layer(num_experts=16, top_k=1, top1_gate="one")
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[5, 0] = 10.0
    x = torch.randn(37, D)
    x[:, 0] = x[:, 0].abs() + 1
    check_against_reference(layer, x)
    assert layer.last_max_tokens == 37


def test_no_grad_saves_nothing():
    layer = make_layer(num_experts=4, top_k=2)
    x = torch.randn(37, D, requires_grad=True)
    with torch.no_grad():
        y = layer(x)
    assert y.grad_fn is None and not y.requires_grad


def test_strategies_and_last_strategy():
    layer = make_layer(num_experts=4, top_k=2)
    strategies = layer.strategies()
    assert layer.default_strategy in strategies
    assert all(s.r == 1 and s.degree == 1 for s in strategies)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one process: no table is the normal case, no warning
        layer(torch.randn(5, D))
    assert layer.last_strategy == layer.default_strategy
    stats = layer.stats()
    assert stats[layer.default_strategy]["count"] == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_experts": 4, "top_k": 5}, "top_k"),
        ({"num_experts": 4, "top_k": 0}, "top_k"),
        ({"num_experts": 0, "top_k": 1}, "num_experts"),
        ({"num_experts": 4, "top_k": 2, "activation": "tanh"}, "activation"),
        ({"num_experts": 4, "top_k": 2, "score_func": "sparsemax"}, "score_func"),
        ({"num_experts": 4, "top_k": 2, "num_groups": 3}, "num_groups"),
        ({"num_experts": 4, "top_k": 2, "shared_gate": True}, "shared_gate"),
        ({"num_experts": 4, "top_k": 2, "capacity_factor": float("nan")}, "capacity_factor"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        am.MoELayer(D, H, **kwargs)


@pytest.mark.parametrize("d_model,d_ff", [(0, 8), (8, -1)])
def test_non_positive_sizes(d_model, d_ff):
    with pytest.raises(ValueError, match=r"d_model|d_ff"):
        am.MoELayer(d_model, d_ff, 4, 2)


def test_from_config_is_the_keyword_form():
    """The typed-config constructor builds the layer the keyword form builds: the same
    parameters from the same seed, the same output, and the shared gate from the config."""
    kwargs = dict(glu=False, activation="gelu", bias=True, shared_d_ff=12, shared_gate=True)
    torch.manual_seed(0)
    by_keyword = am.MoELayer(D, H, 4, 2, score_func="sigmoid", **kwargs)
    torch.manual_seed(0)
    by_config = am.MoELayer.from_config(
        ExpertConfig(D, H, 4, glu=False, activation="gelu", bias=True),
        RouterConfig(4, top_k=2, score_func="sigmoid"),
        SharedExpertConfig(12, gated=True),
    )
    a, b = by_keyword.state_dict(), by_config.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    x = torch.randn(9, D)
    assert torch.equal(by_keyword.forward(x, strategy=by_keyword.default_strategy),
                       by_config.forward(x, strategy=by_config.default_strategy))  # fmt: skip
    with pytest.raises(ValueError, match=r"router\.num_experts=8"):
        am.MoELayer.from_config(ExpertConfig(D, H, 4), RouterConfig(8))
    with pytest.raises(ValueError, match="experts must be of type ExpertConfig"):
        am.MoELayer.from_config({"d_model": D}, RouterConfig(4))


def test_every_keyword_reaches_its_config_field():
    """Each keyword of the keyword form, given a value other than its default, lands in
    the config field of its name (``router_matmul_dtype``: ``RouterConfig.matmul_dtype``;
    ``shared_d_ff`` / ``shared_gate``: ``SharedExpertConfig``)."""
    router = dict(top_k=3, score_func="sigmoid", renormalize=False, capacity_factor=1.5,
                  batch_prioritized=True, random_second_expert=True, num_groups=2,
                  topk_groups=2, routed_scaling_factor=2.5, score_correction_bias=True,
                  top1_gate="one", gate_noise="gaussian", noise_scale=0.5,
                  router_type="cosine", cosine_dim=8, cosine_temperature=0.25,
                  gate_position="input")  # fmt: skip
    experts = dict(glu=False, activation="gelu", bias=True)
    layer = am.MoELayer(D, H, 4, **experts, **router, router_matmul_dtype="bfloat16",
                        shared_d_ff=12, shared_gate=True)  # fmt: skip
    assert layer.router_cfg == RouterConfig(4, **router, matmul_dtype="bfloat16")
    assert layer.expert_cfg == ExpertConfig(D, H, 4, **experts)
    assert layer.shared_cfg == SharedExpertConfig(12, gated=True)
    with pytest.raises(ValueError, match="shared_gate=True needs a shared expert"):
        am.MoELayer(D, H, 4, shared_gate=True)


def test_bad_input_and_forced_strategy():
    layer = make_layer(num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="d_model=16"):
        layer(torch.randn(3, D + 1))
    with pytest.raises(ValueError, match="top_k"):
        layer(torch.randn(3, D), top_k=5)
    with pytest.raises(ValueError, match="floating"):
        layer(torch.ones(3, D, dtype=torch.long))
    with pytest.raises(ValueError, match="not valid"):
        layer(torch.randn(3, D), strategy=am.Strategy(r=0))


def test_load_expert_weights_full_tensors():
    layer = make_layer(num_experts=4, top_k=2, bias=True)
    w1 = torch.randn(4, 2 * H, D)
    w2 = torch.randn(4, D, H)
    ptr = layer.experts.gate_up_proj.data_ptr()
    layer.load_expert_weights(gate_up_proj=w1, down_proj=w2)
    assert torch.equal(layer.experts.gate_up_proj, w1)
    assert layer.experts.gate_up_proj.data_ptr() == ptr
    with pytest.raises(ValueError, match="full shape"):
        layer.load_expert_weights(down_proj=w2[:2])
    with pytest.raises(ValueError, match="unknown expert weight"):
        layer.load_expert_weights(up_proj=w2)

"""Issue 16's layer features against independent references: the dynamic capacity factor
(the formula written out, the float64 reference router), router options (gate noise,
cosine router, scaling before the experts, the k = 1 gate), any elementwise activation.

Tolerance: fp32 layer vs float64 reference, relative Frobenius error <= 1e-5."""

from __future__ import annotations

import math

import pytest
import torch

import adaptive_moe as am
from adaptive_moe.runtime.router import capacity
from tests.reference import experts_forward, full_weights, rel_err, route

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
    with pytest.raises(ValueError, match="capacity_factor must be a number"):
        layer(torch.randn(4, D), capacity_factor=bad)

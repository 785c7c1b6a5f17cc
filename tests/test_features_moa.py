"""ScatterMoE-style building blocks: ``ParallelLinear`` against a per-expert loop, and
``MixtureOfAttention`` against a dense float64 per-expert reference.

Tolerance: fp32 vs float64, relative Frobenius error <= 1e-5."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import adaptive_moe as am
from adaptive_moe.core.config import RouterConfig
from tests.reference import rel_err

FP32_TOL = 1e-5


def _routing(t: int, k: int, e: int, drop: bool) -> torch.Tensor:
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])  # [T, k], distinct per row
    if drop:
        ids[::3, -1] = -1  # some dropped slots
    return ids


@pytest.mark.parametrize("x_grouped,y_grouped", [(False, True), (False, False), (True, True)])
@pytest.mark.parametrize("bias", [False, True])
def test_parallel_linear_matches_a_per_expert_loop(x_grouped, y_grouped, bias):
    torch.manual_seed(0)
    t, k, e, n_in, n_out = 23, 2, 5, 12, 7
    ids = _routing(t, k, e, drop=True)
    ids[:, 0] = ids[:, 0].clamp(max=e - 2)  # expert e-1 gets few rows, maybe none
    rows = am.expert_rows(ids, e)
    layer = am.ParallelLinear(e, n_in, n_out, bias=bias)
    x = torch.randn(t, n_in)
    xin = x[rows.input_rows] if x_grouped else x
    xin = xin.clone().requires_grad_(True)
    y = layer(xin, rows, x_grouped=x_grouped, y_grouped=y_grouped)

    # Reference: every slot (t, j) with an expert, in slot order, float64.
    w = layer.weight.detach().double().requires_grad_(True)
    b = layer.bias.detach().double().requires_grad_(True) if bias else None
    xr = x.double().requires_grad_(True)
    slots = [(ti, j, int(ids[ti, j])) for ti in range(t) for j in range(k) if ids[ti, j] >= 0]
    per_slot = {ti * k + j: xr[ti] @ w[ex].T + (0 if b is None else b[ex]) for ti, j, ex in slots}
    if y_grouped:  # grouped order: by expert, slot order within an expert
        order = sorted(per_slot, key=lambda s: (int(ids.flatten()[s]), s))
        ref = torch.stack([per_slot[s] for s in order])
        assert order == rows.sorted_slots.tolist()
    else:
        zero = torch.zeros(n_out, dtype=torch.float64)
        ref = torch.stack([per_slot.get(s, zero) for s in range(t * k)])
    assert rel_err(y, ref) <= FP32_TOL
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g.double()).sum().backward()
    assert rel_err(layer.weight.grad, w.grad) <= FP32_TOL
    if bias:
        assert rel_err(layer.bias.grad, b.grad) <= FP32_TOL
    if not x_grouped:
        assert rel_err(xin.grad, xr.grad) <= FP32_TOL


def test_parallel_linear_checks_its_arguments():
    rows = am.expert_rows(torch.tensor([[0, 1], [1, 0]]), 2)
    w = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="K=4"):
        am.parallel_linear(torch.randn(2, 5), w, None, rows)
    with pytest.raises(ValueError, match="weight must be"):
        am.parallel_linear(torch.randn(2, 4), torch.randn(3, 3, 4), None, rows)
    with pytest.raises(ValueError, match="x must have 4 rows"):
        am.parallel_linear(torch.randn(2, 4), w, None, rows, x_grouped=True)
    with pytest.raises(ValueError, match="rows must be"):
        am.parallel_linear(torch.randn(2, 4), w, None, "rows")
    with pytest.raises(ValueError, match="integer"):
        am.expert_rows(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="integer"):
        am.expert_rows(torch.ones(2, 2, dtype=torch.bool), 2)


@pytest.mark.parametrize("bad", [2, 3, 99, -2, -(2**40)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_expert_rows_refuses_ids_outside_the_experts(bad, dtype):
    ids = torch.tensor([[0, 1], [1, -1], [0, 1]], dtype=torch.int64)
    ids[1, 0] = bad
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[-1, 2\)"):
        am.expert_rows(ids.to(dtype) if abs(bad) < 2**31 else ids, 2)
    # Through the module too: rows are only ever built by expert_rows.
    rows = am.expert_rows(torch.tensor([[0, 1], [1, -1], [0, 1]], dtype=dtype), 2)
    assert rows.counts == (2, 3) and rows.sorted_slots.tolist() == [0, 4, 1, 2, 5]
    assert am.expert_rows(torch.zeros(0, 2, dtype=dtype), 2).counts == (0, 0)


def test_parallel_linear_refuses_inconsistent_rows():
    rows = am.expert_rows(torch.tensor([[0, 1], [1, 0]]), 2)
    forged = dataclasses.replace(rows, counts=(1, 1))  # 4 sorted slots, counts say 2
    with pytest.raises(ValueError, match="rows is inconsistent"):
        am.ParallelLinear(2, 4, 3)(torch.randn(2, 4), forged)


def _moa_reference(moa, x, causal):
    """Every expert's attention computed densely for every token in float64, then the
    k chosen ones combined with the gates (routing from the float64 router formula)."""
    b, s, d = x.shape
    h, hd = moa.num_heads, moa.head_dim
    leaf = lambda t: t.detach().double().requires_grad_(True)
    wq, wo = leaf(moa.q_proj.weight), leaf(moa.o_proj.weight)  # [E, H*D, d], [E, d, H*D]
    wk, wv, wr = leaf(moa.k_proj.weight), leaf(moa.v_proj.weight), leaf(moa.router.weight)
    xr = x.double()
    scores = torch.softmax(xr.reshape(-1, d) @ wr.T, -1)  # [T, E]
    ids = scores.topk(moa.router.cfg.top_k, -1).indices  # [T, k]
    gates = scores.gather(1, ids)
    if ids.shape[1] > 1:  # k = 1 keeps the raw probability (top1_gate="probability")
        gates = gates / gates.sum(-1, keepdim=True)
    keys = (xr @ wk.T).view(b, s, h, hd).transpose(1, 2)  # [B, H, S, D]
    values = (xr @ wv.T).view(b, s, h, hd).transpose(1, 2)
    mask = torch.ones(s, s, dtype=torch.bool).tril() if causal else torch.ones(s, s).bool()
    y = torch.zeros(b * s, d, dtype=torch.float64)
    for e in range(wq.shape[0]):
        q = (xr @ wq[e].T).view(b, s, h, hd).transpose(1, 2)  # [B, H, S, D]
        att = (q @ keys.transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(~mask, -math.inf).softmax(-1)
        out = (att @ values).transpose(1, 2).reshape(b * s, h * hd) @ wo[e].T  # [T, d]
        weight = (gates * (ids == e)).sum(-1, keepdim=True)  # [T, 1]: g if e was chosen
        y = y + weight * out
    return y.view(b, s, d), (wq, wo, wk, wv, wr)


@pytest.mark.parametrize("causal,k", [(True, 2), (False, 1), (True, 3)])
def test_mixture_of_attention_matches_a_per_expert_reference(causal, k):
    torch.manual_seed(0)
    moa = am.MixtureOfAttention(16, num_heads=2, head_dim=6, num_experts=4, top_k=k, causal=causal)
    with torch.no_grad():
        moa.router.weight.normal_(0, 1.0)  # decisive routing
    x = torch.randn(3, 7, 16)
    y = moa(x)
    ref, leaves = _moa_reference(moa, x, causal)
    assert y.shape == x.shape
    assert rel_err(y, ref) <= FP32_TOL
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g.double()).sum().backward()
    params = (moa.q_proj.weight, moa.o_proj.weight, moa.k_proj.weight, moa.v_proj.weight)
    for p, r in zip((*params, moa.router.weight), leaves):
        assert p.grad is not None
        assert rel_err(p.grad, r.grad) <= FP32_TOL
    assert float(moa.aux_loss.detach()) > 0


def test_mixture_of_attention_is_causal_and_checks_arguments():
    torch.manual_seed(0)
    moa = am.MixtureOfAttention(8, num_heads=2, head_dim=4, num_experts=2, top_k=1)
    x = torch.randn(1, 6, 8)
    y = moa(x)
    x2 = x.clone()
    x2[:, 4:] += 1.0  # the future changes; positions 0..3 must not
    assert torch.allclose(moa(x2)[:, :4], y[:, :4], atol=1e-6)
    with pytest.raises(ValueError, match="d_model=8"):
        moa(torch.randn(6, 8))
    with pytest.raises(ValueError, match="num_experts=2"):
        am.MixtureOfAttention(8, 2, 4, 2, 1, router=RouterConfig(num_experts=3, top_k=1))

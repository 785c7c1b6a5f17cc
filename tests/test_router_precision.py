"""The router's tensor-core GEMMs and its fused selection kernel.

``RouterConfig.matmul_dtype``: the router's matmuls on bf16 tensor cores against fp32.

The weights stay fp32 and receive fp32 gradients; ``"bfloat16"`` logits match a float64
reference of the bf16-rounded operands up to fp32 accumulation (the output is fp32, not
rounded); ``"bfloat16x2"`` logits and gradients match float64 of the unrounded weight
within fp32-grade bounds; the routing of both agrees with the fp32 router's except on
tokens whose k-th / (k+1)-th margin lies within the logits' error bound, and the gates
within the bound's effect on a softmax; ``"auto"`` is exact fp32 on CPU; an invalid value
raises a ValueError naming the field. On CUDA the cuBLAS path (``torch.mm`` with
``out_dtype``) is compared with the CPU's fp32 emulation of the same function.

``Router.fused_select`` (softmax, top-k, renormalisation and counts in one Triton kernel,
run by the interpreter in a child process): against float64 softmax / top-k and its
autograd (values and gradients), and the whole router against its torch path (ids,
gates, counts, capacity drops, gradients of the weight and the tokens).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import adaptive_moe as am
from adaptive_moe.core.config import RouterConfig
from adaptive_moe.runtime.routing.router import Router, matmul_parts
from adaptive_moe.runtime.routing.router_matmul import tensor_core_linear
from tests.interpreted import INTERPRETED, run_interpreted


@pytest.mark.parametrize("router_type", ["linear", "cosine"])
def test_bf16_router_matmul_against_reference(router_type: str) -> None:
    torch.manual_seed(0)
    cfg = RouterConfig(8, top_k=2, router_type=router_type, matmul_dtype="bfloat16",
                       cosine_dim=16)  # fmt: skip
    router = Router(32, cfg)
    x = torch.randn(13, 32, dtype=torch.bfloat16)
    logits = router.logits(x)
    assert logits.dtype == torch.float32
    if router_type == "linear":
        w = router.weight.detach().to(torch.bfloat16).double()
        ref = x.double() @ w.T  # exact products of the rounded operands
        # fp32 output: only the accumulation rounds (d * 2^-24 of sum |x w|).
        bound = 32 * 2**-24 * (x.double().abs() @ w.abs().T)
        assert ((logits.double() - ref).abs() <= bound + 1e-30).all()
    fp32 = Router(32, RouterConfig(8, top_k=2, router_type=router_type, cosine_dim=16))
    fp32.load_state_dict(router.state_dict())
    want = fp32.logits(x)
    assert (logits - want).abs().max() <= 0.05 * want.abs().max()
    logits.square().sum().backward()
    for p in router.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32


def test_layer_keyword_and_float32_default_unchanged() -> None:
    torch.manual_seed(0)
    layer = am.MoELayer(16, 24, 4, 2, router_matmul_dtype="bfloat16")
    assert layer.router_cfg.matmul_dtype == "bfloat16"
    y = layer(torch.randn(5, 16))
    assert torch.isfinite(y).all()
    default = am.MoELayer(16, 24, 4, 2)
    x = torch.randn(5, 16)
    exact = torch.nn.functional.linear(x, default.router.weight)
    assert torch.equal(default.router.logits(x), exact)


def test_bad_matmul_dtype() -> None:
    with pytest.raises(ValueError, match="matmul_dtype"):
        RouterConfig(4, matmul_dtype="fp16")


def _bf16_tokens(t: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, d, generator=g).to(torch.bfloat16)


def _logit_bound(parts: int, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[T, E] bound on |logit - exact| for bf16 tokens x: the weight's representation
    error (2^-9 per element for one bf16 part, 2^-18 for two) plus fp32 accumulation."""
    weight_rel = 2.0**-9 if parts == 1 else 2.0**-18
    scale = x.double().abs() @ w.double().abs().T  # [T, E]
    return (weight_rel * 1.01 + x.shape[1] * 2.0**-24) * scale


@pytest.mark.parametrize("parts", [1, 2])
def test_tensor_core_linear_against_float64(parts: int) -> None:
    torch.manual_seed(1)
    x = _bf16_tokens(37, 96, seed=1).requires_grad_(True)
    w = (torch.randn(24, 96) * 0.05).requires_grad_(True)
    y = tensor_core_linear(x, w, parts)
    assert y.dtype == torch.float32 and y.shape == (37, 24)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = x64 @ w64.T
    err = (y.double() - ref).abs()
    assert (err <= _logit_bound(parts, x, w)).all(), err.max()
    if parts == 2:  # the split weight is what makes it fp32-grade: far below one part's
        one = (tensor_core_linear(x, w, 1).double() - ref).abs().max()
        assert err.max() * 100 < one
    g = torch.randn(37, 24)
    y.backward(g)
    ref.backward(g.double())
    g_rel = 2.0**-9 if parts == 1 else 2.0**-18
    # dw = g^T x: g's representation error plus fp32 accumulation over T.
    dw_bound = (g_rel * 1.01 + 37 * 2.0**-24) * (g.double().abs().T @ x.detach().double().abs())
    assert w.grad.dtype == torch.float32
    assert ((w.grad.double() - w64.grad).abs() <= dw_bound).all()
    # dx = g w, rounded to x's dtype (bf16: 2^-8 of |dx|) on top of the parts' errors.
    dx_bound = (2 * g_rel * 1.01 + 24 * 2.0**-24) * (g.double().abs() @ w.detach().double().abs())
    dx_bound += 2.0**-8 * x64.grad.abs()
    assert x.grad.dtype == torch.bfloat16
    assert ((x.grad.double() - x64.grad).abs() <= dx_bound).all()


@pytest.mark.parametrize("matmul_dtype", ["bfloat16", "bfloat16x2"])
def test_routing_agrees_with_fp32_except_near_ties(matmul_dtype: str) -> None:
    torch.manual_seed(2)
    k, experts, d = 8, 64, 256
    fp32 = Router(d, RouterConfig(experts, top_k=k))
    fast = Router(d, RouterConfig(experts, top_k=k, matmul_dtype=matmul_dtype))
    fast.load_state_dict(fp32.state_dict())
    x = _bf16_tokens(1024, d, seed=3)
    want, got = fp32(x), fast(x)
    bound = _logit_bound(matmul_parts(matmul_dtype, x), x, fp32.weight.detach())
    # A top-k set can change only where the k-th and (k+1)-th fp32 logits are closer
    # than the two errors together.
    top = want.logits.double().topk(k + 1, dim=-1).values  # [T, k+1]
    near_tie = (top[:, k - 1] - top[:, k]) <= 2 * bound.max(dim=-1).values
    same = (want.topk_ids.sort(-1).values == got.topk_ids.sort(-1).values).all(-1)
    assert (same | near_tie).all()
    assert same.float().mean() > 0.9  # most tokens route alike (not a vacuous bound)
    # Softmax: |d p_i| <= 2 p_i max |d logit|; the renormalisation at most doubles it.
    rows = same.nonzero().squeeze(1)
    w_sorted = want.gates[rows].gather(1, want.topk_ids[rows].argsort(-1)).double()
    g_sorted = got.gates[rows].gather(1, got.topk_ids[rows].argsort(-1)).double()
    slack = 4 * bound[rows].max(dim=-1, keepdim=True).values * w_sorted + 1e-7
    assert ((g_sorted - w_sorted).abs() <= slack).all()


def test_auto_is_exact_fp32_on_cpu() -> None:
    torch.manual_seed(4)
    router = Router(32, RouterConfig(8, top_k=2, matmul_dtype="auto"))
    x = torch.randn(9, 32, dtype=torch.bfloat16)
    assert matmul_parts("auto", x) == 0
    assert torch.equal(router.logits(x), torch.nn.functional.linear(x.float(), router.weight))


@pytest.mark.gpu
@pytest.mark.parametrize("parts", [1, 2])
def test_cuda_tensor_core_linear_matches_the_cpu_emulation(parts: int) -> None:
    torch.manual_seed(5)
    x = _bf16_tokens(300, 512, seed=5).requires_grad_(True)
    w = (torch.randn(64, 512) * 0.05).requires_grad_(True)
    g = torch.randn(300, 64)
    assert matmul_parts("auto", x.cuda()) == 2
    outs = []
    for device in ("cpu", "cuda"):
        xd = x.detach().to(device).requires_grad_(True)
        wd = w.detach().to(device).requires_grad_(True)
        y = tensor_core_linear(xd, wd, parts)
        y.backward(g.to(device))
        outs.append([t.detach().double().cpu() for t in (y, xd.grad, wd.grad)])
    scale = x.detach().double().abs() @ w.detach().double().abs().T
    # Both accumulate in fp32, in different orders: 512 * 2^-24 of sum |x w|.
    assert ((outs[0][0] - outs[1][0]).abs() <= 512 * 2.0**-24 * scale).all()
    for cpu_t, cuda_t in zip(outs[0][1:], outs[1][1:]):
        assert torch.allclose(cuda_t, cpu_t, rtol=2**-7, atol=1e-6)


def test_fused_select_suite_in_child(tmp_path: Path) -> None:
    run_interpreted("tests/test_router_precision.py", "TestFusedSelect", tmp_path,
                    min_tests=7, timeout=900)  # fmt: skip


@pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process")
class TestFusedSelect:
    """``csrc_triton.routing`` under the Triton interpreter."""

    @pytest.mark.parametrize(
        ("experts", "k", "renormalize"), [(8, 2, True), (64, 8, False), (5, 1, True), (3, 3, True)]
    )
    def test_kernel_against_float64(self, experts: int, k: int, renormalize: bool) -> None:
        from adaptive_moe.runtime.routing.router_select import softmax_topk

        g = torch.Generator().manual_seed(experts + k)
        logits = (torch.randn(37, experts, generator=g) * 3).requires_grad_()
        scores, ids, gates, counts = softmax_topk(logits, k, renormalize)
        l64 = logits.detach().double().requires_grad_()
        p64 = torch.softmax(l64, -1)
        v64, ids64 = p64.sort(dim=-1, descending=True, stable=True)
        v64, ids64 = v64[:, :k], ids64[:, :k]
        g64 = v64 / (v64.sum(-1, keepdim=True) + 1e-20) if renormalize else v64
        assert torch.equal(ids, ids64)
        assert torch.equal(counts, torch.bincount(ids64.flatten(), minlength=experts))
        assert torch.allclose(scores.double(), p64, rtol=1e-5, atol=1e-7)
        assert torch.allclose(gates.double(), g64, rtol=1e-5, atol=1e-7)
        d_s, d_g = torch.randn(37, experts, generator=g), torch.randn(37, k, generator=g)
        (grad,) = torch.autograd.grad((scores * d_s).sum() + (gates * d_g).sum(), logits)
        (ref,) = torch.autograd.grad((p64 * d_s).sum() + (g64 * d_g).sum(), l64)
        assert torch.allclose(grad.double(), ref, rtol=1e-4, atol=1e-6)

    def test_no_tokens(self) -> None:
        from csrc_triton.routing import softmax_topk as launch

        scores, ids, gates, counts = launch(torch.zeros(0, 6), 2, renormalize=True)
        assert scores.shape == (0, 6) and ids.shape == gates.shape == (0, 2)
        assert torch.equal(counts, torch.zeros(6, dtype=torch.int64))
        with pytest.raises(ValueError, match="k <= E"):
            launch(torch.zeros(3, 2), 3, renormalize=True)

    @pytest.mark.parametrize(("capacity", "top1_gate"), [(0.0, "probability"), (1.0, "one")])
    def test_router_matches_its_torch_path(self, capacity: float, top1_gate: str) -> None:
        torch.manual_seed(6)
        for k in (1, 2):
            cfg = RouterConfig(16, top_k=k, capacity_factor=capacity, top1_gate=top1_gate,
                               routed_scaling_factor=2.0)  # fmt: skip
            plain, fused = Router(24, cfg), Router(24, cfg)
            fused.load_state_dict(plain.state_dict())
            fused.fused_select = True
            x = torch.randn(41, 24)
            assert fused._fusable("none", x)  # the kernel runs, not the torch path
            outs = []
            for router in (plain, fused):
                xr = x.clone().requires_grad_()
                r = router(xr)
                loss = (r.gates * torch.arange(k)).sum() + (r.scores**2).sum()
                outs.append((r, torch.autograd.grad(loss, [xr, router.weight])))
            (want, want_g), (got, got_g) = outs
            assert torch.equal(got.topk_ids, want.topk_ids)
            assert torch.equal(got.counts, want.counts) and got.dropless == want.dropless
            assert torch.allclose(got.gates, want.gates, rtol=1e-5, atol=1e-7)
            assert torch.allclose(got.scores, want.scores, rtol=1e-5, atol=1e-7)
            for a, b in zip(got_g, want_g):
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)

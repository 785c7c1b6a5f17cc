"""``RouterConfig.matmul_dtype``: the router's matmuls in bf16 against an fp32 reference.

The weights stay fp32 and receive fp32 gradients; logits match a float64 reference of the
bf16-rounded operands (the only rounding is the inputs' and the bf16 GEMM output's);
an invalid value raises a ValueError naming the field.
"""

from __future__ import annotations

import pytest
import torch

import adaptive_moe as am
from adaptive_moe.core.config import RouterConfig
from adaptive_moe.runtime.router import Router


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
        # bf16 output rounding: relative 2^-8 of each logit.
        assert torch.allclose(logits.double(), ref, rtol=2**-8, atol=1e-6)
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

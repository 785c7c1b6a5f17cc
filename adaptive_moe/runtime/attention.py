"""Mixture-of-Attention (ScatterMoE's "SMoE attention", from ModuleFormer): routed experts
for the attention projections, built from ``ParallelLinear``.

Each token picks k of E attention experts. Expert e owns a query projection and an
output projection of H heads of size D; the key and value projections are shared, so
every expert's head i attends over the same key/value head i of the sequence:

    x       [B, S, d]             tokens; T = B * S, slot t*k + j = token t's j-th choice
    q       [T*k, H*D]            slot space: q[t*k + j] = W_q[e_tj] x_t
    k, v    [B, H, S, D]          shared: W_k x, W_v x
    a       [B*k, H, S, D]        softmax(q k^T / sqrt(D) (+ causal mask)) v, per choice j
    o       [T*k, d]              slot space: o[t*k + j] = W_o[e_tj] a[t*k + j]
    y       [B, S, d]             sum_j g_tj o[t*k + j]

The router is this package's ``Router`` (any ``RouterConfig``: top-k, noise, cosine, ...).
Single process: the projections are not sharded over an expert group.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_moe.core.checks import positive_int
from adaptive_moe.core.config import RouterConfig
from adaptive_moe.runtime.experts.parallel_linear import ParallelLinear, expert_rows
from adaptive_moe.runtime.routing.router import Router, balance_loss, z_loss


class MixtureOfAttention(nn.Module):
    """Attention whose query and output projections are routed experts (module docstring).

    Args:
        d_model: d.
        num_heads: H, heads per expert (H*D need not equal d).
        head_dim: D, the size of each head.
        num_experts: E, routed experts.
        top_k: k, experts per token.
        causal: mask future positions.
        router: a ``RouterConfig`` (default: softmax top-k, renormalised, dropless);
            its ``num_experts`` and ``top_k`` must equal the arguments.
        device: of the projections and the router.
        dtype: of the projections (the router is fp32).

    Attributes:
        aux_loss, z_loss: the load-balancing and router z-loss of the last forward.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int,
        num_experts: int,
        top_k: int = 2,
        *,
        causal: bool = True,
        router: RouterConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("num_heads", num_heads), ("head_dim", head_dim)):
            positive_int(name, value)
        cfg = router or RouterConfig(num_experts=num_experts, top_k=top_k)
        if not isinstance(cfg, RouterConfig):
            raise ValueError(f"router must be a RouterConfig or None, got {type(cfg).__name__}")
        if (cfg.num_experts, cfg.top_k) != (num_experts, top_k):
            raise ValueError(
                f"router has num_experts={cfg.num_experts}, top_k={cfg.top_k}; the module "
                f"has num_experts={num_experts}, top_k={top_k}"
            )
        if cfg.gate_position != "output":
            raise ValueError("MixtureOfAttention combines expert outputs: gate_position='output'")
        self.num_heads, self.head_dim, self.causal = num_heads, head_dim, causal
        width, kw = num_heads * head_dim, {"device": device, "dtype": dtype}
        dev = torch.device(device) if device is not None else None
        self.router = Router(d_model, cfg, device=dev)
        self.q_proj = ParallelLinear(num_experts, d_model, width, **kw)  # [E, H*D, d]
        self.o_proj = ParallelLinear(num_experts, width, d_model, **kw)  # [E, d, H*D]
        self.k_proj = nn.Linear(d_model, width, bias=False, **kw)
        self.v_proj = nn.Linear(d_model, width, bias=False, **kw)
        self.aux_loss = torch.zeros(())
        self.z_loss = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        """x [B, S, d] -> y [B, S, d]."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.k_proj.in_features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, S, d_model={self.k_proj.in_features}], got {shape}")
        b, s, d = x.shape
        h, hd = self.num_heads, self.head_dim
        xt = x.reshape(b * s, d)  # [T, d]
        routing = self.router(xt)
        k = routing.top_k
        e = self.router.cfg.num_experts
        self.aux_loss = balance_loss(routing.scores, routing.counts.float(), b * s * k)
        self.z_loss = z_loss(routing.logits)
        rows = expert_rows(routing.topk_ids, e)
        q = self.q_proj(xt, rows, y_grouped=False)  # [T*k, H*D] slot space
        q = q.view(b, s, k, h, hd).permute(0, 2, 3, 1, 4).reshape(b * k, h, s, hd)
        keys = self.k_proj(x).view(b, s, h, hd).transpose(1, 2)  # [B, H, S, D]
        values = self.v_proj(x).view(b, s, h, hd).transpose(1, 2)
        # Batch entry b*k + j holds choice j of sequence b: every choice sees the same k, v.
        keys = keys.repeat_interleave(k, dim=0)  # [B*k, H, S, D]
        values = values.repeat_interleave(k, dim=0)
        a = F.scaled_dot_product_attention(q, keys, values, is_causal=self.causal)
        a = a.view(b, k, h, s, hd).permute(0, 3, 1, 2, 4).reshape(b * s * k, h * hd)  # slots
        # The attention output is in slot space already: one row per slot (fan_out 1).
        o = self.o_proj(a, dataclasses.replace(rows, fan_out=1), y_grouped=False)  # [T*k, d]
        y = (o.view(b * s, k, d).float() * routing.gates.unsqueeze(-1)).sum(1)  # [T, d]
        return y.to(x.dtype).view(b, s, d)

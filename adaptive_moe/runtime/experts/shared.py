"""The always-on shared expert MLP (DeepSeek / Qwen2-MoE), replicated on every rank."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from adaptive_moe.core.activations import activation_fn
from adaptive_moe.core.config import SharedExpertConfig


class SharedMLP(nn.Module):
    """Always-on GLU expert(s): ``down(act(gate(x)) * up(x))``, replicated on every rank."""

    def __init__(
        self,
        d_model: int,
        cfg: SharedExpertConfig,
        activation: str | Callable[[torch.Tensor], torch.Tensor],
        **kw: object,
    ):
        super().__init__()
        self.act = activation if callable(activation) else activation_fn(activation)
        self.gate_proj = nn.Linear(d_model, cfg.d_ff, bias=False, **kw)
        self.up_proj = nn.Linear(d_model, cfg.d_ff, bias=False, **kw)
        self.down_proj = nn.Linear(cfg.d_ff, d_model, bias=False, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

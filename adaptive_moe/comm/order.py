"""A fixed order for the collectives of one forward, and of its backward.

Collectives must be issued in the same order on every rank. Forward code does that by
construction, but backward order is the autograd engine's choice among ready nodes, and
the graphs of two ranks differ wherever their data does (an empty chunk, an expert with
no rows), so two ranks could issue their backward collectives in different orders and
deadlock. ``CollectiveOrder`` threads a zero-size token through every collective's
input and output:

    x, tok = tie(x, tok); y = collective(x); y, tok = tie(y, tok)

In backward a collective can then only run after every later one, so backward issues
them in exactly the reverse forward order on every rank. The token carries no data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import FunctionCtx


class _Tie(torch.autograd.Function):
    """(x, token) -> (x, new token); backward makes x's producer wait for token's consumer."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, token: torch.Tensor):  # type: ignore[override]
        ctx.token_shape = token.shape
        return x.view_as(x), token.new_empty(0)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_x: torch.Tensor, grad_token: torch.Tensor):  # type: ignore[override]
        return grad_x, grad_x.new_zeros(ctx.token_shape)


class CollectiveOrder:
    """Ties the collectives of one forward into a chain (see module docstring).

    Created per forward; inactive (no autograd nodes) when gradients are off."""

    def __init__(self, device: torch.device):
        self._token = torch.zeros(0, device=device, requires_grad=torch.is_grad_enabled())

    def link(
        self, node: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """``y, token' = node(token)``: a collective's own autograd node taking the token
        as an input and returning the next one is a link of the chain by itself, with
        no tie nodes around it (its backward runs after every later link's, before every
        earlier one's). Returns y."""
        y, self._token = node(self._token)
        return y

    def tie(self, x: torch.Tensor) -> torch.Tensor:
        """Return x, ordered after every collective tied so far."""
        if not (torch.is_grad_enabled() and x.requires_grad):
            return x
        x, self._token = _Tie.apply(x, self._token)
        return x

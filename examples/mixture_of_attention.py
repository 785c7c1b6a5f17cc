"""A tiny language model whose attention *and* MLP are routed experts, trained for a few
hundred steps on a synthetic task where attention must look back: each sequence is a
random prefix repeated, so the second half is predictable only by attending to the first.

    python examples/mixture_of_attention.py            # CPU, a minute
    python examples/mixture_of_attention.py --steps 50 --device cuda

``MixtureOfAttention`` routes every token to k attention experts (own query and output
projections, shared keys/values); ``MoELayer`` is the routed MLP. Both are built from the
package's grouped linear (``ParallelLinear``). The loss on the repeated half falls from
ln(vocab) towards 0 as the model learns to copy.
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import adaptive_moe as am


class Block(nn.Module):
    def __init__(self, d: int, experts: int):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn = am.MixtureOfAttention(d, num_heads=4, head_dim=16, num_experts=experts)
        self.ffn = am.MoELayer(d, 2 * d, experts, top_k=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))

    def aux_loss(self) -> torch.Tensor:
        return self.attn.aux_loss + self.ffn.aux_loss


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, seq: int, experts: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, experts) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]  # [B, S, d]
        for block in self.blocks:
            x = block(x)
        return self.head(x)  # [B, S, V]


def batch(n: int, half: int, vocab: int, device: torch.device) -> torch.Tensor:
    prefix = torch.randint(0, vocab, (n, half), device=device)
    return torch.cat([prefix, prefix], dim=1)  # [B, 2 * half]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--experts", type=int, default=4)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    torch.manual_seed(0)
    device = torch.device(args.device)
    vocab, half = 32, 12
    model = TinyLM(vocab, 64, 2 * half, args.experts, layers=2).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e3:.0f}K parameters; chance "
          f"loss ln({vocab}) = {math.log(vocab):.2f}")  # fmt: skip
    for step in range(1, args.steps + 1):
        tokens = batch(32, half, vocab, device)
        logits = model(tokens[:, :-1])
        # Only the repeated half is predictable: score the loss there.
        copy = F.cross_entropy(logits[:, half:].flatten(0, 1), tokens[:, half + 1 :].flatten())
        aux = sum(block.aux_loss() for block in model.blocks)
        (copy + 0.01 * aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == 1:
            print(f"step {step:4d}  loss on the repeated half {copy.item():.3f}", flush=True)


if __name__ == "__main__":
    main()

"""An independent, slow, float64 reference of the whole MoE layer (for tests only).

Written without any adaptive_moe code: routing with explicit Python loops for capacity,
experts as a per-expert loop over full weights. Shapes as in ``adaptive_moe.core.config``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

ACT = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


@dataclasses.dataclass
class RefWeights:
    router: torch.Tensor  # [E, d]
    w1: torch.Tensor  # [E, 2h | h, d]
    w2: torch.Tensor  # [E, d, h]
    b1: torch.Tensor | None = None  # [E, 2h | h]
    b2: torch.Tensor | None = None  # [E, d]
    correction_bias: torch.Tensor | None = None  # [E]
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # gate, up, down
    shared_gate: torch.Tensor | None = None  # [1, d]


def full_weights(layer) -> RefWeights:
    """Copies of a single-process layer's weights as float64 CPU leaf tensors."""
    ex = layer.experts

    def leaf(t):
        return None if t is None else t.detach().to("cpu", torch.float64).requires_grad_(True)

    shared = None
    if layer.shared is not None:
        s = layer.shared
        shared = (leaf(s.gate_proj.weight), leaf(s.up_proj.weight), leaf(s.down_proj.weight))
    bias = layer.router.e_score_correction_bias
    return RefWeights(
        router=leaf(layer.router.weight),
        w1=leaf(ex.w1),
        w2=leaf(ex.down_proj),
        b1=leaf(ex.b1),
        b2=leaf(ex.down_proj_bias),
        correction_bias=None if bias is None else bias.detach().to("cpu", torch.float64),
        shared=shared,
        shared_gate=None if layer.shared_gate is None else leaf(layer.shared_gate.weight),
    )


def route(
    x,
    w: RefWeights,
    *,
    k,
    score_func="softmax",
    renormalize=True,
    capacity_factor=0.0,
    batch_prioritized=False,
    num_groups=1,
    topk_groups=1,
    scaling=1.0,
    top1_gate="probability",
):
    """(ids [T, k] with -1 for dropped, gates [T, k], logits, scores, demand counts [E])."""
    logits = x @ w.router.T
    scores = torch.softmax(logits, -1) if score_func == "softmax" else torch.sigmoid(logits)
    t, e = scores.shape
    choice = scores.detach().clone()
    if w.correction_bias is not None:
        choice = choice + w.correction_bias
    if num_groups > 1:
        per = e // num_groups
        for i in range(t):
            gscore = [
                sorted(choice[i, g * per : (g + 1) * per].tolist())[-2:] for g in range(num_groups)
            ]
            gscore = torch.tensor([sum(v) for v in gscore])
            keep_groups = set(torch.topk(gscore, topk_groups).indices.tolist())
            for g in range(num_groups):
                if g not in keep_groups:
                    choice[i, g * per : (g + 1) * per] = -math.inf
    ids = torch.topk(choice, k, dim=-1).indices
    gates = scores.gather(1, ids)
    if renormalize and (k > 1 or top1_gate == "one"):  # Switch keeps p at k = 1
        gates = gates / gates.sum(-1, keepdim=True)
    gates = gates * scaling
    demand = torch.bincount(ids.flatten(), minlength=e)
    if capacity_factor != 0:
        cap = max(1, math.ceil(abs(capacity_factor) * k * t / e))
        used = [0] * e
        if batch_prioritized:
            order = sorted(range(t), key=lambda i: (-scores[i].max().item(), i))
        else:
            order = list(range(t))
        keep = torch.zeros(t, k, dtype=torch.bool)
        for j in range(k):
            for i in order:
                ex = int(ids[i, j])
                if used[ex] < cap:
                    used[ex] += 1
                    keep[i, j] = True
        ids = torch.where(keep, ids, torch.full_like(ids, -1))
        gates = gates * keep
    return ids, gates, logits, scores, demand


def experts_forward(x, ids, gates, w: RefWeights, *, glu, activation):
    """sum_j gates[t, j] * expert_{ids[t, j]}(x[t]) with a per-expert loop."""
    act = activation if callable(activation) else ACT[activation]
    out = torch.zeros_like(x)
    h = w.w2.shape[-1]
    for e in range(w.w1.shape[0]):
        for j in range(ids.shape[1]):
            rows = (ids[:, j] == e).nonzero().flatten()
            if rows.numel() == 0:
                continue
            hcat = x[rows] @ w.w1[e].T
            if w.b1 is not None:
                hcat = hcat + w.b1[e]
            a = act(hcat[:, :h]) * hcat[:, h:] if glu else act(hcat)
            y = a @ w.w2[e].T
            if w.b2 is not None:
                y = y + w.b2[e]
            out = out.index_add(0, rows, gates[rows, j : j + 1] * y)
    return out


def shared_forward(x, w: RefWeights, activation):
    gate, up, down = w.shared
    act = activation if callable(activation) else ACT[activation]
    y = (act(x @ gate.T) * (x @ up.T)) @ down.T
    if w.shared_gate is not None:
        y = torch.sigmoid(x @ w.shared_gate.T) * y
    return y


def aux_losses(scores, logits, demand):
    e = scores.shape[1]
    slots = demand.sum()
    if scores.shape[0] == 0:
        return torch.zeros((), dtype=scores.dtype), torch.zeros((), dtype=scores.dtype)
    balance = e * torch.sum(demand.to(scores.dtype) / slots * scores.mean(0))
    z = torch.logsumexp(logits, -1).square().mean()
    return balance, z


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff if denom < 1e-12 else diff / denom

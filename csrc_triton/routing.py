"""The router's selection in one kernel: softmax, top-k, renormalisation and counts.

    logits  [T, E] fp32          scores [T, E] fp32 softmax
    ids     [T, k] int64         the k largest scores of each token, largest first
                                 (ties: the lower expert id first, as a stable sort)
    gates   [T, k] fp32          their scores, divided by their sum (+ 1e-20) if renormalised
    counts  [E] int64            slots naming each expert (integer atomics: exact)

One program handles BLOCK_T tokens with all E experts in registers (E <= 4096); the k
picks are k rounds of a row maximum. Replaces ~10 launches of the torch path (softmax,
top-k, gather, sum, divide, and the four of the count).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from csrc_triton._common import (
    MAX_ROUTED_EXPERTS,
    check_positive_int,
    check_runnable,
    check_tensor,
    fix_interpreter_scalars,
    interpreting,
    next_pow2,
)

if interpreting():
    fix_interpreter_scalars()


@triton.jit
def _softmax_topk_kernel(
    L, stride_lt, stride_le,
    S, stride_st, stride_se,
    IDS, G, COUNTS,
    T, E,
    K: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr,
    RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    experts = tl.arange(0, E_POW2)
    tok_ok = tokens < T
    ok = tok_ok[:, None] & (experts < E)[None, :]
    logits = tl.load(L + tokens[:, None] * stride_lt + experts[None, :] * stride_le,
                     mask=ok, other=float("-inf"))  # fmt: skip
    logits = tl.where(tok_ok[:, None], logits, 0.0)  # no NaN from all -inf padding rows
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]  # [BLOCK_T, E_POW2]
    tl.store(S + tokens[:, None] * stride_st + experts[None, :] * stride_se, p, mask=ok)
    work = tl.where(ok, p, -1.0)  # padding experts never picked (scores are >= 0)
    picks = tl.arange(0, K_POW2)
    ids = tl.zeros((BLOCK_T, K_POW2), dtype=tl.int64)
    vals = tl.zeros((BLOCK_T, K_POW2), dtype=tl.float32)
    for j in tl.static_range(K):
        best = tl.max(work, axis=1)  # [BLOCK_T]
        # The lowest expert id among the maxima (torch's stable descending order).
        idx = tl.min(tl.where(work == best[:, None], experts[None, :], E_POW2), axis=1)
        ids = tl.where(picks[None, :] == j, idx.to(tl.int64)[:, None], ids)
        vals = tl.where(picks[None, :] == j, best[:, None], vals)
        work = tl.where(experts[None, :] == idx[:, None], -1.0, work)
        tl.atomic_add(COUNTS + idx, tl.full((BLOCK_T,), 1, tl.int64), mask=tok_ok)
    if RENORMALIZE:
        vals = vals / (tl.sum(vals, axis=1)[:, None] + 1e-20)
    out = tokens[:, None] * K + picks[None, :]
    out_ok = tok_ok[:, None] & (picks < K)[None, :]
    tl.store(IDS + out, ids, mask=out_ok)
    tl.store(G + out, vals, mask=out_ok)


def softmax_topk(
    logits: torch.Tensor, k: int, *, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores [T, E], ids [T, k], gates [T, k], counts [E]) of fp32 ``logits`` [T, E]
    as the module docstring says."""
    check_tensor("logits", logits, ndim=2, dtype=torch.float32)
    check_runnable("logits", logits)
    check_positive_int("k", k)
    t, e = logits.shape
    if not k <= e <= MAX_ROUTED_EXPERTS:
        raise ValueError(f"softmax_topk needs k <= E <= {MAX_ROUTED_EXPERTS}, got k={k}, E={e}")
    scores = torch.empty_like(logits, memory_format=torch.contiguous_format)
    ids = torch.empty((t, k), dtype=torch.int64, device=logits.device)
    gates = torch.empty((t, k), dtype=torch.float32, device=logits.device)
    counts = torch.zeros(e, dtype=torch.int64, device=logits.device)
    if t == 0:
        return scores, ids, gates, counts
    e_pow2 = max(2, next_pow2(e))
    block_t = max(1, min(64 if interpreting() else 16, 4096 // e_pow2))
    _softmax_topk_kernel[(triton.cdiv(t, block_t),)](
        logits, logits.stride(0), logits.stride(1),     # L, stride_lt, stride_le
        scores, scores.stride(0), scores.stride(1),     # S, stride_st, stride_se
        ids, gates, counts,                             # IDS, G, COUNTS
        t, e,                                           # T, E
        K=k, K_POW2=max(2, next_pow2(k)), E_POW2=e_pow2,
        RENORMALIZE=renormalize, BLOCK_T=block_t,
    )  # fmt: skip
    return scores, ids, gates, counts

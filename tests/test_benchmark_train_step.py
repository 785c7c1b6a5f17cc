"""benchmarks/train_step.py's baseline MoE (issue 28 item 4 b): its torch._grouped_mm path
over expert-sorted, padded rows computes the same function and gradients as a
per-expert loop (CPU, float32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.train_step import grouped_swiglu


def _grouped_mm_on_cpu() -> bool:
    try:
        a, b = torch.ones(4, 4), torch.ones(1, 4, 4)
        torch._grouped_mm(a, b, offs=torch.tensor([4], dtype=torch.int32))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


def _loop(x, ids, gates, w1, w2):
    """Each expert on its own tokens, gated, summed over the k slots."""
    h = w2.shape[2]
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        hg = x[tok] @ w1[e].T  # [n_e, 2h]
        y = (F.silu(hg[:, :h]) * hg[:, h:]) @ w2[e].T  # [n_e, d]
        out = out.index_add(0, tok, y * gates[tok, slot, None])
    return out


@pytest.mark.skipif(not _grouped_mm_on_cpu(), reason="torch._grouped_mm has no CPU path here")
def test_grouped_swiglu_equals_per_expert_loop():
    g = torch.Generator().manual_seed(0)
    n, d, h, e, k = 37, 16, 8, 6, 2
    x = torch.randn(n, d, generator=g)
    # Slot 0 picks among experts 0-2, slot 1 among 3-4: uneven groups, expert 5 empty.
    first = torch.randint(0, 3, (n,), generator=g)
    ids = torch.stack([first, torch.randint(3, 5, (n,), generator=g)], 1)  # [N, k]
    gates = torch.rand(n, k, generator=g)
    w1 = torch.randn(e, 2 * h, d, generator=g) * d**-0.5
    w2 = torch.randn(e, d, h, generator=g) * h**-0.5
    gy = torch.randn(n, d, generator=g)
    results = []
    for fn in (grouped_swiglu, _loop):
        leaves = [t.clone().requires_grad_() for t in (x, gates, w1, w2)]
        xl, gl, w1l, w2l = leaves
        y = fn(xl, ids, gl, w1l, w2l)
        y.backward(gy)
        results.append([y.detach(), *(t.grad for t in leaves)])
    for got, want, name in zip(*results, ("y", "dx", "dgates", "dw1", "dw2")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)

"""The router's softmax + top-k + renormalisation + counts as one Triton kernel
(``csrc_triton.routing``), differentiable; ``Router.fused_select`` turns it on.

    logits [T, E] fp32 -> scores [T, E], topk_ids [T, k], gates [T, k], counts [E]

Backward in torch, the gradient of ``gates = p[ids] / (sum p[ids] + 1e-20)`` and of the
softmax: d_v = (d_gates - sum_j d_gates_j gates_j) / S, d_p = d_scores + scatter(d_v),
d_logits = p * (d_p - sum_e d_p_e p_e).
"""

from __future__ import annotations

import torch
from torch import Tensor

from adaptive_moe.runtime.experts.kernel_autograd import _triton_usable


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on ``device`` (CUDA, or the CPU under the interpreter)."""
    return _triton_usable(device, torch.float32)


class _SoftmaxTopK(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, logits: Tensor, k: int, renormalize: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from csrc_triton.routing import softmax_topk as launch  # Triton only where it runs

        scores, ids, gates, counts = launch(logits.contiguous(), k, renormalize=renormalize)
        ctx.save_for_backward(scores, ids)
        ctx.renormalize = renormalize
        ctx.mark_non_differentiable(ids, counts)
        return scores, ids, gates, counts

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, d_scores: Tensor, _ids: None, d_gates: Tensor,
        _counts: None,
    ) -> tuple:  # fmt: skip
        scores, ids = ctx.saved_tensors
        d_p = d_scores.clone()  # [T, E]
        v = scores.gather(1, ids)  # [T, k] the picked scores
        d_v = d_gates
        if ctx.renormalize:
            total = v.sum(-1, keepdim=True) + 1e-20  # [T, 1]
            d_v = (d_gates - (d_gates * v / total).sum(-1, keepdim=True)) / total
        d_p.scatter_add_(1, ids, d_v)
        return scores * (d_p - (d_p * scores).sum(-1, keepdim=True)), None, None


def softmax_topk(
    logits: Tensor, k: int, renormalize: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(scores, topk_ids, gates, counts) of fp32 ``logits`` as the module docstring says."""
    return _SoftmaxTopK.apply(logits, k, renormalize)

"""The router's linear ``x @ w.T`` on bf16 tensor cores with fp32 accumulation and output.

    x   [T, d]   tokens (bf16 in a bf16 model; other dtypes are rounded to bf16 first)
    w   [E, d]   fp32 router weight (the master copy: it stays fp32 and gets an fp32 grad)
    out [T, E]   fp32 logits

``parts=1`` (``matmul_dtype="bfloat16"``): w rounded to bf16 once, so every logit carries
the weight's rounding (relative 2^-9 per element) and near-ties may pick differently
than in fp32. ``parts=2`` (``"bfloat16x2"``): w split into ``hi = bf16(w)`` and
``lo = bf16(w - hi)``, one GEMM against both stacked as [2E, d], the halves summed in
fp32: w is then represented to 2^-18 of each element, so with bf16 tokens (exact in
bf16) the logits differ from an fp32 GEMM's by about its own rounding, while the GEMM
runs on tensor cores (N = 2E is small: the cost is reading x once).

Backward, gradients in fp32 accumulation: ``dw = g^T x`` from g's parts (g = g_hi + g_lo
with ``parts=2``), ``dx = g w`` from the products ``g_hi w_hi + g_lo w_hi + g_hi w_lo``
(one GEMM with the three concatenated along the contraction), or ``g_hi w_hi``.

On CUDA the GEMMs are ``torch.mm(..., out_dtype=torch.float32)`` (cuBLAS, bf16 operands,
fp32 output); elsewhere the same function in fp32 (a product of two bf16 numbers is
exact in fp32), which is what the CPU tests check.
"""

from __future__ import annotations

import torch
from torch import Tensor

# torch.mm(a, b, out_dtype=...) (aten::mm.dtype), CUDA only; probed once, at import.
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def split_bf16(t: Tensor, parts: int) -> Tensor:
    """``t`` [R, C] (fp32) as ``parts`` bf16 matrices stacked [parts * R, C] whose sum is
    ``t``: bf16(t), or hi = bf16(t) over bf16(t - hi)."""
    out = torch.empty((parts * t.shape[0], t.shape[1]), dtype=torch.bfloat16, device=t.device)
    out[: t.shape[0]].copy_(t)
    if parts == 2:
        torch.sub(t, out[: t.shape[0]], out=out[t.shape[0] :])  # fp32 difference, rounded
    return out


def mm_as(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``a @ b`` of bf16 matrices accumulated in fp32 and returned in ``dtype`` (fp32 or
    bf16: one rounding of the fp32 sum)."""
    if not a.is_cuda:
        return torch.mm(a.float(), b.float()).to(dtype)
    if dtype == torch.bfloat16:
        return torch.mm(a, b)
    if _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    # torch without mm's out_dtype: cuBLAS still accumulates in fp32 but rounds the
    # output to bf16 once.
    return torch.mm(a, b).float()


def _sum_parts(t: Tensor, parts: int, dim: int) -> Tensor:
    """The fp32 sum of the ``parts`` equal blocks of ``t`` along ``dim``."""
    if parts == 1:
        return t
    first, second = t.chunk(2, dim=dim)
    return first + second


class _TensorCoreLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, w: Tensor, parts: int
    ) -> Tensor:
        xb = x.to(torch.bfloat16)  # [T, d]; no copy for bf16 tokens
        w_parts = split_bf16(w.detach(), parts)  # [parts * E, d]
        ctx.save_for_backward(xb, w_parts)
        ctx.x_dtype, ctx.parts = x.dtype, parts
        out = mm_as(xb, w_parts.t(), torch.float32)  # [T, parts * E]
        return _sum_parts(out, parts, dim=1)  # [T, E]

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: Tensor) -> tuple:
        xb, w_parts = ctx.saved_tensors
        parts = ctx.parts
        g_parts = split_bf16(g.float().t(), parts).t()  # [T, parts * E]: g_hi | g_lo
        dx = dw = None
        if ctx.needs_input_grad[0]:
            if parts == 1:
                dx = mm_as(g_parts, w_parts, ctx.x_dtype)  # [T, d]
            else:
                # g w = g_hi w_hi + g_lo w_hi + g_hi w_lo (g_lo w_lo is below fp32's
                # rounding): one GEMM over the three concatenated along the contraction.
                e = w_parts.shape[0] // 2
                g_cat = torch.cat([g_parts, g_parts[:, :e]], dim=1)  # [T, 3E]
                w_cat = torch.cat([w_parts[:e], w_parts[:e], w_parts[e:]])  # [3E, d]
                dx = mm_as(g_cat, w_cat, ctx.x_dtype)  # [T, d]
        if ctx.needs_input_grad[1]:
            dw = _sum_parts(mm_as(g_parts.t(), xb, torch.float32), parts, dim=0)  # [E, d]
        return dx, dw, None


def tensor_core_linear(x: Tensor, w: Tensor, parts: int) -> Tensor:
    """[T, E] fp32 ``x @ w.T`` as the module docstring says (differentiable in x and w)."""
    if parts not in (1, 2):
        raise ValueError(f"parts must be 1 or 2, got {parts!r}")
    return _TensorCoreLinear.apply(x, w, parts)

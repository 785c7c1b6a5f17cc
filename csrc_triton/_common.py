"""Argument checks shared by the launchers (Triton is imported only inside
``fix_interpreter_scalars``)."""

from __future__ import annotations

import os

import torch

_TRUTHY = ("1", "true", "on", "yes")
# Experts of the fused routing kernel (csrc_triton.routing): one row of scores in registers.
MAX_ROUTED_EXPERTS = 4096


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUTHY


def fix_interpreter_scalars() -> None:
    """Let the interpreter use runtime scalar arguments as loop bounds under numpy >= 2.4.

    The interpreter hands a kernel every int argument as a 1-element 1-D array and
    implements ``tl.tensor.__index__`` (what ``range(0, K, BLOCK_K)`` calls) as
    ``int(array)``; numpy 2.4 made that a TypeError for arrays with ndim > 0
    (triton-lang/triton#9171, in triton 3.6). Every kernel here loops to a runtime bound,
    so each kernel module calls this when it is imported under the interpreter; it
    replaces that one conversion with one that takes the single element, and does nothing
    when numpy still converts such arrays or the interpreter was already patched. Compiled
    kernels never reach this code.
    """
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.zeros(1, dtype=np.int32))
        return  # numpy < 2.4: the interpreter's own conversion works
    except TypeError:
        pass
    original = interpreter._patch_lang_tensor
    if getattr(original, "_adaptive_moe_scalar_index", False):
        return

    def index(self: object) -> int:
        data = self.handle.data
        # Only a scalar (one element) has an index; a block still raises as before.
        return int(data.reshape(-1)[0]) if data.size == 1 else int(data)

    def patch_lang_tensor(tensor: type, scope: object) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", index)

    patch_lang_tensor._adaptive_moe_scalar_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int,
    shape: tuple[int | None, ...] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise ValueError unless ``t`` is a tensor of ``ndim`` dims matching ``shape`` (``None``
    entries are free), ``dtype`` and ``device``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None and any(s is not None and s != n for s, n in zip(shape, t.shape)):
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    return t


def check_runnable(name: str, t: torch.Tensor) -> None:
    """Triton runs CUDA tensors, or CPU tensors under the interpreter."""
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{name} is on {t.device}: Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 for CPU tensors)"
        )


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``tl.dot`` input precision: fp32 operands use TF32 only when allowed."""
    if not isinstance(allow_tf32, bool):
        raise ValueError(f"allow_tf32 must be a bool, got {allow_tf32!r}")
    return "tf32" if allow_tf32 or dtype != torch.float32 else "ieee"

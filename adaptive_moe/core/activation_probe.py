"""The construction-time check of a callable expert activation: torch only, nothing of
the package (``core.config`` imports it lazily, so the two cannot form a cycle)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def probe_activation(fn: Callable[[Tensor], Tensor]) -> None:
    """Raise ValueError for a callable activation that writes into its input
    (``torch.relu_``, ``functools.partial(F.silu, inplace=True)``, ``t.mul_(...)``) or is
    not elementwise (another shape out).

    The layer's torch paths keep the pre-activation for backward: an in-place activation
    overwrites it, and autograd fails deep in the backward (or, without a check there,
    computes a wrong gradient). One call on a small CPU tensor finds it: the input's
    version counter moves, or its values change. A callable that cannot run
    on the probe (CUDA-only, say) is not judged here."""
    probe = torch.linspace(-2.0, 2.0, 8, device="cpu").view(2, 4)  # [2, 4]
    before, version = probe.clone(), probe._version
    try:
        with torch.no_grad():
            out = fn(probe)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return
    # The version counter sees in-place ops; the values also see writes through .data.
    if probe._version != version or not torch.equal(probe, before):
        raise ValueError(
            f"activation {fn!r} modifies its input in place; the layer keeps that input for "
            f"backward: pass the out-of-place form (torch.relu, not torch.relu_; "
            f"inplace=False)"
        )
    if not isinstance(out, Tensor) or out.shape != probe.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"activation {fn!r} must be elementwise (a tensor of its input's shape out): "
            f"given [2, 4] it returned {got}"
        )

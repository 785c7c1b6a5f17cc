"""When the layer takes its inference path (``InferenceConfig``), and the path's
default kernel."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from adaptive_moe.runtime.experts.kernels import (
    _triton_usable,
)

Mode = Literal["auto", "off"]
Dispatch = Literal["auto", "gather", "exchange"]
MODES: tuple[str, ...] = ("auto", "off")
DISPATCHES: tuple[str, ...] = ("auto", "gather", "exchange")
# Kernels that read the grouping offsets from device memory (no host counts).
DEVICE_OFFSET_KERNELS: tuple[str, ...] = ("scatter", "gemv")
# ... and those that need no host count when every slot is routed (``StaticRows.complete``).
COMPLETE_ROWS_KERNELS: tuple[str, ...] = (*DEVICE_OFFSET_KERNELS, "grouped_mm")
# Up to this many rows per expert on average the small-batch kernel is the default.
SMALL_BATCH_ROWS = 16


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """When and how the layer runs its inference path.

    Attributes:
        mode: ``"auto"``: whenever the forward records no autograd graph (under
            ``torch.no_grad()`` / ``torch.inference_mode()``, or when neither the input
            nor any parameter requires a gradient); ``"off"``: always the training path.
        dispatch: across ranks, ``"gather"``: the static token all-gather + local
            experts + reduce-scatter of this module (no host sync); ``"exchange"``: the
            training path's variable-split all-to-all (one host sync per forward);
            ``"auto"``: gather when the group has one rank or ``tokens_per_rank`` is
            set, else exchange (gather needs every rank to pass the same T).
        tokens_per_rank: T_pad, the fixed number of rows every rank contributes to the
            gather (its tokens, padded): ranks may then pass different T <= T_pad.
            None: every rank must pass the same T.
        cuda_graph_tokens: 0 (default): off. N > 0: on one process on CUDA, in eval
            mode, the layer captures its inference forward for each T <= N as a CUDA
            graph (``GraphCache``: the second call at a given (T, dtype, top_k,
            capacity, strategy) captures, later calls replay) and returns a copy of the
            graph's output. Never inside the caller's own capture, under autocast, or
            with hooks on the router; captured graphs are dropped when a weight tensor
            is replaced (``.to()``, a new ``Parameter``). ``last_router_logits`` is then
            the graph's buffer, overwritten by the next replay at the same T.
    """

    mode: Mode = "auto"
    dispatch: Dispatch = "auto"
    tokens_per_rank: int | None = None
    cuda_graph_tokens: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"InferenceConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.dispatch not in DISPATCHES:
            raise ValueError(
                f"InferenceConfig.dispatch must be one of {DISPATCHES}, got {self.dispatch!r}"
            )
        t = self.tokens_per_rank
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(
                f"InferenceConfig.tokens_per_rank must be a positive integer or None, got {t!r}"
            )
        g = self.cuda_graph_tokens
        if isinstance(g, bool) or not isinstance(g, int) or g < 0:
            raise ValueError(
                f"InferenceConfig.cuda_graph_tokens must be an integer >= 0 (0: off), got {g!r}"
            )

    def static_dispatch(self, world: int) -> bool:
        """Whether a group of ``world`` ranks runs the static gather path."""
        if world == 1 or self.dispatch == "gather":
            return True
        return self.dispatch == "auto" and self.tokens_per_rank is not None


def default_inference_kernel(
    device: torch.device, dtype: torch.dtype, tokens: int, top_k: int, num_experts: int
) -> str | None:
    """The small-batch kernel where Triton runs on a GPU and the experts average at most
    ``SMALL_BATCH_ROWS`` rows each (``tokens`` * k / E, tokens: the static bound); None:
    the layer's usual default. Measured on one H200 (benchmarks/RESULTS.md): gemv beats
    scatter at 1-128 tokens on fine256 (E 256, k 8) and at 1-16 on mixtral (E 8, k 2),
    scatter wins at 128 tokens on mixtral (32 rows per expert)."""
    if device.type != "cuda" or not _triton_usable(device, dtype):
        return None
    if tokens * top_k > SMALL_BATCH_ROWS * num_experts:
        return None
    return "gemv"

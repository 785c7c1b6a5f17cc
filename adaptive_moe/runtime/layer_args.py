"""Argument errors a rank can have alone, carried through the count exchange.

A bad argument on one rank, or ranks forcing different strategies, would leave the
other ranks waiting in a collective that rank never joins. Each rank instead sends an
error code (and its forced strategy) along with its counts, and every rank raises the
same ValueError after the exchange.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from adaptive_moe.core.config import check_capacity_factor, check_top_k
from adaptive_moe.core.strategy import Strategy

# Argument errors one rank can have alone, by the code it sends in the count exchange.
BAD_TOP_K, BAD_SHAPE, BAD_IDS, BAD_RANGE, BAD_WEIGHTS, BAD_CAPACITY = range(1, 7)
ARGUMENT_ERRORS = (
    "",
    "a top_k outside [1, num_experts]",
    "topk_ids / topk_weights that are not both [T, k] tensors (T: the tokens of x)",
    "topk_ids that are not an integer tensor",
    "topk_ids outside [-1, num_experts)",
    "topk_weights that are not a floating-point tensor",
    "a capacity_factor that is not a finite number with |f| <= 1e6",
)


def first_error(
    *checks: tuple[int, Callable[[], None]] | None,
) -> tuple[int, ValueError | None]:
    """(code, error) of the first check that raises ValueError, else (0, None)."""
    for check in checks:
        if check is None:
            continue
        code, fn = check
        try:
            fn()
        except ValueError as err:
            return code, err
    return 0, None


def call_errors(
    top_k: int | None, capacity_factor: float | None, num_experts: int
) -> tuple[int, ValueError | None]:
    """(code, error) of a forward's per-call overrides (``top_k``, ``capacity_factor``;
    None: the layer's own), else (0, None)."""
    return first_error(
        (BAD_TOP_K, lambda: check_top_k(top_k, num_experts)) if top_k is not None else None,
        (BAD_CAPACITY, lambda: check_capacity_factor(capacity_factor))
        if capacity_factor is not None
        else None,
    )


def routing_checks(
    tokens: int, num_experts: int, topk_ids: object, topk_weights: object
) -> list[tuple[int, Callable[[], None]]]:
    """The checks of a given routing, in order (each later one assumes the earlier)."""

    def shape() -> None:
        ok = isinstance(topk_ids, torch.Tensor) and isinstance(topk_weights, torch.Tensor)
        if not ok or topk_ids.dim() != 2 or topk_ids.shape != topk_weights.shape:
            got = [_describe(t) for t in (topk_ids, topk_weights)]
            raise ValueError(f"topk_ids and topk_weights must both be [T, k] tensors, got {got}")
        if topk_ids.shape[0] != tokens:
            raise ValueError(
                f"topk_ids must have T={tokens} rows (the tokens of x), got {topk_ids.shape[0]}"
            )

    def ids() -> None:
        if topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
            raise ValueError(f"topk_ids must be an integer tensor, got dtype {topk_ids.dtype}")

    def value_range() -> None:
        if topk_ids.numel() and (int(topk_ids.min()) < -1 or int(topk_ids.max()) >= num_experts):
            raise ValueError(f"topk_ids must lie in [-1, {num_experts}), got values outside")

    def weights() -> None:
        if not topk_weights.is_floating_point():
            raise ValueError(
                f"topk_weights must be a floating-point tensor, got dtype {topk_weights.dtype}"
            )

    return [
        (BAD_SHAPE, shape),
        (BAD_IDS, ids),
        (BAD_RANGE, value_range),
        (BAD_WEIGHTS, weights),
    ]


def _describe(t: object) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_device(device: object) -> torch.device | None:
    """``device`` as a torch.device; ValueError for one this machine does not have."""
    if device is None:
        return None
    try:
        dev = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device must be a torch.device or a device string, got {device!r}"
        ) from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r}: CUDA is not available on this machine "
                f"(torch.cuda.is_available() is False); pass device='cpu' or leave it None"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA devices"
            )
    return dev


def flat_input(x: object, d_model: int, weights: torch.device) -> torch.Tensor:
    """x [..., d_model] as [T, d_model]; ValueError for anything else, an integer x or a
    forward on the meta device."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != d_model:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must have last dimension d_model={d_model}, got shape {shape}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    check_not_meta(x, weights)
    return x.reshape(-1, d_model)


def check_not_meta(x: torch.Tensor, weights: torch.device) -> None:
    """ValueError for a forward on the meta device (shapes, no data: nothing to route by,
    and the count exchange would read no counts)."""
    if x.device.type == "meta" or weights.type == "meta":
        where = "x is" if x.device.type == "meta" else "the layer's weights are"
        raise ValueError(
            f"{where} on the meta device (shapes without data): a MoE layer routes by the "
            f"values; build or move the layer and its input to a real device (a layer built "
            f"on meta: .to_empty(device=...) then load its weights)"
        )


def check_agreement(
    errors: list[int],
    strategies: list[int],
    error: ValueError | None,
    valid: Sequence[Strategy],
) -> None:
    """Raise the same ValueError on every rank of the group when any rank passed a bad
    argument (``errors``: each rank's code) or the ranks forced different strategies
    (``strategies``: each rank's code; 0 none, i + 1 ``valid[i]``, -1 one the layer
    cannot run); ``error``: this rank's own detail, chained."""
    bad = [r for r, c in enumerate(errors) if c]
    if bad:
        what = ARGUMENT_ERRORS[errors[bad[0]]]
        raise ValueError(f"rank(s) {bad} of the expert group passed {what}") from error
    if len(strategies) == 1:
        return  # one process: the layer's own check names the bad strategy in detail
    if -1 in strategies:
        bad = [r for r, c in enumerate(strategies) if c == -1]
        raise ValueError(
            f"rank(s) {bad} of the expert group forced a strategy this layer cannot run "
            f"(valid r: {sorted({s.r for s in valid})}, "
            f"kernels: {sorted({s.kernel for s in valid})})"
        )
    if len(set(strategies)) > 1:
        named = [f"rank {r}: {valid[c - 1] if c else 'none'}" for r, c in enumerate(strategies)]
        raise ValueError(
            f"the ranks of the expert group force different strategies ({', '.join(named)});"
            f" pass the same strategy= on every rank"
        )


def invalid_strategy_message(strategy: Strategy, valid: Sequence[Strategy], where: str) -> str:
    """Why ``strategy`` is not among ``valid``: each field whose value no valid strategy
    has, with the values this layer accepts for it (all four fields listed when only the
    combination is invalid)."""
    fields = ("r", "a2a", "degree", "kernel")
    allowed = {f: sorted({getattr(s, f) for s in valid}) for f in fields}
    bad = [f for f in fields if getattr(strategy, f) not in allowed[f]] or list(fields)
    detail = "; ".join(f"{f}={getattr(strategy, f)!r} (valid {f}: {allowed[f]})" for f in bad)
    return f"strategy {strategy} is not valid for this layer ({where}): {detail}"

"""What the grouped-GEMM kernels of ``scatter_gemm`` and ``weight_grad`` share: the tile
order, the expert of a row tile, the shared-memory pruner, the launch choice (autotuned,
fixed, interpreter) and the routing checks. Notation as in ``csrc_triton.scatter_gemm``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from csrc_triton._common import check_tensor, fix_interpreter_scalars, interpreting

if interpreting():
    fix_interpreter_scalars()


@triton.jit
def _swizzle(pid, num_rows, num_cols, GROUP: tl.constexpr):
    """Grouped tile order: GROUP row tiles share each column tile while it is in L2."""
    width = GROUP * num_cols
    first = (pid // width) * GROUP
    size = tl.minimum(num_rows - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size


@triton.jit
def _expert_tile(offsets, pid_m, E, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first grouped row, end of the expert's rows) of row tile ``pid_m``.

    The expert comes back as >= E for the spare tiles past the last expert's rows."""
    idx = tl.arange(0, E_POW2)
    lo = tl.load(offsets + idx, mask=idx < E, other=0)
    hi = tl.load(offsets + idx + 1, mask=idx < E, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    expert = tl.sum((tl.cumsum(tiles, 0) <= pid_m).to(tl.int32), 0)
    first_tile = tl.sum(tl.where(idx < expert, tiles, 0), 0)
    mine = tl.minimum(expert, E - 1)
    row_start = tl.load(offsets + mine) + (pid_m - first_tile) * BLOCK_M
    return expert, row_start, tl.load(offsets + mine + 1)


# A block may use 227 KB of shared memory on H100; each pipeline stage holds one tile of
# each operand.
_SMEM_BYTES = 227 * 1024


def _fits_smem(rows: str, inner: str, cols: str, operand: str) -> Callable[..., list]:
    """Autotune pruner: drop configs whose pipelined operand tiles exceed shared memory
    (fp32 operands take twice the bytes of bf16), sparing their compilation."""

    def prune(configs: list, named_args: dict, **kwargs: object) -> list:
        size = named_args[operand].element_size()
        return [
            c
            for c in configs
            if c.num_stages * size * c.kwargs[inner] * (c.kwargs[rows] + c.kwargs[cols])
            <= _SMEM_BYTES
        ]

    return prune


def _launchable(
    raw: object,
    tuned: object,
    interpreter_meta: dict,
    ieee_meta: dict,
    precision: str,
    config: triton.Config | None = None,
) -> tuple[object, dict]:
    """(kernel, fixed launch meta): autotuned on GPU, one fixed config otherwise; a given
    ``config`` (tests, tile sweeps) is launched as it is."""
    if config is not None:
        if not isinstance(config, triton.Config):
            raise ValueError(f"config must be a triton.Config or None, got {config!r}")
        meta = dict(config.kwargs)
        meta.update(num_warps=config.num_warps, num_stages=config.num_stages)
        return raw, meta
    if interpreting():
        return raw, interpreter_meta
    if precision == "ieee":
        return raw, ieee_meta
    return tuned, {}


def _check_routing(slots: object, offsets: object, device: torch.device) -> tuple[int, int]:
    """(E, M) of validated routing tensors."""
    check_tensor("slots", slots, ndim=1, dtype=torch.int64, device=device)
    check_tensor("offsets", offsets, ndim=1, dtype=torch.int64, device=device)
    if offsets.numel() < 2:
        raise ValueError(f"offsets must hold E + 1 >= 2 entries, got {offsets.numel()}")
    return offsets.numel() - 1, slots.numel()


def _check_out(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> None:
    if out is not None:
        check_tensor("out", out, ndim=len(shape), shape=shape, dtype=like.dtype, device=like.device)

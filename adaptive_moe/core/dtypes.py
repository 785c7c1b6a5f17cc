"""The floating-point dtypes the layer supports: the one map between their names (as
strategy tables, configs and command lines spell them) and ``torch.dtype``."""

from __future__ import annotations

import types
from collections.abc import Mapping

import torch

from adaptive_moe.core.checks import choice

TORCH_DTYPES: Mapping[str, torch.dtype] = types.MappingProxyType(
    {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
)
DTYPES: tuple[str, ...] = tuple(TORCH_DTYPES)
DTYPE_NAMES: Mapping[torch.dtype, str] = types.MappingProxyType(
    {v: k for k, v in TORCH_DTYPES.items()}
)
SHORT_NAMES: Mapping[str, str] = types.MappingProxyType(
    {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
)


def dtype_of(name: str) -> torch.dtype:
    """``torch.dtype`` of ``name`` (``"float32"``, ``"bfloat16"``, ``"float16"``)."""
    choice("dtype", name, DTYPES)
    return TORCH_DTYPES[name]


def name_of(dtype: torch.dtype) -> str:
    """The name of a supported ``dtype``; ValueError for any other."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(DTYPE_NAMES)}, got {dtype!r}")
    return DTYPE_NAMES[dtype]

"""The floating-point dtypes the layer supports: the one map between their names (as
strategy tables, configs and command lines spell them) and ``torch.dtype``."""

from __future__ import annotations

import types
from collections.abc import Mapping

import torch

from adaptive_moe.core.checks import choice
from adaptive_moe.core.dtype_names import DTYPES
from adaptive_moe.core.dtype_names import SHORT_NAMES as SHORT_NAMES  # re-exported

TORCH_DTYPES: Mapping[str, torch.dtype] = types.MappingProxyType(
    {name: getattr(torch, name) for name in DTYPES}
)
DTYPE_NAMES: Mapping[torch.dtype, str] = types.MappingProxyType(
    {v: k for k, v in TORCH_DTYPES.items()}
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

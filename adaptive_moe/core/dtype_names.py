"""The supported dtypes by name, without torch: what the planner and the strategy
tables need (names, short names, bytes per element) on a machine that plans but never
runs a layer. ``core.dtypes`` builds the ``torch.dtype`` map from these names."""

from __future__ import annotations

import types
from collections.abc import Mapping

ITEMSIZES: Mapping[str, int] = types.MappingProxyType({"float32": 4, "bfloat16": 2, "float16": 2})
DTYPES: tuple[str, ...] = tuple(ITEMSIZES)
SHORT_NAMES: Mapping[str, str] = types.MappingProxyType(
    {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
)

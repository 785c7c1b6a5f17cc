"""The layer shape of the ``profile`` and ``plan`` command lines: a transformers
config.json overridden by the shape flags. Without torch, so that planning stays light."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from adaptive_moe.core.config import ACTIVATIONS
from adaptive_moe.core.config_values import config_int
from adaptive_moe.core.dtype_names import DTYPES
from adaptive_moe.core.fileio import read_json

# transformers config.json keys, in order of preference, for each shape field.
_CONFIG_KEYS = {
    "d_model": ("hidden_size",),
    "d_ff": ("moe_intermediate_size", "intermediate_size"),
    "experts": ("num_local_experts", "num_experts", "n_routed_experts"),
    "top_k": ("num_experts_per_tok",),
}


def shape_from_config(path: Path) -> dict[str, Any]:
    """Shape fields found in a transformers config.json."""
    cfg = read_json(path, "--config")
    if not isinstance(cfg, dict):
        raise ValueError(f"--config {path}: expected a JSON object")
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    found: dict[str, Any] = {}
    for field, keys in _CONFIG_KEYS.items():
        # The first spelling present decides; a bad value there is an error, not a skip.
        key = next((k for k in keys if cfg.get(k) is not None), None)
        if key is not None:
            found[field] = config_int(f"--config {path}", key, cfg[key], least=1)
    if cfg.get("hidden_act") in ACTIVATIONS:
        found["activation"] = cfg["hidden_act"]
    dtype = cfg.get("dtype", cfg.get("torch_dtype"))
    if dtype in DTYPES:
        found["dtype"] = dtype
    return found


def shape_fields(args: argparse.Namespace, optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """The layer shape of ``--config`` overridden by the shape flags (and the ``optional``
    ones); ValueError naming the flags still missing. Shared by ``profile`` and ``plan``."""
    found = shape_from_config(args.config) if args.config else {}
    for field in ("d_model", "d_ff", "experts", "top_k", *optional):
        if getattr(args, field) is not None:
            found[field] = getattr(args, field)
    missing = [f for f in ("d_model", "d_ff", "experts", "top_k") if f not in found]
    if missing:
        flags = ", ".join("--" + f.replace("_", "-") for f in missing)
        raise ValueError(f"the layer shape needs {flags} (or a --config that has them)")
    return found

"""Values read from a transformers configuration: its ``config.json`` (the calculator,
``profile`` and ``plan``) or the attributes of a loaded model's modules (``wrap``).

One check per kind of value, shared by every such reader, so that a field that is present
with a bad value (``"hidden_size": NaN``, ``64.5``, ``"64"``) is reported as invalid --
naming the field, the value and what is valid -- and never as missing, skipped in favour
of another spelling, or silently converted (``int(2.7)``, ``bool("false")``). Torch-free,
like ``core.config``.
"""

from __future__ import annotations

import math

from adaptive_moe.core.checks import is_int


def config_int(where: str, key: str, value: object, least: int = 0) -> int:
    """``value`` of field ``key`` (read from ``where``) as an integer ``>= least``."""
    if not is_int(value) or value < least:
        raise ValueError(
            f"{where}: {key}={value!r} is invalid: it must be an integer >= {least}{_hint(value)}"
        )
    return value


def config_float(where: str, key: str, value: object, least: float | None = None) -> float:
    """``value`` of field ``key`` as a finite number (``>= least`` when given)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or (least is not None and value < least):
        bound = f" >= {least}" if least is not None else ""
        raise ValueError(
            f"{where}: {key}={value!r} is invalid: it must be a finite number{bound}{_hint(value)}"
        )
    return float(value)


def config_bool(where: str, key: str, value: object) -> bool:
    """``value`` of field ``key`` as a boolean (JSON ``true`` / ``false``)."""
    if not isinstance(value, bool):
        raise ValueError(
            f"{where}: {key}={value!r} is invalid: it must be true or false{_hint(value)}"
        )
    return value


def _hint(value: object) -> str:
    if isinstance(value, str):
        return f" (got a string: write the value without quotes, {value})"
    if isinstance(value, bool):
        return " (got a boolean)"
    return ""

"""Argument types for the command lines (``calc``, ``profile``, ``train``): each parses
one flag's text or raises ``argparse.ArgumentTypeError`` saying what is valid, which
argparse reports as ``argument --flag: '<text>' is not ...`` and exit status 2.

    p.add_argument("--layers", type=cli_types.positive_int)

Every integer is bounded: a count (steps, batches, repeats, checkpoints) by ``MAX_COUNT``,
which at a second each is 30 years; any other integer by ``MAX_INT`` (torch's int64),
so that no huge number reaches a loop, an allocator or a C integer. Sizes that would
not fit in memory are refused later, against the device (``core.sizes``).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from adaptive_moe.core import fileio
from adaptive_moe.core.config import check_capacity_factor

MAX_COUNT = 10**9  # steps, batches, repeats, buckets, checkpoints
MAX_INT = 2**63 - 1  # any other integer (int64, what torch and C code take)
MAX_LAYERS = 10**4  # transformer blocks: the calculator walks every one (quadratically)
MAX_SEED = 2**32 - 1  # seeds are mixed into torch.manual_seed's 64 bits
MAX_SECONDS = 10**7  # timeouts: about 116 days (below threading's TIMEOUT_MAX)
MAX_GIB = 2**33  # memory sizes: 8 EiB, where a byte count still fits int64


def _number(
    cast: Callable[[str], float], least: float, what: str, most: float = math.inf
) -> Callable[[str], float]:
    """A parser of finite numbers in [``least``, ``most``] (ints written like ``4096``
    or ``4e3``)."""

    def parse(text: str) -> float:
        try:
            value = cast(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        # the range first: math.isfinite cannot take an int beyond a float's range
        if not (least <= value <= most and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type by it in some messages
    return parse


def _integer(text: str) -> int:
    """``int(text)``, also for an integral float spelling such as ``1e6``."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise
        return int(value)


positive_int = _number(_integer, 1, "a positive integer <= 2**63-1", MAX_INT)
non_negative_int = _number(_integer, 0, "an integer >= 0 and <= 2**63-1", MAX_INT)
count = _number(_integer, 1, "a positive integer <= 10**9", MAX_COUNT)
non_negative_count = _number(_integer, 0, "an integer >= 0 and <= 10**9", MAX_COUNT)
layer_count = _number(_integer, 1, "a positive integer <= 10**4", MAX_LAYERS)
seed = _number(_integer, 0, "an integer >= 0 and <= 2**32-1", MAX_SEED)
positive_float = _number(float, math.ulp(0.0), "a positive number")
seconds = _number(float, math.ulp(0.0), "a positive number of seconds <= 10**7", MAX_SECONDS)
non_negative_float = _number(float, 0.0, "a number >= 0")
gib = _number(float, math.ulp(0.0), "a positive number of GiB <= 2**33", MAX_GIB)
non_negative_gib = _number(float, 0.0, "a number of GiB >= 0 and <= 2**33", MAX_GIB)
finite_float = _number(float, -math.inf, "a finite number")


def fraction(text: str) -> float:
    """A number in the open interval (0, 1)."""
    value = positive_float(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in (0, 1)")
    return value


def capacity_factor(text: str) -> float:
    """A capacity factor: > 0 fixed, 0 dropless, < 0 dropless capped (``|f| <= 1e6``)."""
    value = finite_float(text)
    try:
        check_capacity_factor(value, "capacity factor")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def count_list(text: str) -> tuple[int, ...]:
    """``"16,32"`` -> ``(16, 32)``: comma-separated positive counts (<= 10**9)."""
    return tuple(count(v) for v in text.split(","))


def non_negative_int_list(text: str) -> tuple[int, ...]:
    """``"0,4,8,8"`` -> ``(0, 4, 8, 8)``: comma-separated integers >= 0."""
    return tuple(non_negative_int(v) for v in text.split(","))


def comma_list(text: str) -> tuple[str, ...]:
    """``"a,b"`` -> ``("a", "b")``."""
    return tuple(text.split(","))


def _path_type(check: Callable[[str, str], object], what: str) -> Callable[[str], Path]:
    """An argparse type running ``check(text, flag)`` (argparse names the flag itself)."""

    def parse(text: str) -> Path:
        try:
            check(text, "")
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).strip()) from None
        return Path(text)

    parse.__name__ = what
    return parse


input_file = _path_type(fileio.check_input_file, "an input file")
output_dir = _path_type(fileio.check_output_dir, "an output directory")
output_file = _path_type(fileio.check_output_file, "an output file")

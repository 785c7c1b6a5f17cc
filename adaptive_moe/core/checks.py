"""Argument checks shared across the package: each raises ``ValueError`` naming the
argument, the value and what is valid. ``bool`` is never accepted as an integer."""

from __future__ import annotations

import math
from typing import TypeGuard


def is_int(value: object) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(name: str, value: object) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def non_negative_int(name: str, value: object) -> None:
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def int_at_least(name: str, value: object, least: int) -> None:
    if not is_int(value) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def int_between(name: str, value: object, low: int, high: int, high_name: str) -> None:
    """``low <= value <= high``; ``high_name`` says where the bound comes from."""
    if not is_int(value) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high_name}={high}], got {value!r}")


def choice(name: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}, got {value!r}")


def divisors(n: int) -> tuple[int, ...]:
    """The positive divisors of ``n`` in increasing order (in sqrt(n) steps)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return (*small, *(n // d for d in reversed(small) if d * d != n))


def check_divides(name: str, value: object, total: int, what: str) -> None:
    """``value`` a positive integer dividing ``total`` (``what`` says which total, e.g.
    ``"world_size=4"``); the message lists the valid values."""
    if not is_int(value) or value < 1 or total % value:
        raise ValueError(
            f"{name} must be a positive integer dividing {what} "
            f"(one of {', '.join(map(str, divisors(total)))}), got {value!r}"
        )


def check_ranks_per_node(
    ranks_per_node: object, world_size: int, name: str = "ranks_per_node"
) -> None:
    """None, or a positive integer dividing ``world_size``; the message lists the valid
    values. ``name``: the flag's, on a command line."""
    if ranks_per_node is not None:
        check_divides(name, ranks_per_node, world_size, f"the world size {world_size}")

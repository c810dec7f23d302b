"""Validation of plain numbers in configs and options, with one wording for every error.

Example:
    >>> check_int(4, "batch_size", 1)
    4
    >>> check_number(0.0, "lr", 0.0, strict=True)
    Traceback (most recent call last):
    ValueError: lr must be a finite number > 0.0, got 0.0
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_int", "check_number"]


def check_int(value: Any, what: str, low: int) -> int:
    """`value` if it is an integer >= `low` (a bool is not one).

    Raises:
        ValueError: naming `what`, the allowed range and the value given.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")
    return value


def check_number(value: Any, what: str, low: float, *, strict: bool = False) -> float:
    """`value` as a float if it is a finite number >= `low` (> `low` when `strict`).

    Raises:
        ValueError: naming `what`, the allowed range and the value given.
    """
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        raise ValueError(f"{what} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)

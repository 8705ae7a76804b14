"""Argument checks shared by the data modules (one error message per kind of mistake)."""

from __future__ import annotations

import operator
from typing import Any

from atprobe.errors import AtprobeError


def check_rate(rate: float) -> float:
    try:
        r = float(rate)
    except (TypeError, ValueError):
        raise AtprobeError(f"label noise rate must be a number in [0, 1], got {rate!r}") from None
    if not (0.0 <= r <= 1.0):  # also rejects NaN
        raise AtprobeError(f"label noise rate must be in [0, 1], got {rate!r}")
    return r


def check_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise AtprobeError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise AtprobeError(f"{what} must be an integer, got {value!r}") from None

"""Small checks on values read from JSON files, shared by the COCO readers."""
from __future__ import annotations

import json
import math
from numbers import Real
from pathlib import Path
from typing import Any

__all__ = ["is_int", "is_number", "finite_number", "read_json"]


def is_int(value: Any) -> bool:
    """An integer, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number (int, float, numpy scalar), not a bool; NaN and inf included."""
    return isinstance(value, Real) and not isinstance(value, bool)


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float, or None (not a number, NaN/inf, or an integer too large for a float)."""
    if not is_number(value):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def read_json(path: str | Path, what: str = "file") -> Any:
    """A JSON file's content, read as UTF-8 (with or without BOM); ValueError naming ``path`` and the problem."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: {what} is not valid UTF-8 (bad byte at offset {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid or truncated JSON at line {err.lineno} column {err.colno}: "
                         f"{err.msg}") from None

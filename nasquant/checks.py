"""Value checks shared by every reader of user input (datasets, reports, settings), and the one way a
message quotes a value it read: short, so a crafted file cannot turn an error into megabytes."""

from __future__ import annotations

import math


def is_int(value: object) -> bool:
    """An integer, and not a bool (``True`` is an int to Python, never to a JSON or YAML author)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """An int or float that is neither NaN nor infinite (bools are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def quoted(value: object, limit: int = 60) -> str:
    """``value`` for a one-line message: its repr cut to ``limit`` characters; containers by type only."""
    if value is None:
        return "missing"
    if isinstance(value, list | dict | tuple | set):
        return f"a {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

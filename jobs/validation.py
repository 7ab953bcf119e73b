"""Checks every kind's config uses, so the kinds accept and refuse the same values (`True` is not
an integer anywhere) and say it the same way: what was expected, what was received."""

from __future__ import annotations

from typing import Optional, Type


class ConfigError(ValueError):
    """The job cannot start as configured (every kind's config error; the CLI exits 2). The
    message is one line meant for the user."""


def require_int(name: str, value, low: int, error: Type[Exception], optional: bool = False) -> Optional[int]:
    """Returns `value` if it is an integer >= `low` (or None and `optional`).

    Raises:
        error: `"{name} must be an integer >= {low}, received {value!r}"`; bools are refused.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise error(f"{name} must be an integer >= {low}, received {value!r}")
    return value

"""Errors that come from the machine the job runs on rather than from its configuration.

Kept apart from `ConfigError` (exit 2, "fix your command line") and from failed shards (exit 1):
an `EnvironmentProblem` means the command is fine but this environment cannot run it: no
credentials, an endpoint that does not answer, an output that cannot be written, no network for a
download. The CLI prints its one-line message, which names the fix, and exits 5.

`env_number` reads a numeric setting from an environment variable; a bad value there is a
configuration mistake (ValueError), not an `EnvironmentProblem`.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Union

Number = Union[int, float]


def env_number(name: str, default: Number, minimum: Number, maximum: Optional[Number] = None,
               kind: Callable = float, unit: str = "") -> Number:
    """The number an environment variable holds, or `default` when it is unset or blank.

    Args:
        name: the variable's name.
        default: returned as is when the variable is unset or blank.
        minimum: the smallest value accepted.
        maximum: the largest value accepted (None: no upper limit).
        kind: `float` or `int` (with `int`, "1.5" is refused rather than rounded).
        unit: what the number counts, for the message ("seconds"); "" for none.

    Returns:
        The value, converted with `kind`.

    Raises:
        ValueError: the value is not a number of that kind or is out of range; one line naming
            the variable, what it must be and what it holds, in the words of
            `jobs.validation.require_int`: "BULK_EXPLAIN_LEASE_SECONDS must be a number of
            seconds >= 1, received 'soon'".
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not value >= minimum or (maximum is not None and not value <= maximum):
        what = ("an integer" if kind is int else "a number") + (f" of {unit}" if unit else "")
        limits = f">= {minimum:g}" if maximum is None else f"from {minimum:g} to {maximum:g}"
        raise ValueError(f"{name} must be {what} {limits}, received {raw!r}")
    return value


class EnvironmentProblem(Exception):
    """The environment prevents the job (credentials, endpoint, permissions, network).

    The message is one line meant for the user and says what to do.
    """

    exit_code = 5

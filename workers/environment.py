"""Errors that come from the machine the job runs on rather than from its configuration.

Kept apart from `ConfigError` (exit 2, "fix your command line") and from failed shards (exit 1):
an `EnvironmentProblem` means the command is fine but this environment cannot run it: no
credentials, an endpoint that does not answer, an output that cannot be written, no network for a
download. The CLI prints its one-line message, which names the fix, and exits 5.
"""

from __future__ import annotations


class EnvironmentProblem(Exception):
    """The environment prevents the job (credentials, endpoint, permissions, network).

    The message is one line meant for the user and says what to do.
    """

    exit_code = 5

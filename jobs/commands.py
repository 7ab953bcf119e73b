"""The registry of `bulk-explain` sub-commands: each job kind registers one `Command` from its own
light `cli.py` (no TensorFlow or Ray at import), and `jobs/cli.py` builds the parser from whatever
is registered. A kind whose optional dependencies are missing keeps its command and says what to
install when it is used (`requires`), instead of vanishing from `--help`."""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional

# The kinds' command modules, in the order `bulk-explain --help` lists them.
COMMAND_MODULES = ("bulk_explain.jobs.explain.cli", "bulk_explain.jobs.filters.cli", "bulk_explain.jobs.audit.cli")


@dataclasses.dataclass(frozen=True)
class Command:
    """One sub-command.

    Attributes:
        name: the sub-command (`bulk-explain NAME`).
        help: one line for `bulk-explain --help`.
        add_arguments: adds the command's options to its argparse parser.
        run: `(args, lease) -> exit code`; `lease` is a `LeaseOptions` when `takes_lease`.
        requires: raises ImportError (one line naming what to install) when a dependency is missing.
        takes_lease: the command writes to DST and takes its lease (`--wait-for-lease`, `--break-lease`).
        defaults_in_help: append "(default: X)" to every option's help.
    """

    name: str
    help: str
    add_arguments: Callable
    run: Callable
    requires: Optional[Callable[[], None]] = None
    takes_lease: bool = True
    defaults_in_help: bool = True


_COMMANDS: Dict[str, Command] = {}


def register_command(command: Command) -> Command:
    _COMMANDS[command.name] = command
    return command


def commands() -> Dict[str, Command]:
    """Every registered command, after importing the kinds' command modules."""
    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module)
    return dict(_COMMANDS)

"""`bulk-explain filters`: the filters kind's command (options live with its config)."""

from __future__ import annotations

from bulk_explain.jobs.commands import Command, register_command
from bulk_explain.jobs.filters.config import add_arguments, config_from_args


def run_command(args, lease) -> int:
    from bulk_explain.jobs.filters.driver import run_filters

    config = config_from_args(args)  # validated: a bad command line answers before TensorFlow loads
    return int(run_filters(config, lease=lease).exit_code)


register_command(Command(name="filters", help="visualize every filter of conv layers by gradient ascent",
                         add_arguments=add_arguments, run=run_command))

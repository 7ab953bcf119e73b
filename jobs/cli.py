"""`bulk-explain` command line: a thin layer over the Python API, one sub-command per registered job
kind (`bulk_explain.jobs.commands`: each kind's own `cli.py`).

Exit codes: 0 the job finished (per-image errors are manifest rows), 1 shards failed, the error
rate passed --max-error-rate, or an unexpected error (one line; the traceback with --verbose),
2 bad command line or configuration (one line on stderr), 3 an audit gate failed (one line per
failed gate), 4 the output is busy (another run holds its lease, DST/_lease.json; one line naming
the holder), 5 environment problem: credentials,
S3 endpoint, output permissions, no network for downloading weights (one line naming the fix).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise _UsageError(message)


class _UsageError(Exception):
    pass


EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 5


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every option with a default; options whose default is "unset"
    (None) or off (store_true) say in their own help text what happens without them."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    first = str(message).strip().splitlines()[0] if str(message).strip() else "error"
    print(f"bulk-explain: error: {first}", file=sys.stderr)
    return code


def _add_lease_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait-for-lease", type=float, default=0.0, metavar="SECONDS",
                   help="when another run holds the output, wait up to this long for it (else exit 4)")
    p.add_argument("--break-lease", action="store_true",
                   help="DANGEROUS: take the output's lease from its holder at once (only if that run is dead)")


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show TensorFlow/CUDA/Ray start-up messages, Python warnings and tracebacks")


def build_parser() -> argparse.ArgumentParser:
    """The parser, one sub-command per registered kind (`bulk_explain.jobs.commands`)."""
    from bulk_explain.jobs.commands import commands

    parser = _Parser(prog="bulk-explain", description="Bulk explanation of Keras CNN classifiers on Ray.",
                     epilog="Exit codes: 0 finished, 1 shards failed or --max-error-rate passed, 2 bad command "
                            "line or configuration, 3 an audit gate failed, 4 the output is busy (another run "
                            "holds it), 5 environment problem (credentials, endpoint, permissions, network, a "
                            "missing extra). `bulk-explain COMMAND --help` lists a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND",
                                title="commands")
    for command in commands().values():
        p = sub.add_parser(command.name, help=command.help,
                           **({"formatter_class": _HelpFormatter} if command.defaults_in_help else {}))
        command.add_arguments(p)
        if command.takes_lease:
            _add_lease_arguments(p)
        _add_verbose(p)
    return parser


# What explain_config_from_args was imported as before the kinds had their own CLI modules.
def explain_config_from_args(args):
    from bulk_explain.jobs.explain.cli import explain_config_from_args as build

    return build(args)


def _lease_options(args):
    from bulk_explain.workers.lease import LeaseOptions

    if args.wait_for_lease < 0:
        from bulk_explain.jobs.validation import ConfigError

        raise ConfigError(f"--wait-for-lease must be >= 0 seconds, received {args.wait_for_lease:g}")
    options = LeaseOptions(wait_seconds=args.wait_for_lease, break_lease=args.break_lease)
    try:
        options.duration()  # a bad BULK_EXPLAIN_LEASE_SECONDS is a one-line exit 2 before any work
    except ValueError as exc:
        from bulk_explain.jobs.validation import ConfigError

        raise ConfigError(str(exc)) from None
    return options


def main(argv: Optional[List[str]] = None) -> int:
    from bulk_explain.jobs.runtime import restore_default_signals

    # Ctrl-C must give exit 130 even when started with SIGINT ignored (`cmd &` in a script).
    restore_default_signals()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:  # plain `bulk-explain`: say what it can do
        parser.print_help()
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        return _fail(str(exc))
    from bulk_explain.workers.tf_runtime import VERBOSE_ENV, quiet_console

    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    # Before TensorFlow is imported: its C++ log level is read once, when it loads.
    quiet_console(global_warnings=True)
    from bulk_explain.jobs.commands import commands
    from bulk_explain.jobs.distribute import WorkerStartError
    from bulk_explain.jobs.validation import ConfigError
    from bulk_explain.workers.backends import BackendError
    from bulk_explain.workers.environment import EnvironmentProblem
    from bulk_explain.workers.lease import OutputBusy
    from bulk_explain.workers.models import ModelError

    command = commands()[args.command]
    try:
        lease = _lease_options(args) if command.takes_lease else None
        if command.requires is not None:
            try:
                command.requires()
            except ImportError as exc:  # a missing extra of this kind: one line, the others unaffected
                raise EnvironmentProblem(str(exc)) from None
        return int(command.run(args, lease))
    except OutputBusy as exc:
        return _fail(str(exc), OutputBusy.exit_code)
    except (ConfigError, ModelError, BackendError) as exc:  # ours: the command line, config or model is wrong
        return _fail(str(exc))
    except EnvironmentProblem as exc:
        return _fail(str(exc), EXIT_ENVIRONMENT)
    except WorkerStartError as exc:
        return _fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        print("bulk-explain: interrupted; committed shards are kept, re-run the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as exc:  # not a configuration mistake: exit 1, one line unless --verbose
        if args.verbose:
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _fail(f"{type(exc).__name__}: {text} (committed shards are kept; re-run with --verbose "
                     "for the traceback)", EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())

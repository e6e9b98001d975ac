"""Command-line entry: ``granq-search [search|train|evaluate|leaderboard|export|deploy|searches] ...``
(``python tune_main.py ...`` in a source checkout is the same command).

Every user error becomes one line on stderr and exit code 2 (a traceback only with
``--debug``); ``--format json`` prints exactly one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from granq_search.errors import GranqError
from granq_search.tracking.provenance import package_version

__all__ = ["main", "build_parser", "package_version", "UsageError"]

COMMANDS = {
    "search": "granq_search.cli.cmd_search",
    "train": "granq_search.cli.cmd_train",
    "evaluate": "granq_search.cli.cmd_evaluate",
    "leaderboard": "granq_search.cli.cmd_leaderboard",
    "export": "granq_search.cli.cmd_export",
    "deploy": "granq_search.cli.cmd_deploy",
    "searches": "granq_search.cli.cmd_searches",
}


class UsageError(GranqError):
    """Bad command-line flags."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(f"{self.prog}: {message}; see '{self.prog} --help'")


class _VersionAction(argparse.Action):
    """``--version``: the version is looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser._print_message(f"granq-search {package_version()}\n", sys.stdout)  # as argparse's "version"
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="granq-search",
        description="GranQ zero-shot quantization: search (Ray Tune + Optuna), record (MLflow), "
        "leaderboard, export and production training.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action=_VersionAction, help="show program's version number and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(sub)
    return parser


def _normalise(argv: list[str]) -> list[str]:
    """``search`` is the default command, also when only flags are given."""
    rest = [a for a in argv if a != "--debug"]
    if not rest or (rest[0].startswith("-") and rest[0] not in ("-h", "--help", "--version")):
        debug = ["--debug"] if "--debug" in argv else []
        return debug + ["search"] + rest
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("GRANQ_DEBUG") == "1"
    try:
        parser = build_parser()
        args = parser.parse_args(_normalise(argv))
        if args.command is None:
            args = parser.parse_args(["search"])
        return int(importlib.import_module(COMMANDS[args.command]).run(args) or 0)
    except GranqError as err:
        if debug:
            raise
        msg = " ".join(str(err).split())
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun with --resume to continue a search", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

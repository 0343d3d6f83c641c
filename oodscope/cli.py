"""The ``oodscope`` command line. Each subcommand lives in :mod:`oodscope.commands` (one module each,
with ``register(subparsers)``), so adding a command is adding one file."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oodscope", description="Out-of-distribution and anomaly detection.")
    parser.add_argument("--version", action="version", version=f"oodscope {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    package = importlib.import_module("oodscope.commands")
    for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not module.name.startswith("_"):
            importlib.import_module(f"oodscope.commands.{module.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line stored in results.json
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except USER_ERRORS as error:
        if args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"oodscope {args.command}: error: {message} (--debug for the traceback)", file=sys.stderr)
        return 2


#: mistakes a user can fix (bad value, missing file or optional extra, a device this machine lacks): one line, exit 2
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, ImportError, NotADirectoryError, PermissionError)


def _version() -> str:
    from . import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())

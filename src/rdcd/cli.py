"""The ``rdcd`` command: a thin layer over the Python API, one module per subcommand."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: subcommand modules in rdcd.commands, in help order
COMMANDS = ["demo", "models", "extract", "export", "match", "evaluate", "make_benchmark", "train", "bench"]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="rdcd", description="Compact image copy detection (RDCD).")
    parser.add_argument("--version", action="version", version=f"rdcd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"rdcd.commands.{name}").register(sub)
    return parser


class _Prefixed(logging.Formatter):
    """Library warnings as ``rdcd: warning: ...``, like the commands' own messages."""

    def format(self, record: logging.LogRecord) -> str:
        return f"rdcd: {record.levelname.lower()}: {record.getMessage()}"


_handler = logging.StreamHandler()
_handler.setFormatter(_Prefixed())


def main(argv: list[str] | None = None) -> int:
    _handler.stream = sys.stderr  # the stderr of this call (tests and embedding programs replace it)
    logging.getLogger("rdcd").addHandler(_handler)  # once: a logger keeps one copy of a handler
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"rdcd {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rdcd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

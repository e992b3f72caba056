"""The ``rdcd`` command: a thin layer over the Python API, one module per subcommand.

Each module in ``rdcd.commands`` starts its docstring with ``rdcd NAME: what it does.`` and has
``register(subparsers)``. Registering a command may import what its options need (``train``'s
defaults come from classes whose modules import torch, seconds of start-up), so ``rdcd COMMAND ...``
registers only that command and the overview (``rdcd --help``) lists the others from their
docstrings.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

#: subcommand modules in rdcd.commands, in help order
COMMANDS = ["demo", "models", "extract", "export", "match", "index", "serve", "dedup", "evaluate", "make_benchmark", "train", "bench",
            "ship"]

_SUMMARY = re.compile(r"rdcd ([a-z][a-z0-9-]*): (.+?)\.?$")


def command_summary(module) -> tuple[str, str]:
    """The subcommand name and one-line help of a command module, from its docstring's first sentence."""
    match = _SUMMARY.match(" ".join((module.__doc__ or "").split()).split(". ", 1)[0])
    if match is None:
        raise RuntimeError(f"{module.__name__}: the docstring must start with 'rdcd NAME: what it does.'")
    return match.group(1), match.group(2)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand listed and ``command``'s options registered."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="rdcd", description="Compact image copy detection (RDCD).")
    parser.add_argument("--version", action="version", version=f"rdcd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS:
        module = importlib.import_module(f"rdcd.commands.{module_name}")
        name, summary = command_summary(module)
        if name == command:
            module.register(sub)
        else:
            sub.add_parser(name, help=summary)
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
    argv = sys.argv[1:] if argv is None else list(argv)
    # rdcd's own options take no value, so the first other word names the command
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
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

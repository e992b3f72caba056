"""rdcd demo: copy detection on a tiny example built from matplotlib's sample pictures."""
from __future__ import annotations

import tempfile

from .common import add_model_argument


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the pipeline on a tiny built-in example and print similarities")
    add_model_argument(p)
    p.add_argument("--folder", default=None, help="where to write the example (default: a temporary folder)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo

    if args.folder:
        run_demo(args.model, args.folder)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run_demo(args.model, tmp)
    return 0

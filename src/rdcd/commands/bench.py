"""rdcd bench: several models on one benchmark folder -> a comparison table, JSON and Markdown."""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from .common import add_embedding_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="compare models on a benchmark folder (size, speed, uAP, recall@P90, accuracy@1)",
        description="Embed a benchmark's queries, references and train images with each model in turn, match "
                    "(kNN, with and without score normalisation on train/) and print one row per model: "
                    "descriptor size, extraction speed, uAP, uAP with score normalisation (SSCD's beta 1), the "
                    "model's own beta (a shipped student's calibrated one, else 1) and uAP with it, recall@P90, "
                    "accuracy@1.")
    p.add_argument("--benchmark", required=True,
                   help="benchmark folder: queries/, references/, train/, ground_truth.csv [, edits.csv]")
    p.add_argument("--models", required=True,
                   help="comma-separated model names (see `rdcd models`), student:BACKBONE[:DIM] specs or files")
    p.add_argument("--output", default=None, help="write the results as a JSON list, one object per model")
    p.add_argument("--markdown", default=None,
                   help="write a Markdown section for BENCHMARKS.md: command, machine, date, tables")
    p.add_argument("--report-dir", default=None, help="also write one HTML report per model into this folder")
    p.add_argument("--k", type=int, default=10, help="candidates per query (default: %(default)s)")
    p.add_argument("--size", type=int, default=None, help="square input size in px for every model "
                                                          "(default: each model's own)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--note", default=None, help="a line added under the Markdown table, e.g. about machine load")
    add_embedding_arguments(p)
    p.set_defaults(func=run)


def command_line(args) -> str:
    """The ``rdcd bench`` command that reproduces this run (explicit arguments only)."""
    argv = ["rdcd", "bench", "--benchmark", args.benchmark, "--models", args.models]
    for flag, value, default in (("--k", args.k, 10), ("--size", args.size, None),
                                 ("--batch-size", args.batch_size, 32), ("--output", args.output, None),
                                 ("--markdown", args.markdown, None), ("--report-dir", args.report_dir, None),
                                 ("--precision", args.precision, "auto")):
        if value != default:
            argv += [flag, str(value)]
    if args.exact_decode:
        argv.append("--exact-decode")
    return shlex.join(argv)


def run(args) -> int:
    from ..bench import counts_line, format_markdown, format_table, machine_description, run_bench
    from ..descriptors import atomic_path

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    machine = machine_description()  # before the run: the load it reports is other jobs'
    date = time.strftime("%Y-%m-%d")
    started = time.perf_counter()
    results = run_bench(args.benchmark, models, k=args.k, size=args.size, batch_size=args.batch_size,
                        report_dir=args.report_dir, progress=sys.stderr.isatty(), precision=args.precision,
                        draft=not args.exact_decode)
    print(format_table(results))
    print(counts_line(results))
    print(f"rdcd bench: {len(results)} model(s) in {time.perf_counter() - started:.0f} s on {machine}",
          file=sys.stderr)
    if args.output:
        with atomic_path(args.output, ".json") as tmp:
            tmp.write_text(json.dumps(results, indent=2) + "\n")
        print(f"rdcd bench: results written to {args.output}", file=sys.stderr)
    if args.markdown:
        with atomic_path(args.markdown, ".md") as tmp:
            tmp.write_text(format_markdown(results, command_line(args), machine, date, args.note))
        print(f"rdcd bench: Markdown table written to {args.markdown}", file=sys.stderr)
    for result in results:
        if "report" in result:
            print(f"rdcd bench: report for {result['model']}: {Path(result['report'])}", file=sys.stderr)
    return 0

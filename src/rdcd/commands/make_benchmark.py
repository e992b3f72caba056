"""rdcd make-benchmark: a folder of images -> a DISC2021-like benchmark (queries, references, train, ground truth)."""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    from ..benchmark_builder import RECIPES  # cheap: AugLy itself is imported only when edits run

    p = subparsers.add_parser(
        "make-benchmark", help="build a DISC2021-like copy-detection benchmark from your own images",
        description="Pick references among your images, make edited copies of them (and of images that are not "
                    "references) with AugLy and PIL, and write queries/, references/, train/, ground_truth.csv, "
                    "edits.csv, sources.csv and benchmark.json. Same inputs and seed give byte-identical files.")
    p.add_argument("--images", required=True, help="folder of images (searched recursively) or a file listing paths")
    p.add_argument("--output", required=True, help="benchmark folder to create (must not exist or be empty)")
    p.add_argument("--references", type=int, default=None,
                   help="number of references that get copies (default: a quarter of --images)")
    p.add_argument("--queries-per-ref", type=int, default=2, help="edited copies per reference (default: %(default)s)")
    p.add_argument("--negative-fraction", type=float, default=0.5,
                   help="fraction of queries that copy no reference, in [0, 1) (default: %(default)s)")
    p.add_argument("--distractors", default=None,
                   help="folder of extra references nobody copies (default: half the unused --images)")
    p.add_argument("--background", default=None,
                   help="folder of train/ background images (default: the other half of the unused --images)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES),
                   help="edit set: " + "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values()))
    p.add_argument("--overwrite", action="store_true", help="replace an existing benchmark folder at --output")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..benchmark_builder import make_benchmark

    try:
        summary = make_benchmark(args.images, args.output, references=args.references,
                                 queries_per_ref=args.queries_per_ref, negative_fraction=args.negative_fraction,
                                 distractors=args.distractors, background=args.background, seed=args.seed,
                                 recipe=args.recipe, overwrite=args.overwrite, progress=sys.stderr.isatty())
    except FileExistsError as e:
        print(f"rdcd make-benchmark: error: {e} (--overwrite replaces an earlier benchmark)", file=sys.stderr)
        return 1
    for path, reason in summary.skipped:
        print(f"rdcd make-benchmark: skipped {path}: {reason}", file=sys.stderr)
    for note in summary.notes:
        print(f"rdcd make-benchmark: note: {note}", file=sys.stderr)
    print(f"rdcd make-benchmark: wrote {summary.output}: {summary.queries} queries "
          f"({summary.positive_queries} copies, {summary.negative_queries} without a match), "
          f"{summary.references} references ({summary.distractors} distractors), {summary.train} train images "
          f"in {summary.seconds:.1f} s; {len(summary.skipped)} inputs skipped", file=sys.stderr)
    return 0

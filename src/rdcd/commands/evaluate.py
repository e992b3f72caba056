"""rdcd eval: predictions CSV + ground truth CSV -> DISC2021 metrics (one JSON object), optional HTML report."""
from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="DISC2021 metrics (uAP, recall@P90, accuracy@1) of a predictions CSV",
                              description="Score predictions against a ground truth with the DISC2021 metrics and "
                                          "print them as one JSON object; optionally write an HTML report.")
    p.add_argument("--predictions", required=True, help="CSV query_id,reference_id,score (e.g. from `rdcd match`)")
    p.add_argument("--ground-truth", required=True, help="CSV query_id,reference_id (empty reference: no copy)")
    p.add_argument("--report", default=None, help="also write a self-contained HTML report to this file")
    p.add_argument("--queries", default=None, help="query image folder, for thumbnails in the report")
    p.add_argument("--references", default=None, help="reference image folder, for thumbnails in the report")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..metrics import evaluate, read_ground_truth, read_predictions

    if (args.queries or args.references) and not args.report:
        raise ValueError("--queries/--references only add thumbnails to the report; add --report REPORT.html")
    predictions = read_predictions(args.predictions)
    ground_truth = read_ground_truth(args.ground_truth)
    metrics = evaluate(predictions, ground_truth)
    if args.report:
        from ..report import write_report

        path = write_report(args.report, predictions, ground_truth, metrics, query_dir=args.queries,
                            reference_dir=args.references, title=f"rdcd eval: {args.predictions}")
        print(f"rdcd: report written to {path}", file=sys.stderr)
    print(json.dumps(metrics))
    return 0

"""Evaluate training runs (their model.pt) on one or more benchmarks; a Markdown table and JSON.

    python scripts/eval_runs.py --runs runs/r128 runs/r128_norel runs/r128_nohn \
        --benchmarks runs/valbench ../shared/data/devbench --output docs/experiments_results.json

Per run and benchmark: uAP and uAP with score normalisation (background = the benchmark's train/),
recall@P90, acc@1, the number of true pairs, and the effective rank of the reference descriptors;
plus the run's settings that differ between runs (dim, which loss terms are on) and its steps.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rdcd.scoring import SCORE_NORM_BETA, BenchmarkFolder, embed_benchmark, score_model


def main() -> None:
    from rdcd.losses import effective_rank

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--benchmarks", nargs="+", required=True)
    parser.add_argument("--output", required=True, help="JSON results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from rdcd.models import load_model

    rows = []
    for run in map(Path, args.runs):
        info = json.loads((run / "config.json").read_text())
        summary = json.loads((run / "summary.json").read_text())
        loss = info["config"]["loss"]
        terms = "+".join(t for t in ("con", "hn", "rel") if loss[f"use_{t}"])
        model = load_model(run / "model.pt")
        for bench in args.benchmarks:
            folder = BenchmarkFolder.read(bench)
            sets = embed_benchmark(model, folder)
            result = score_model(model, folder, beta=SCORE_NORM_BETA, sets=sets)  # fixed beta: no choice on any benchmark
            refs = sets["references"].vectors
            row = {"run": str(run), "dim": info["config"]["dim"], "terms": terms, "steps": summary["step"],
                   "benchmark": bench, "uAP": result["raw"]["uAP"], "uAP_sn": result["score_norm"]["uAP"],
                   "recall_at_p90": result["raw"]["recall_at_p90"], "acc_at_1": result["raw"]["acc_at_1"],
                   "n_gt": result["raw"]["n_gt"], "eff_rank_refs": effective_rank(torch.from_numpy(refs))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| run | dim | loss terms | steps | benchmark | uAP | uAP_sn | R@P90 | acc@1 | eff. rank | true pairs |")
    print("|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p90 = "-" if r["recall_at_p90"] is None else f"{r['recall_at_p90']:.3f}"
        print(f"| {r['run']} | {r['dim']} | {r['terms']} | {r['steps']} | {Path(r['benchmark']).name} | "
              f"{r['uAP']:.3f} | {r['uAP_sn']:.3f} | {p90} | {r['acc_at_1']:.3f} | {r['eff_rank_refs']:.1f} | {r['n_gt']} |")


if __name__ == "__main__":
    main()

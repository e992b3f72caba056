"""uAP of projection models fitted on a background set (e.g. the training pool), on benchmark folders.

    python scripts/score_projection.py --background runs/split/train.txt --benchmarks runs/valbench \
        --specs sscd-distilled@160+pcaw128 sscd-distilled@192+pcaw128 sscd-distilled@224+pcaw128

Unlike `rdcd bench`, which fits each `+pcawDIM` model on the benchmark's own `train/` images, the
projection here is fitted once on ``--background`` (as a shipped projection is) and reused from
the cache (``rdcd.models.projected.fit_projection``); k = 10, raw scores.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rdcd.models import load_model
from rdcd.models.projected import fit_projection
from rdcd.scoring import score_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", nargs="+", required=True, help="BASE[@SIZE]+pcawDIM ...")
    parser.add_argument("--background", required=True)
    parser.add_argument("--benchmarks", nargs="+", required=True)
    args = parser.parse_args()
    print("| model | fitted on | " + " | ".join(f"{b} uAP (true pairs)" for b in args.benchmarks) + " |")
    print("|---|---|" + "---:|" * len(args.benchmarks))
    for spec in args.specs:
        model = load_model(str(fit_projection(spec, args.background, progress=False)))
        cells = []
        for benchmark in args.benchmarks:
            raw = score_model(model, Path(benchmark))["raw"]
            cells.append(f"{raw['uAP']:.3f} ({raw['n_gt']})")
        print(f"| {spec} | {args.background} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

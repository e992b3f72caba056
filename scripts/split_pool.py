"""Split the training pool into a training part and a held-out validation part, by image kind.

The held-out part is what `rdcd make-benchmark` turns into the validation benchmark on which every
model choice is made; training never sees it. The split is a pure function of the image
IDs and the seed (sha1 order within each `kind` of MANIFEST.csv), so it is the same on every machine.

    python scripts/split_pool.py --pool ../shared/data/train --output runs/split
    # -> runs/split/train.txt, runs/split/holdout.txt (absolute paths, one per line)
    rdcd make-benchmark --images runs/split/holdout.txt --output runs/valbench --seed 7
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from pathlib import Path


def split_ids(manifest: Path, fraction: float, seed: int) -> tuple[list[str], list[str]]:
    by_kind: dict[str, list[str]] = {}
    with open(manifest, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            by_kind.setdefault(row["kind"], []).append(row["image_id"])
    train, holdout = [], []
    for kind, ids in sorted(by_kind.items()):
        ids.sort(key=lambda i: hashlib.sha1(f"{seed}:{i}".encode()).hexdigest())
        n = round(len(ids) * fraction)
        holdout += ids[:n]
        train += ids[n:]
    return sorted(train), sorted(holdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", required=True, help="training pool folder with MANIFEST.csv (image_id, kind)")
    parser.add_argument("--output", required=True, help="folder for train.txt and holdout.txt")
    parser.add_argument("--fraction", type=float, default=0.15, help="held-out share of each kind (default 0.15)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pool = Path(args.pool).resolve()
    train, holdout = split_ids(pool / "MANIFEST.csv", args.fraction, args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, ids in (("train", train), ("holdout", holdout)):
        paths = [pool / f"{i}.jpg" for i in ids]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise SystemExit(f"{missing[0]}: listed in MANIFEST.csv but missing ({len(missing)} missing)")
        (out / f"{name}.txt").write_text("".join(f"{p}\n" for p in paths))
        print(f"{out / (name + '.txt')}: {len(paths)} images")


if __name__ == "__main__":
    main()

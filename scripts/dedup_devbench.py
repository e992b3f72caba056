"""rdcd dedup on devbench's queries and references together: are true copy pairs grouped, and are groups pure?

Recall: the share of ground-truth (query, reference) pairs whose two images land in one group.
Pair precision: of all image pairs that share a group, the share that are copies of one source photo
(sources.csv: a query and its reference, or two edited copies of one photo, which devbench makes 2-3
of per photo, also of photos that are not among the references); link precision: the same for the
direct links (pairs at or above the threshold) before the groups join them. Usage:

    python scripts/dedup_devbench.py --devbench ../shared/data/devbench [--model rdcd-default] [--threshold auto]
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import time
from pathlib import Path

from rdcd.dedup import dedup_images
from rdcd.metrics import read_ground_truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devbench", required=True)
    parser.add_argument("--model", default="rdcd-default")
    parser.add_argument("--threshold", default="auto")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    root = Path(args.devbench)
    paths = sorted((root / "queries").glob("*.jpg")) + sorted((root / "references").glob("*.jpg"))
    start = time.perf_counter()
    groups = dedup_images(paths, args.model, args.threshold, args.k)
    seconds = time.perf_counter() - start
    gt = {q: r for q, r in read_ground_truth(root / "ground_truth.csv").items() if r is not None}
    group = dict(zip(groups.ids, groups.group.tolist()))
    together = sum(group[q] == group[r] for q, r in gt.items())
    with open(root / "sources.csv", newline="") as fh:
        source = {row["image_id"]: (row["package"], row["path_in_package"]) for row in csv.DictReader(fh)}
    same, true = 0, 0
    for members in groups.members():
        for a, b in itertools.combinations(members, 2):
            same += 1
            true += source[a] == source[b]
    print(json.dumps({
        "model": args.model, "threshold": round(groups.threshold, 4), "images": len(groups.ids),
        "true_pairs": len(gt), "recall_true_pairs_grouped": round(together / len(gt), 4),
        "groups_of_2_or_more": len(groups.members()), "largest_group": max(map(len, groups.members()), default=0),
        "links": len(groups.pairs), "link_precision": round(sum(
            source[a] == source[b] for a, b, _ in groups.pairs.rows()) / max(len(groups.pairs), 1), 4),
        "same_group_pairs": same, "pair_precision": round(true / same, 4) if same else None,
        "seconds": round(seconds, 1)}, indent=2))


if __name__ == "__main__":
    main()

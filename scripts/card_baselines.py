"""Write "Against the PCA whitening baselines" into each shipped student's model card, from one
``rdcd bench`` run's JSON (BENCHMARKS.md section 1), and print the same comparison as one table.

    python scripts/card_baselines.py --results docs/devbench_results.json

For each shipped student of dimension D in the results: its raw uAP beside the untrained ImageNet
backbone + PCA whitening to D (``gem:tf_efficientnet_lite0@160+pcawD``), the best teacher/peer + PCA
whitening to D at 160 px and at 288 px, all from the same run (the ``+pcawD`` models fitted by
``rdcd bench`` on the benchmark's ``train/``). An existing section is replaced; the rest of the
card is left as it is.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rdcd.models.shipped import WEIGHTS_DIR, shipped_cards

HEADING = "## Against the PCA whitening baselines"
UNTRAINED = "gem:tf_efficientnet_lite0@160+pcaw{dim}"
AT_160 = ("sscd@160+pcaw{dim}", "sscd-distilled@160+pcaw{dim}")
AT_288 = ("sscd+pcaw{dim}", "sscd-distilled+pcaw{dim}")


def comparison(name: str, dim: int, rows: dict) -> dict:
    def best(specs):
        found = [(rows[s.format(dim=dim)]["uAP"], s.format(dim=dim)) for s in specs if s.format(dim=dim) in rows]
        return max(found) if found else (None, None)

    return {"uAP": rows[name]["uAP"], "n_gt": rows[name]["n_gt"],
            "untrained": rows.get(UNTRAINED.format(dim=dim), {}).get("uAP"),
            "at_160": best(AT_160), "at_288": best(AT_288)}


def points(ours: float, other: float | None) -> str:
    return "n/a" if other is None else f"{other:.3f} ({100 * (ours - other):+.1f} points)"


def section(c: dict, dim: int, benchmark: str, date: str) -> str:
    (u160, s160), (u288, s288) = c["at_160"], c["at_288"]
    verdict = []
    if c["untrained"] is not None:
        verdict.append(("above" if c["uAP"] > c["untrained"] else "not above")
                       + " the untrained backbone with PCA whitening of its size (the first milestone)")
    if u160 is not None:
        verdict.append(("at or above" if c["uAP"] >= u160 else "below")
                       + " the best teacher/peer PCA whitening at its own input size (the target)")
    return "\n".join([
        HEADING, "",
        f"{benchmark} ({c['n_gt']} true pairs), raw uAP, one `rdcd bench` run with every model (BENCHMARKS.md "
        f"section 1, {date}); each `+pcawDIM` baseline is PCA whitening to this model's dimension fitted on the "
        "benchmark's `train/`:", "",
        "| this model | untrained ImageNet backbone + PCAW (160 px) | best teacher/peer + PCAW at 160 px | "
        "best teacher/peer + PCAW at 288 px |",
        "|---|---|---|---|",
        f"| {c['uAP']:.3f} | {points(c['uAP'], c['untrained'])} | `{s160}` {points(c['uAP'], u160)} | "
        f"`{s288}` {points(c['uAP'], u288)} |", "",
        f"This model is {'; '.join(verdict)}. Points are this model minus the baseline; one true pair is worth "
        f"about {100 / c['n_gt']:.1f} points.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="docs/devbench_results.json")
    parser.add_argument("--benchmark", default="devbench")
    parser.add_argument("--date", required=True, help="the date of the bench run (YYYY-MM-DD)")
    args = parser.parse_args()
    rows = {r["model"]: r for r in json.loads(Path(args.results).read_text())}
    print("| student | its uAP | untrained ImageNet + PCAW, same dim (160 px) | best teacher/peer + PCAW, same dim, "
          "at 160 px | best at 288 px |\n|---|---:|---:|---:|---:|")
    for card in shipped_cards():
        if card.kind != "student" or card.name not in rows:
            continue
        c = comparison(card.name, card.dim, rows)
        (u160, s160), (u288, s288) = c["at_160"], c["at_288"]
        print(f"| {card.name} | {c['uAP']:.3f} | {points(c['uAP'], c['untrained'])} | {s160} "
              f"{points(c['uAP'], u160)} | {s288} {points(c['uAP'], u288)} |")
        md = WEIGHTS_DIR / f"{card.name}.md"
        text = md.read_text()
        before, _, after = text.partition(HEADING)
        rest = after.split("\n## ", 1)[1] if "\n## " in after else ""
        new = before.rstrip() + "\n\n" + section(c, card.dim, args.benchmark, args.date)
        md.write_text(new + ("\n## " + rest if rest else ""))


if __name__ == "__main__":
    main()

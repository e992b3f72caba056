"""uAP of a model's descriptors PCA-whitened to several sizes, each fitted on one background set.

    python scripts/readout_dims.py --bases gem:tf_efficientnet_lite0@160 gem:runs/RUN/model.pt@160 \
        --background runs/split/train.txt --benchmarks runs/valbench ../shared/data/devbench --dims 64 128 256

Each base embeds the background and every benchmark once; PCA whitening to each of ``--dims`` is
fitted on the background (the training pool, never a benchmark) and applied to the benchmark's
queries, references and train/ images; raw uAP at k = 10, as ``scripts/score_projection.py`` gives
for one ``BASE+pcawDIM`` spec, without embedding the same images once per size. ``gem:STUDENT_FILE``
reads out a trained student's backbone without its head.
"""
from __future__ import annotations

import argparse
import json

from rdcd.extract import extract
from rdcd.images import list_images
from rdcd.models import load_model
from rdcd.postprocess import PCAWhitening
from rdcd.scoring import BenchmarkFolder, embed_benchmark, score_transformed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", nargs="+", required=True, help="model specs (NAME@SIZE, gem:FILE@SIZE, ...)")
    parser.add_argument("--background", required=True)
    parser.add_argument("--benchmarks", nargs="+", required=True)
    parser.add_argument("--dims", nargs="+", type=int, default=[64, 128, 256])
    args = parser.parse_args()
    benches = [BenchmarkFolder.read(b) for b in args.benchmarks]
    rows = []
    for spec in args.bases:
        model = load_model(spec)
        fit_on = extract(model, list_images(args.background), progress=False).vectors
        sets = [embed_benchmark(model, bench) for bench in benches]
        for dim in args.dims:
            pcaw = PCAWhitening(dim).fit(fit_on)
            cells = []
            for bench, embedded in zip(benches, sets):
                raw = score_transformed(embedded, bench, pcaw.transform)
                cells.append({"benchmark": str(bench.root), "uAP": raw["uAP"], "n_gt": raw["n_gt"]})
            rows.append({"base": spec, "dim": dim, "scores": cells})
            print(json.dumps(rows[-1]), flush=True)
    print("| base | dim | " + " | ".join(f"{b} uAP" for b in args.benchmarks) + " |")
    print("|---|---:|" + "---:|" * len(benches))
    for r in rows:
        print(f"| {r['base']} | {r['dim']} | " + " | ".join(f"{c['uAP']:.3f} ({c['n_gt']})" for c in r["scores"]) + " |")


if __name__ == "__main__":
    main()

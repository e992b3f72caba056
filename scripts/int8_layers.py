"""How close int8 stays to fp32 for each export setting (docs/export.md): the first N weighted layers
kept in float, 7- or 8-bit weights, how many calibration images.

    python scripts/int8_layers.py --model rdcd-default --float-layers 0 2 3 \
        --calibration runs/split/train.txt --test runs/split/holdout.txt
    python scripts/int8_layers.py --model rdcd-default --float-layers 3 --weight-bits 7 8 \
        --calibration-size 128 512 --calibration runs/split/train.txt \
        --test runs/split/holdout.txt ../shared/data/devbench/references

Per setting and per --test set: mean and min cosine between int8 and fp32 descriptors of its
images (up to 64, spread evenly), the share of images whose nearest fp32 descriptor is their own,
and ONNX Runtime images/s at batch 32 (compute only, median of 5 rounds that time every variant in
turn; meaningful only on an otherwise idle CPU).
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

from rdcd.export import calibration_images, export
from rdcd.machine import interleaved_rates
from rdcd.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="rdcd-default")
    ap.add_argument("--float-layers", type=int, nargs="+", default=[0, 2, 3])
    ap.add_argument("--weight-bits", type=int, nargs="+", choices=(7, 8), default=[7])
    ap.add_argument("--calibration-size", type=int, nargs="+", default=[128])
    ap.add_argument("--calibration", required=True, help="int8 calibration images (folder or file list)")
    ap.add_argument("--test", nargs="+", required=True,
                    help="image sets to compare on (folders or file lists), never the calibration ones")
    ap.add_argument("--size", type=int, default=None, help="input size (default: the model's)")
    args = ap.parse_args()
    reference_model = load_model(args.model)
    size = args.size or reference_model.input_size
    tests = {t: calibration_images(t, size, 64) for t in args.test}
    wants = {t: reference_model.embed(images) for t, images in tests.items()}
    print("| float layers | weight bits | calibration images | "
          + " | ".join(f"`{t}` cosine mean / min / NN kept" for t in tests) + " | img/s (b32) |")
    print("|---:|---:|---:|" + "---|" * len(tests) + "---:|")
    with tempfile.TemporaryDirectory() as work:
        models, rows = {}, {}
        for n, bits, count in itertools.product(args.float_layers, args.weight_bits, args.calibration_size):
            path = export(args.model, Path(work) / f"int8_{n}_{bits}_{count}.onnx", precision="int8",
                          calibration=args.calibration, calibration_size=count, float_layers=n, weight_bits=bits,
                          input_size=size)
            key = (n, bits, count)
            models[key] = load_model(path)
            cells = []
            for t, images in tests.items():
                got, want = models[key].embed(images), wants[t]
                cos = np.sum(got * want, axis=1)
                kept = np.mean((got @ want.T).argmax(axis=1) == np.arange(len(images)))
                cells.append(f"{cos.mean():.4f} / {cos.min():.4f} / {kept:.2f}")
            rows[key] = f"| {n} | {bits} | {count} | " + " | ".join(cells) + " |"
        # speed: 5 interleaved rounds, median, so a slow spell of the machine hits every variant alike
        batch = next(iter(tests.values()))[:32]
        rates = interleaved_rates({k: partial(model.embed, batch) for k, model in models.items()}, len(batch))
        for k in models:
            print(f"{rows[k]} {np.median(rates[k]):.1f} |", flush=True)


if __name__ == "__main__":
    main()

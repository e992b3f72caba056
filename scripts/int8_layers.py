"""How close int8 stays to fp32 when the first N weighted layers are kept in float (docs/export.md).

    python scripts/int8_layers.py --model rdcd-default --float-layers 0 2 3 \
        --calibration runs/split/train.txt --test runs/split/holdout.txt

Per N: mean and min cosine between int8 and fp32 descriptors of the --test images (up to 64, spread
evenly), the share of images whose nearest fp32 descriptor is their own, and ONNX Runtime images/s
at batch 32 (compute only, median of 5 rounds that time every variant in turn; meaningful only on
an otherwise idle CPU).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from rdcd.export import calibration_images, export
from rdcd.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="rdcd-default")
    ap.add_argument("--float-layers", type=int, nargs="+", default=[0, 2, 3])
    ap.add_argument("--calibration", required=True, help="int8 calibration images (folder or file list)")
    ap.add_argument("--test", required=True, help="images to compare on (folder or file list), never the calibration ones")
    ap.add_argument("--size", type=int, default=None, help="input size (default: the model's)")
    args = ap.parse_args()
    reference_model = load_model(args.model)
    size = args.size or reference_model.input_size
    test = calibration_images(args.test, size, 64)
    want = reference_model.embed(test)
    print("| float layers | cosine mean | cosine min | NN kept | img/s (b32) |\n|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as work:
        models, rows = {}, {}
        for n in args.float_layers:
            path = export(args.model, Path(work) / f"int8_{n}.onnx", precision="int8", calibration=args.calibration,
                          float_layers=n, input_size=size)
            models[n] = load_model(path)
            got = models[n].embed(test)
            cos = np.sum(got * want, axis=1)
            kept = np.mean((got @ want.T).argmax(axis=1) == np.arange(len(test)))
            rows[n] = f"| {n} | {cos.mean():.4f} | {cos.min():.4f} | {kept:.2f} |"
        # speed: 5 interleaved rounds, median, so a slow spell of the machine hits every variant alike
        batch, rates = test[:32], {n: [] for n in models}
        for model in models.values():
            model.embed(batch)
        for _ in range(5):
            for n, model in models.items():
                start = time.perf_counter()
                model.embed(batch)
                rates[n].append(len(batch) / (time.perf_counter() - start))
        for n in models:
            print(f"{rows[n]} {np.median(rates[n]):.1f} |", flush=True)

if __name__ == "__main__":
    main()

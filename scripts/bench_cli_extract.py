"""Speed as users get it: `rdcd extract` end to end (process start, model load, decoding, writing the
file), several models in interleaved rounds on the same images, with the CPU's instruction set.

    python scripts/bench_cli_extract.py --images ../shared/data/devbench/queries ../shared/data/devbench/references \
        --models rdcd-default sscd-distilled@160 sscd@160 --rounds 3

Each round runs every model once, in turn (each round starting with the next model), as a fresh
`rdcd extract` process writing a new .h5 file; a model's figure is the median over rounds of images / wall seconds, and each ratio is the
median of the per-round ratios to the first model (the machine's speed drifts within minutes, so
ratios within a round are steadier than absolute figures).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rdcd.bench import machine_description
from rdcd.images import list_images
from rdcd.machine import cpu_flags


def run_once(model: str, file_list: Path, output: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rdcd", "extract", "--model", model, "--images", str(file_list),
                    "--output", str(output), "--no-resume"], check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", required=True, help="image folders or file lists")
    parser.add_argument("--models", nargs="+", required=True, help="the first is the one the others are compared to")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    paths = [p for source in args.images for p in list_images(source)]
    machine = machine_description()
    with tempfile.TemporaryDirectory() as tmp:
        file_list = Path(tmp) / "images.txt"
        file_list.write_text("".join(f"{p.resolve()}\n" for p in paths))
        seconds = {m: [] for m in args.models}
        for r in range(args.rounds):
            turn = r % len(args.models)  # each round starts with another model: no model always runs first
            for i, model in enumerate(args.models[turn:] + args.models[:turn]):
                seconds[model].append(run_once(model, file_list, Path(tmp) / f"{r}_{i}.h5"))
                print(f"round {r + 1}: {model}: {seconds[model][-1]:.1f} s", file=sys.stderr, flush=True)
    first = args.models[0]
    print(f"Command: `python scripts/bench_cli_extract.py --images {' '.join(args.images)} --models "
          f"{' '.join(args.models)} --rounds {args.rounds}`\n")
    print(f"Machine: {machine}; CPU flags: {cpu_flags()}. Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n")
    print(f"{len(paths)} images, `rdcd extract` as a fresh process per model and round (start-up, model load, "
          "decoding, writing the .h5 file included).\n")
    print(f"| model | median wall s | images/s (median) | speed of {first} / speed of model, median of per-round ratios |")
    print("|---|---:|---:|---:|")
    for model in args.models:
        ratios = [a / b for a, b in zip(seconds[model], seconds[first])]
        rate = statistics.median(len(paths) / s for s in seconds[model])
        print(f"| {model} | {statistics.median(seconds[model]):.1f} | {rate:.1f} | {statistics.median(ratios):.2f}x |")


if __name__ == "__main__":
    main()

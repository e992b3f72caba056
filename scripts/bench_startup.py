"""Start-up time of the rdcd command: `rdcd --help`, `rdcd models` and `rdcd extract` of one image
with the default model, each the median wall time of several fresh processes, and the imports that
cost the most in each (`python -X importtime`). Prints a Markdown section for BENCHMARKS.md.

    python scripts/bench_startup.py --runs 5
"""
from __future__ import annotations

import argparse
import datetime
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rdcd.bench import machine_description

EXAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "examples" / "copydetect" / "queries" / "Q00000.jpg"
IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def commands(image: Path, out: Path) -> dict[str, list[str]]:
    return {"rdcd --help": ["--help"], "rdcd models": ["models"],
            "rdcd extract (1 image, default model)": ["extract", "--images", str(image), "--output", str(out)]}


def wall_seconds(argv: list[str], runs: int, out: Path) -> list[float]:
    """Wall time of ``rdcd ARGV`` in ``runs`` fresh processes (the output removed before each, so
    extract never resumes)."""
    times = []
    for _ in range(runs):
        for f in out.parent.glob(out.stem + "*"):
            f.unlink()
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rdcd", *argv], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def top_imports(argv: list[str], out: Path, top: int) -> list[tuple[str, float]]:
    """The top-level imports of ``rdcd ARGV`` that take longest (cumulative ms, `python -X importtime`)."""
    for f in out.parent.glob(out.stem + "*"):
        f.unlink()
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "rdcd", *argv], check=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = [(m.group(4), int(m.group(2)) / 1000) for m in map(IMPORT_LINE.match, run.stderr.splitlines())
            if m and len(m.group(3)) == 1]  # one space: imported by the program itself, not by another module
    return sorted(rows, key=lambda r: -r[1])[:top]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="fresh processes per command (default: %(default)s)")
    ap.add_argument("--top", type=int, default=5, help="slowest top-level imports listed per command")
    ap.add_argument("--image", type=Path, default=EXAMPLE_IMAGE, help="the image rdcd extract embeds")
    args = ap.parse_args()

    machine = machine_description()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "startup.npy"
        results = {name: (wall_seconds(argv, args.runs, out), top_imports(argv, out, args.top))
                   for name, argv in commands(args.image, out).items()}

    print(f"Command: `{shlex.join(['python', 'scripts/bench_startup.py', *sys.argv[1:]])}`")
    print(f"\nMachine: {machine}; Python {platform.python_version()}. "
          f"Date: {datetime.date.today().isoformat()}.\n")
    print("| command | median s | min s | max s | slowest top-level imports (cumulative ms) |")
    print("|---|---:|---:|---:|---|")
    for name, (times, imports) in results.items():
        slowest = ", ".join(f"{module} {ms:.0f}" for module, ms in imports)
        print(f"| `{name}` | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} | {slowest} |")
    print(f"\n{args.runs} fresh processes per command (`python -m rdcd ...`, wall time from start to exit); "
          f"the imports from one more run with `python -X importtime`. Image: {args.image.name}"
          f"{' (examples/copydetect)' if args.image == EXAMPLE_IMAGE else ''}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

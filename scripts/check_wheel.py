"""Build rdcd's wheel and run the README's main job from it, as a user who installs the wheel would:
a fresh virtual environment that reuses the dependencies already installed (``--system-site-packages``,
no package index), rdcd from the wheel only (no editable install, no source tree on the path), then
``rdcd match`` on the example the wheel carries, which must flag a copy.

    python scripts/check_wheel.py            # exit 0 when the wheel works; prints what it did
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "src")  # what the build reads


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def build_wheel(work: Path) -> Path:
    """The wheel, built without network from a copy of the sources (the build leaves nothing in the tree)."""
    source = work / "source"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", work / "dist", source])
    (wheel,) = (work / "dist").glob("rdcd-*.whl")
    return wheel


def install(wheel: Path, venv: Path, env: dict) -> Path:
    run([sys.executable, "-m", "venv", "--system-site-packages", venv])
    python = venv / "bin" / "python"
    # the dependencies come from the system site packages; --no-deps because the venv's own, older
    # setuptools would otherwise fail torch's requirement on it and pip would try to reinstall torch
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", wheel], env=env)
    return python


def check(work: Path) -> list[str]:
    """Build, install, run; returns the lines to report. Raises on any failure."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    wheel = build_wheel(work)
    venv = work / "venv"
    python = install(wheel, venv, env)
    outside = work / "run"  # not the repository, so its src/ cannot shadow the installed package
    outside.mkdir()
    where = run([python, "-c", "import rdcd, rdcd.demo; print(rdcd.__file__); print(rdcd.demo.EXAMPLE_DIR)"],
                cwd=outside, env=env).stdout.split()
    module, example = Path(where[0]), Path(where[1])
    if venv.resolve() not in module.resolve().parents:
        raise RuntimeError(f"the venv imports rdcd from {module}, not from the installed wheel")
    if not (example / "ground_truth.csv").is_file():
        raise RuntimeError(f"the wheel has no example data at {example}")
    matches = outside / "matches.csv"
    result = run([venv / "bin" / "rdcd", "match", "--queries", example / "queries", "--references",
                  example / "references", "--threshold", "auto", "--output", matches], cwd=outside, env=env)
    with open(example / "ground_truth.csv", newline="") as fh:
        truth = {(r["query_id"], r["reference_id"]) for r in csv.DictReader(fh) if r["reference_id"]}
    with open(matches.with_name("matches.copies.csv"), newline="") as fh:
        copies = {(r["query_id"], r["reference_id"]) for r in csv.DictReader(fh)}
    if not copies & truth:
        raise RuntimeError(f"rdcd match from the wheel flagged no true copy:\n{result.stdout}\n{result.stderr}")
    return [f"wheel: {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB)", f"rdcd imported from: {module}",
            f"true copies flagged: {sorted(copies & truth)} of {sorted(truth)}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temporary one)")
    args = ap.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        lines = check(args.keep)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            lines = check(Path(tmp))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

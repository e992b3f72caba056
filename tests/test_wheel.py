"""The wheel is a working package: built, installed into a fresh venv (no editable install, no source
tree on the path), it runs the README's rdcd match on the example it carries and flags a copy."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_runs_the_readme_match(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_wheel.py"), "--keep", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    venv = (tmp_path / "venv").resolve()
    assert venv in Path(lines["rdcd imported from"]).resolve().parents
    assert "Q000" in lines["true copies flagged"]
    assert (tmp_path / "run" / "matches.csv").is_file() and (tmp_path / "run" / "matches.copies.csv").is_file()

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageDraw

from rdcd.metrics import evaluate
from rdcd.report import write_report

GT = {"Q1": "R1", "Q2": "R2", "Q3": "R3", "Q4": "R4", "Q5": None}
PREDICTIONS = [
    ("Q1", "R1", 0.9),
    ("Q1", "R9", 0.9),
    ("Q2", "R2", 0.8),
    ("Q2", "R8", 0.95),
    ("Q3", "R7", 0.5),
    ("Q5", "R1", 0.7),
]


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    sets = (("queries", ["Q1", "Q2", "Q3", "Q4", "Q5"]), ("references", ["R1", "R2", "R3", "R7", "R8", "R9"]))
    for folder, names in sets:
        (tmp_path / folder).mkdir()
        for name in names:
            image = Image.new("RGB", (240, 180), tuple(int(c) for c in rng.integers(0, 255, 3)))
            ImageDraw.Draw(image).ellipse((40, 30, 200, 150), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
            image.save(tmp_path / folder / f"{name}.{'png' if name.endswith('2') else 'jpg'}")
    return tmp_path / "queries", tmp_path / "references"


def external_references(page: str) -> list[str]:
    links = re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", page, flags=re.I)
    links += re.findall(r"url\(([^)]*)\)", page)
    links += re.findall(r"@import", page)
    return [link for link in links if not link.startswith("data:")]


def test_report_is_self_contained_with_metrics_and_thumbnails(tmp_path, folders):
    query_dir, reference_dir = folders
    path = write_report(tmp_path / "out" / "report.html", PREDICTIONS, GT, query_dir=query_dir,
                        reference_dir=reference_dir, title="golden <case>")
    page = path.read_text()
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]
    assert page.startswith("<!DOCTYPE html>") and "golden &lt;case&gt;" in page
    assert external_references(page) == []
    # metrics of the worked example (docs/evaluation.md): uAP 0.2083, P90 not reached, acc@1 0, recall@10 0.5
    assert "0.2083" in page and "not reached" in page and "0.5000" in page
    assert page.count("data:image/png;base64,") == 2  # precision-recall curve and histograms
    # false positives: Q2-R8 (.95) first, then Q1-R9 (.9); missed copies: Q1, Q2 (outranked), Q3, Q4 (never predicted)
    fp = page.split("Highest-scoring false positives")[1].split("Missed copies")[0]
    assert fp.index("predicted R8") < fp.index("predicted R9") < fp.index("predicted R1")
    missed = page.split("Missed copies")[1]
    assert "(4 of 4)" in missed and missed.count("never predicted") == 2
    assert "ranked first: R8" in missed and "true pair score 0.8000, position 2 in its query" in missed
    # thumbnails: 4 false positives x 3 images (minus Q5, which has no true reference) + 4 missed x 2-3
    assert page.count("data:image/jpeg;base64,") >= 15
    assert "image not found" in page  # R4 has no file


def test_report_without_images_lists_ids(tmp_path):
    metrics = evaluate(PREDICTIONS, GT)
    page = write_report(tmp_path / "r.html", PREDICTIONS, GT, metrics=metrics).read_text()
    assert "data:image/jpeg" not in page
    assert "predicted R8" in page and "true R4" in page
    assert external_references(page) == []


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=600)
        found = shutil.which("chromium")
    if not found:
        pytest.skip("chromium is not installed (and could not be installed with apt-get); cannot render the report")
    return found


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path, folders):
    query_dir, reference_dir = folders
    report = write_report(tmp_path / "report.html", PREDICTIONS, GT, query_dir=query_dir, reference_dir=reference_dir)
    screenshot = tmp_path / "shot.png"
    command = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", "--window-size=1200,2000",
        report.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert screenshot.exists(), f"chromium wrote no screenshot:\n{done.stderr[-2000:]}"
    pixels = np.asarray(Image.open(screenshot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 10  # not a blank page
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # plots and thumbnails, not just text

"""The documentation speaks of the product: no numbered work periods or issue numbers, no paths of
the machine it was written on, and every relative link leads to a file of the repository."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "CHANGELOG.md", *ROOT.glob("docs/*.md"),
               *ROOT.glob("src/rdcd/weights/*.md"), *ROOT.glob("examples/*/README.md")])
CARDS = sorted(ROOT.glob("src/rdcd/weights/*.json"))
WORK_PERIOD = re.compile(r"\bsessions? \d|\bissue #?\d", re.IGNORECASE)
ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:work|root|home|tmp)/")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def offending_lines(path: Path, pattern: re.Pattern) -> list[str]:
    return [f"{relative(path)}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
            if pattern.search(line)]


def test_the_documents_exist():
    assert (ROOT / "docs" / "method.md").is_file() and (ROOT / "docs" / "evaluation.md").is_file()
    assert (ROOT / "CHANGELOG.md").is_file() and len(DOCS) > 10 and CARDS


@pytest.mark.parametrize("path", DOCS, ids=relative)
def test_no_work_periods(path):
    """History goes to CHANGELOG.md by date; no document counts the periods of its own writing."""
    assert offending_lines(path, WORK_PERIOD) == []


@pytest.mark.parametrize("path", DOCS + CARDS, ids=relative)
def test_no_absolute_paths_of_the_development_machine(path):
    assert offending_lines(path, ABSOLUTE_PATH) == []


@pytest.mark.parametrize("path", DOCS, ids=relative)
def test_relative_links_point_to_files_in_the_repository(path):
    broken = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        resolved = (path.parent / target.split("#", 1)[0]).resolve()
        if not resolved.exists() or ROOT not in resolved.parents:
            broken.append(target)
    assert broken == [], f"{relative(path)} links to files that are not in the repository"


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The patterns match the kinds of text they exist to keep out."""
    assert WORK_PERIOD.search("re-run in session 6") and WORK_PERIOD.search("Issue #7's targets")
    assert not WORK_PERIOD.search("an ONNX Runtime session per worker")
    assert ABSOLUTE_PATH.search("(shipped file /work/main/src/x.onnx)") and ABSOLUTE_PATH.search("--output /tmp/r")
    assert not ABSOLUTE_PATH.search("runs/valbench/train and docs/work/ notes")
    assert LINK.findall("see [the method](../shared/docs/METHOD.md) and ![curve](curve.png)") == [
        "../shared/docs/METHOD.md", "curve.png"]

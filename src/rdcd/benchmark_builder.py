"""Build a DISC2021-like copy-detection benchmark from a folder of one's own images.

Layout written (as ``shared/data/devbench`` and DISC2021)::

    queries/Q00000.jpg ...      edited copies of references, and of images that are NOT references
    references/R000000.jpg ...  the copied images + distractors, shuffled
    train/T000000.jpg ...       background set (score normalisation, PCA whitening)
    ground_truth.csv            query_id,reference_id (empty reference for a query with no match)
    edits.csv                   query_id,recipe,ops: op names joined by '+', JSON [{"op","params"}]
    sources.csv                 image_id,role,input,path: which input file each image came from
    benchmark.json              resolved settings, counts, skipped inputs, library versions

Queries are made "internet-user style" (``rdcd.query_edits``) with AugLy and PIL: 1-4 random edits (crops, rotations,
colour changes, blur, JPEG, overlays, memes, screenshots, pasting onto another image,
perspective...). Edits are applied in stage order (geometry, pixels, overlays, framing, encoding),
each with parameters drawn from a ``np.random.Generator`` seeded from ``(seed, query)`` and
recorded in full, so :func:`replay` redoes any query exactly. The same inputs and seed give
byte-identical files (on the same Pillow/libjpeg/FreeType build).

Negative queries are edits of "negative sources": input images that are not among the
references. They double as the backdrops of the ``overlay_onto_background`` edit, so no
reference ever appears inside another reference's query and ground truth stays one-to-one.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from rdcd import _augly_compat
from rdcd.images import ImageLoadError, list_images
from rdcd.query_edits import (  # noqa: F401  (OPS ... replay: re-exported, as __all__ says)
    _JPEG_OPTIONS, EDIT_SHORT_SIDE, JPEG_QUALITY, MIN_SHORT_SIDE, OPS, OUTPUT_SHORT_SIDE, RECIPES, Backdrops, EditOp,
    Recipe, _fit_short_side, _get_recipe, _jpeg_bytes, _load, edit, random_edit, replay)

__all__ = [
    "OPS", "RECIPES", "EditOp", "Recipe", "Backdrops", "BenchmarkSummary",
    "make_benchmark", "random_edit", "edit", "replay",
]

# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------

@dataclass
class BenchmarkSummary:
    """What :func:`make_benchmark` wrote (also saved, without ``seconds``, in benchmark.json)."""

    output: str
    recipe: str
    seed: int
    positive_sources: int
    negative_sources: int
    references: int
    distractors: int
    queries: int
    positive_queries: int
    negative_queries: int
    train: int
    op_counts: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class _Inputs:
    """Decodes input images, remembering which were unreadable, too small or byte-identical duplicates."""

    def __init__(self):
        self.skipped: list[tuple[str, str]] = []
        self._seen: dict[str, Path] = {}

    def load(self, path: Path, short_side: int) -> Image.Image | None:
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if self._seen.get(digest, path) != path:
                self.skipped.append((str(path), f"same file content as {self._seen[digest]}"))
                return None
            image = _load(path, short_side)
        except (OSError, ImageLoadError) as exc:
            self.skipped.append((str(path), f"unreadable: {getattr(exc, 'reason', exc)}"))
            return None
        self._seen[digest] = path
        if min(image.size) < min(MIN_SHORT_SIDE, short_side):
            self.skipped.append((str(path), f"too small ({image.width}x{image.height}, need >= {MIN_SHORT_SIDE} px)"))
            return None
        return image

    def take(self, paths: Iterator[Path], count: int) -> list[Path]:
        """The next ``count`` readable paths (a readability check; images are reloaded later)."""
        taken: list[Path] = []
        while len(taken) < count and (path := next(paths, None)) is not None:
            if self.load(path, MIN_SHORT_SIDE) is not None:
                taken.append(path)
        return taken


@contextmanager
def _build_folder(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh folder next to ``output``; it replaces ``output`` only if the block succeeds."""
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{output} exists and is not empty; choose a new folder or pass overwrite=True")
        if not (output / "ground_truth.csv").exists():
            raise FileExistsError(f"{output} does not look like a benchmark (no ground_truth.csv); "
                                  "refusing to delete it, choose a new folder")
    building = output.parent / f".{output.name}.building"
    if building.exists():
        shutil.rmtree(building)  # left over from an interrupted run
    for sub in ("queries", "references", "train"):
        (building / sub).mkdir(parents=True)
    try:
        yield building
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    if output.exists():
        shutil.rmtree(output)  # empty, or a benchmark the caller asked to overwrite
    os.replace(building, output)


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _relative(path: Path, root: Path | None) -> str:
    """How an input file is named in sources.csv and edits.csv: relative to its folder if it has one."""
    if root is not None and root.is_dir() and path.is_relative_to(root):
        return path.relative_to(root).as_posix()
    return path.as_posix()


def _root(source) -> Path | None:
    return Path(source) if isinstance(source, (str, os.PathLike)) else None


def _describe(source) -> str | None:
    if source is None or isinstance(source, (str, os.PathLike)):
        return None if source is None else str(source)
    return f"{len(source)} listed files"


@dataclass
class _Plan:
    """Which input file plays which role; extra sets hold (file, its folder or None, input name)."""

    positives: list[Path]
    negatives: list[Path]
    distractors: list[tuple[Path, Path, str]]
    train: list[tuple[Path, Path, str]]
    notes: list[str]


def _plan(name: str, images: Path | None, pool: list[Path], n_pos: int, n_neg: int, distractors, background,
          rng: np.random.Generator, inputs: _Inputs) -> _Plan:
    """Choose sources at random from ``pool``; give the rest (or the given folders) the other roles.

    Negative sources are drawn first, then positives; each is checked to be readable. A folder
    given for distractors / background is used whole; the images left over after choosing
    sources fill each role without a folder, half and half when neither has one.
    """
    remaining = iter([pool[i] for i in rng.permutation(len(pool))])
    negatives = inputs.take(remaining, n_neg)
    positives = inputs.take(remaining, n_pos)
    if len(positives) < n_pos or len(negatives) < n_neg:
        raise ValueError(
            f"{name} has {len(positives) + len(negatives)} usable images, {n_pos + n_neg} are needed "
            f"({n_pos} references + {n_neg} negative sources); lower --references or --negative-fraction, "
            f"or add images ({len(inputs.skipped)} skipped, e.g. {inputs.skipped[:3]})")
    leftover = list(remaining)
    half = (len(leftover) + 1) // 2
    from_leftover = {
        (False, False): (leftover[:half], leftover[half:]),
        (True, False): ([], leftover),
        (False, True): (leftover, []),
        (True, True): ([], []),
    }[(distractors is not None, background is not None)]
    taken = set(positives) | set(negatives)
    roles = []
    for given, input_name, files in ((distractors, "distractors", from_leftover[0]),
                                     (background, "background", from_leftover[1])):
        if given is None:
            roles.append([(p, images, "images") for p in files])
        else:
            roles.append([(p, _root(given), input_name) for p in list_images(given) if p not in taken])
    notes = []
    if distractors is not None and background is not None and leftover:
        notes.append(f"{len(leftover)} images of {name} were not needed")
    return _Plan(positives, negatives, roles[0], roles[1], notes)


class _Staging:
    """Writes images under temporary names, then renames them to shuffled DISC2021 ids."""

    FOLDERS = {"queries": ("Q", 5), "references": ("R", 6), "train": ("T", 6)}

    def __init__(self, root: Path):
        self.root = root
        self.entries: dict[str, list[tuple[str, str, str, str]]] = {folder: [] for folder in self.FOLDERS}

    def add(self, folder: str, image: Image.Image, role: str, input_name: str, source: str) -> str:
        name = f"_{len(self.entries[folder]):07d}"
        (self.root / folder / f"{name}.jpg").write_bytes(_jpeg_bytes(image, JPEG_QUALITY))
        self.entries[folder].append((name, role, input_name, source))
        return name

    def count(self, folder: str) -> int:
        return len(self.entries[folder])

    def assign_ids(self, rng: np.random.Generator) -> dict[str, str]:
        """Rename every staged file to its id; return staged name -> id per folder."""
        ids: dict[str, dict[str, str]] = {}
        for folder, (prefix, width) in self.FOLDERS.items():
            entries = self.entries[folder]
            ids[folder] = {entries[old][0]: f"{prefix}{new:0{width}d}"
                           for new, old in enumerate(rng.permutation(len(entries)))}
            for name, *_ in entries:
                os.replace(self.root / folder / f"{name}.jpg", self.root / folder / f"{ids[folder][name]}.jpg")
        return ids

    def sources(self, ids: dict[str, dict[str, str]]) -> list[tuple[str, str, str, str]]:
        return sorted((ids[folder][name], role, input_name, source)
                      for folder, entries in self.entries.items() for name, role, input_name, source in entries)


ImageSource = str | os.PathLike | Sequence[str | os.PathLike]


def make_benchmark(images: ImageSource, output: str | os.PathLike, references: int | None = None,
                   queries_per_ref: int = 2, negative_fraction: float = 0.5,
                   distractors: ImageSource | None = None, background: ImageSource | None = None,
                   seed: int = 0, recipe: str = "default", overwrite: bool = False,
                   progress: bool = False) -> BenchmarkSummary:
    """Build a DISC2021-like benchmark in ``output`` from the user's ``images``.

    images, distractors, background: a folder (searched recursively), a text file listing image
        paths, or a sequence of paths (as :func:`rdcd.images.list_images`).

    references: number of copied references (positive sources); default a quarter of ``images``.
    queries_per_ref: edited queries per positive source; negative sources get as many each.
    negative_fraction: fraction of the queries (and sources) with no match, in [0, 1).
    distractors / background: extra references / train images; when not given, the images left
        over after choosing sources are used (split half and half when both are missing).
    recipe: a name in :data:`RECIPES` (the edit set).
    Unreadable, too small or byte-identical inputs are skipped and listed in ``summary.skipped``.
    The folder is built next to ``output`` and renamed into place when complete.
    """
    from tqdm import tqdm

    started = time.perf_counter()
    recipe_ = _get_recipe(recipe)
    if not 0.0 <= negative_fraction < 1.0:
        raise ValueError(f"negative_fraction must be in [0, 1), got {negative_fraction}")
    if queries_per_ref < 1:
        raise ValueError(f"queries_per_ref must be >= 1, got {queries_per_ref}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if references is not None and references < 1:
        raise ValueError(f"references must be >= 1, got {references}")
    output = Path(output)
    pool = list_images(images)
    if not pool:
        raise ValueError("no input images given")
    n_pos = references if references is not None else max(1, len(pool) // 4)
    n_neg = round(n_pos * negative_fraction / (1.0 - negative_fraction))
    _augly_compat.apply()

    with _build_folder(output, overwrite) as building:
        rng = np.random.default_rng(seed)
        inputs = _Inputs()
        plan = _plan(_describe(images), _root(images), pool, n_pos, n_neg, distractors, background, rng, inputs)
        if not plan.negatives and "overlay_onto_background" in recipe_.ops:
            plan.notes.append("overlay_onto_background unused: it pastes onto negative sources, and there are none")
        backdrops = Backdrops({_relative(p, _root(images)): p for p in plan.negatives})
        staging = _Staging(building)
        queries: dict[str, tuple[str, list[dict]]] = {}  # staged query -> (staged reference or "", edits)
        op_counts: Counter = Counter()
        bar = tqdm(total=len(plan.positives) + len(plan.negatives) + len(plan.distractors) + len(plan.train), disable=not progress,
                   unit="img", desc="make-benchmark")

        for negative, sources in ((0, plan.positives), (1, plan.negatives)):
            for rank, path in enumerate(sources):
                bar.update()
                source, rel = inputs.load(path, EDIT_SHORT_SIDE), _relative(path, _root(images))
                reference = "" if negative else staging.add(
                    "references", _fit_short_side(source, OUTPUT_SHORT_SIDE), "reference", "images", rel)
                for copy in range(queries_per_ref):
                    edited, records = random_edit(source, np.random.default_rng([seed, negative, rank, copy]),
                                                  recipe_, backdrops)
                    query = staging.add("queries", _fit_short_side(edited, OUTPUT_SHORT_SIDE),
                                        "negative_query" if negative else "query", "images", rel)
                    queries[query] = (reference, records)
                    op_counts.update(r["op"] for r in records)
        for folder, role, files in (("references", "distractor", plan.distractors), ("train", "train", plan.train)):
            for path, root, input_name in files:
                bar.update()
                image = inputs.load(path, OUTPUT_SHORT_SIDE)
                if image is not None:
                    staging.add(folder, image, role, input_name, _relative(path, root))
        bar.close()

        ids = staging.assign_ids(rng)
        q_ids, r_ids = ids["queries"], ids["references"]
        _write_csv(building / "ground_truth.csv", ("query_id", "reference_id"),
                   sorted((q_ids[q], r_ids.get(r, "")) for q, (r, _) in queries.items()))
        _write_csv(building / "edits.csv", ("query_id", "recipe", "ops"),
                   sorted((q_ids[q], "+".join(r["op"] for r in records), json.dumps(records, separators=(",", ":")))
                          for q, (_, records) in queries.items()))
        _write_csv(building / "sources.csv", ("image_id", "role", "input", "path"), staging.sources(ids))

        summary = BenchmarkSummary(
            output=str(output), recipe=recipe_.name, seed=seed, positive_sources=len(plan.positives),
            negative_sources=len(plan.negatives), references=staging.count("references"),
            distractors=staging.count("references") - len(plan.positives), queries=staging.count("queries"),
            positive_queries=len(plan.positives) * queries_per_ref,
            negative_queries=len(plan.negatives) * queries_per_ref, train=staging.count("train"),
            op_counts=dict(sorted(op_counts.items())), skipped=inputs.skipped, notes=plan.notes)
        record = {k: v for k, v in summary.to_dict().items() if k not in ("output", "seconds")}
        record["settings"] = {
            "images": _describe(images), "distractors": _describe(distractors),
            "background": _describe(background), "references": n_pos,
            "queries_per_ref": queries_per_ref, "negative_fraction": negative_fraction, "seed": seed,
            "recipe": asdict(recipe_), "output_short_side": OUTPUT_SHORT_SIDE,
            "edit_short_side": EDIT_SHORT_SIDE, "min_short_side": MIN_SHORT_SIDE,
            "jpeg_quality": JPEG_QUALITY, "jpeg_options": _JPEG_OPTIONS, "versions": _versions(),
        }
        (building / "benchmark.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    summary.seconds = round(time.perf_counter() - started, 2)
    return summary


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("rdcd", "augly", "pillow", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found

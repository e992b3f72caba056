"""One model on one benchmark folder: embed its sets once, score them (the one scorer behind ``rdcd
bench``, model shipping ``rdcd.ship`` and the scripts).

A benchmark folder (``rdcd make-benchmark``) holds ``queries/``, ``references/``, ``train/`` (the
background of score normalisation, never the references), ``ground_truth.csv`` and optionally
``edits.csv``. Predictions are per-query kNN (exact inner product), raw and score-normalised (SSCD's
ranks 0..2, at a given beta or each of ``BETAS``); the metrics are DISC2021's (``rdcd.metrics``),
plus precision and recall at given thresholds.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from rdcd.images import list_images
from rdcd.metrics import Predictions, at_threshold, evaluate, read_ground_truth

#: score normalisation of every rdcd benchmark number unless a model's own beta is asked for: SSCD's beta[0, 2], beta = 1
SCORE_NORM_BETA = 1.0
SCORE_NORM_RANKS = (0, 2)
#: score-normalisation weights tried when calibrating a model on its validation benchmark; SSCD's beta 1
#: over-subtracts for rdcd's students (docs/experiments.md), so each card records the best of these
BETAS = (0.25, 0.5, 0.75, 1.0)
#: the metrics of one scoring (``evaluate``'s keys)
ROW_KEYS = ("uAP", "recall_at_p90", "threshold_at_p90", "acc_at_1", "n_gt")


@dataclass
class BenchmarkFolder:
    """A DISC2021-like benchmark folder: image lists, ground truth and (optionally) the edits of each query."""

    root: Path
    queries: list[Path]
    references: list[Path]
    train: list[Path]
    ground_truth: dict[str, str | None]
    edits: dict[str, tuple[str, ...]] | None  # query id -> op names, None without edits.csv

    @classmethod
    def read(cls, root: str | os.PathLike) -> "BenchmarkFolder":
        root = Path(root)
        missing = [name for name in ("queries", "references", "train", "ground_truth.csv")
                   if not (root / name).exists()]
        if missing:
            raise FileNotFoundError(
                f"{root}: not a benchmark folder, {', '.join(missing)} missing; expected queries/, references/, "
                "train/ and ground_truth.csv (as written by `rdcd make-benchmark`)"
            )
        folder = cls(root, list_images(root / "queries"), list_images(root / "references"),
                     list_images(root / "train"), read_ground_truth(root / "ground_truth.csv"),
                     read_edits(root / "edits.csv") if (root / "edits.csv").exists() else None)
        folder._check()
        return folder

    def _check(self) -> None:
        query_ids = {p.stem for p in self.queries}
        reference_ids = {p.stem for p in self.references}
        for what, ids, files in (
            ("queries", {q for q in self.ground_truth}, query_ids),
            ("references", {r for r in self.ground_truth.values() if r}, reference_ids),
        ):
            absent = sorted(ids - files)
            if absent:
                raise ValueError(
                    f"{self.root / 'ground_truth.csv'} names {len(absent)} {what} with no image in "
                    f"{self.root / what}/ (first: {absent[0]}); is it the ground truth of this benchmark?"
                )
        if not any(self.ground_truth.values()):
            raise ValueError(f"{self.root / 'ground_truth.csv'}: no query has a matching reference; uAP is undefined")


def read_edits(path: str | os.PathLike) -> dict[str, tuple[str, ...]]:
    """``edits.csv`` (query_id,recipe,...) -> {query_id: op names}; the recipe is the op names joined by ``+``."""
    path = Path(path)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not {"query_id", "recipe"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: expected columns query_id,recipe[,ops]; found {reader.fieldnames}")
        return {row["query_id"]: tuple(op for op in row["recipe"].split("+") if op) for row in reader}


def embed_benchmark(model, bench: BenchmarkFolder, size: int | None = None, batch_size: int = 32,
                    progress: bool = False, draft: bool = True) -> dict:
    """``{"queries", "references", "train"}`` -> ExtractResult of ``model`` on a benchmark folder."""
    from rdcd.extract import extract

    return {name: extract(model, paths, size=size, batch_size=batch_size, progress=progress, draft=draft)
            for name, paths in (("queries", bench.queries), ("references", bench.references), ("train", bench.train))}


def benchmark_predictions(sets: dict, k: int, score_norm: bool, beta: float = SCORE_NORM_BETA):
    """kNN predictions of embedded benchmark sets (``embed_benchmark``), raw or score-normalised with the
    benchmark's train/ images as background (ranks, and by default beta, as every rdcd benchmark number uses)."""
    from rdcd.match import match

    queries, references, train = ((sets[n].ids, sets[n].vectors) for n in ("queries", "references", "train"))
    return match(queries, references, background=train if score_norm else None, k=k, score_norm=score_norm,
                 beta=beta, ranks=SCORE_NORM_RANKS)


def score_sets(sets: dict, bench: BenchmarkFolder, k: int = 10, beta: float | None = SCORE_NORM_BETA,
               thresholds: Mapping[str, dict] | None = None, score_norm: bool = True,
               row_keys: tuple[str, ...] = ROW_KEYS) -> tuple[dict, dict[str, Predictions]]:
    """Score a model's embedded benchmark sets (``embed_benchmark``); returns (scores, predictions).

    ``scores``: ``benchmark``, ``n_queries``, ``n_references``, ``raw`` (the metrics of ``row_keys``)
    and, with ``score_norm``, ``score_norm`` (with its ``beta``) and ``score_norm_beta1`` (SSCD's
    beta 1, the column of ``rdcd bench``, when ``beta`` is not 1). ``beta=None`` (calibration, on a
    validation benchmark only): each of ``BETAS``, keeping the one of the best uAP (ties: the one
    nearest 1); ``score_norm_betas`` has them all. ``thresholds`` ({"raw" / "score_norm": {"threshold":
    t}}, a card's): each row of that key also gets ``at_calibrated_threshold`` (precision and recall
    at it; the score-normalised one at the model's beta only, where it was calibrated).
    ``predictions``: the kNN predictions under the same keys."""
    scores = {"benchmark": str(bench.root), "n_queries": len(bench.queries), "n_references": len(bench.references)}
    predictions: dict[str, Predictions] = {}

    def score(key: str, score_norm: bool, b: float = SCORE_NORM_BETA, threshold_key: str = "") -> dict:
        found = predictions[key] = benchmark_predictions(sets, k, score_norm, beta=b)
        metrics = evaluate(found, bench.ground_truth)
        row = {name: metrics[name] for name in row_keys}
        threshold = ((thresholds or {}).get(threshold_key) or {}).get("threshold")
        if threshold is not None:
            row["at_calibrated_threshold"] = at_threshold(found, bench.ground_truth, threshold)
        return row

    scores["raw"] = score("raw", False, threshold_key="raw")
    if not score_norm:
        return scores, predictions
    tried = BETAS if beta is None else tuple(dict.fromkeys((beta, SCORE_NORM_BETA)))
    sweep = {b: score(f"beta {b:g}", True, b, "score_norm" if b == beta else "") for b in tried}
    if beta is None:
        scores["score_norm_betas"] = {f"{b:g}": row["uAP"] for b, row in sweep.items()}
        beta = max(BETAS, key=lambda b: (sweep[b]["uAP"], -abs(b - SCORE_NORM_BETA)))
    scores["score_norm"] = dict(sweep[beta], beta=float(beta))
    predictions["score_norm"] = predictions[f"beta {beta:g}"]
    if beta != SCORE_NORM_BETA:
        scores["score_norm_beta1"] = sweep[SCORE_NORM_BETA]
        predictions["score_norm_beta1"] = predictions[f"beta {SCORE_NORM_BETA:g}"]
    for b in tried:
        predictions.pop(f"beta {b:g}")
    return scores, predictions


def score_transformed(sets: dict, bench: BenchmarkFolder, transform, k: int = 10) -> dict:
    """Raw metrics (``ROW_KEYS``) of embedded benchmark sets after ``transform`` (descriptors -> new
    descriptors, e.g. a fitted ``PCAWhitening.transform``): one embedding, many projections."""
    import dataclasses

    projected = {name: dataclasses.replace(result, vectors=transform(result.vectors)) for name, result in sets.items()}
    return score_sets(projected, bench, k=k, score_norm=False)[0]["raw"]


def score_model(model, folder: str | os.PathLike | BenchmarkFolder, thresholds: Mapping[str, dict] | None = None,
                beta: float | None = SCORE_NORM_BETA, sets: dict | None = None, k: int = 10,
                score_norm: bool = True) -> dict:
    """``model`` (a name, file, loaded model or ``ModelRuntime``) on a benchmark folder: its sets
    embedded (or ``sets``, when already embedded), then ``score_sets``' scores."""
    bench = folder if isinstance(folder, BenchmarkFolder) else BenchmarkFolder.read(folder)
    sets = sets if sets is not None else embed_benchmark(model, bench)
    return score_sets(sets, bench, k, beta, thresholds, score_norm)[0]

"""DISC2021 copy-detection metrics and the CSV files they are computed from.

Every prediction is pooled into ONE ranking over all queries (micro average precision), sorted by
score descending with negatives before positives at equal scores, so that tied scores never help.
The formulas follow the challenge's reference code; docs/evaluation.md works an example by hand.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from rdcd.descriptors import atomic_path

METRIC_KEYS = ("uAP", "recall_at_p90", "threshold_at_p90", "acc_at_1", "recall_at_10", "n_gt", "n_predictions")


@dataclass
class Predictions:
    """Candidate pairs (query_id, reference_id, score) as three aligned arrays; higher score = likelier copy."""

    query_ids: np.ndarray
    reference_ids: np.ndarray
    scores: np.ndarray

    def __post_init__(self):
        self.query_ids = np.asarray(self.query_ids, dtype=str)
        self.reference_ids = np.asarray(self.reference_ids, dtype=str)
        self.scores = np.asarray(self.scores)
        if self.scores.dtype.kind != "f":
            self.scores = self.scores.astype(np.float64)
        n = len(self.scores)
        if self.scores.ndim != 1 or len(self.query_ids) != n or len(self.reference_ids) != n:
            raise ValueError(
                f"predictions need aligned 1-d arrays; got {len(self.query_ids)} query ids, "
                f"{len(self.reference_ids)} reference ids, scores of shape {self.scores.shape}"
            )

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, str, float]]) -> "Predictions":
        rows = list(rows)
        if not rows:
            return cls(np.array([], dtype=str), np.array([], dtype=str), np.array([], dtype=np.float64))
        q, r, s = zip(*rows)
        return cls(np.array(q, dtype=str), np.array(r, dtype=str), np.array(s, dtype=np.float64))

    def __len__(self) -> int:
        return len(self.scores)

    def rows(self) -> list[tuple[str, str, float]]:
        return list(zip(self.query_ids.tolist(), self.reference_ids.tolist(), self.scores.tolist()))

    def subset(self, index) -> "Predictions":
        return Predictions(self.query_ids[index], self.reference_ids[index], self.scores[index])


def as_predictions(predictions: Predictions | Sequence[tuple[str, str, float]]) -> Predictions:
    return predictions if isinstance(predictions, Predictions) else Predictions.from_rows(predictions)


# ---------------------------------------------------------------------------------------------- files


def _csv_rows(path: Path, expected_header: tuple[str, ...]):
    """(line number, row) of a CSV file after its header line; ValueError naming the file for a wrong
    header, bytes that are not UTF-8, or rows the csv module cannot parse."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    line = 1
    try:
        # utf-8-sig: spreadsheet programs start CSV files with a byte-order mark; newline="": CRLF rows read as rows
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None or tuple(h.strip() for h in header[: len(expected_header)]) != expected_header:
                raise ValueError(f"{path}: expected a header line {','.join(expected_header)!r}, found {header!r}")
            for line, row in enumerate(reader, start=2):
                yield line, row
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}, line {line}: not a readable UTF-8 CSV file ({e})") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, not a CSV file") from None


def read_ground_truth(path: str | os.PathLike) -> dict[str, str | None]:
    """DISC2021 ground truth CSV ``query_id,reference_id`` -> {query_id: reference_id or None}."""
    path = Path(path)
    gt: dict[str, str | None] = {}
    for line, row in _csv_rows(path, ("query_id", "reference_id")):
        if not row:
            continue
        query = row[0].strip()
        reference = row[1].strip() if len(row) > 1 else ""
        if not query:
            raise ValueError(f"{path}, line {line}: empty query id")
        if query in gt:
            raise ValueError(
                f"{path}, line {line}: query {query!r} listed twice; DISC2021 ground truth has one row per query"
            )
        gt[query] = reference or None
    return gt


def read_predictions(path: str | os.PathLike) -> Predictions:
    """Predictions CSV ``query_id,reference_id,score`` (header line) -> Predictions, in file order."""
    path = Path(path)
    queries, references, scores = [], [], []
    for line, row in _csv_rows(path, ("query_id", "reference_id", "score")):
        if not row:
            continue
        if len(row) < 3:
            raise ValueError(f"{path}, line {line}: expected query_id,reference_id,score, found {row!r}")
        try:
            score = float(row[2])
        except ValueError:
            raise ValueError(f"{path}, line {line}: score {row[2]!r} is not a number") from None
        queries.append(row[0].strip())
        references.append(row[1].strip())
        scores.append(score)
    return Predictions(np.array(queries, dtype=str), np.array(references, dtype=str), np.array(scores, np.float64))


def write_predictions(path: str | os.PathLike, predictions: Predictions | Sequence[tuple[str, str, float]]) -> Path:
    """Write a predictions CSV atomically. Scores are written in the shortest form that reads back exactly."""
    path = Path(path)
    p = as_predictions(predictions)
    with atomic_path(path, ".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            fh.write("query_id,reference_id,score\n")
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerows(zip(p.query_ids.tolist(), p.reference_ids.tolist(), p.scores.astype(str).tolist()))
    return path


def write_ground_truth(path: str | os.PathLike, ground_truth: Mapping[str, str | None]) -> Path:
    path = Path(path)
    with atomic_path(path, ".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(("query_id", "reference_id"))
            writer.writerows((q, r or "") for q, r in ground_truth.items())
    return path


# -------------------------------------------------------------------------------------------- metrics


@dataclass
class _Labelled:
    """Predictions with integer codes for ids and a positive/negative label per row."""

    query_codes: np.ndarray
    scores: np.ndarray
    positive: np.ndarray
    n_gt: int


def _label(predictions: Predictions, ground_truth: Mapping[str, str | None]) -> _Labelled:
    gt_pairs = [(q, r) for q, r in ground_truth.items() if r]
    n_pred = len(predictions)
    gt_q = np.array([q for q, _ in gt_pairs], dtype=str)
    gt_r = np.array([r for _, r in gt_pairs], dtype=str)
    # One integer code per distinct id, shared by predictions and ground truth, so pairs become int64 keys.
    _, q_codes = np.unique(np.concatenate([predictions.query_ids, gt_q]), return_inverse=True)
    r_names, r_codes = np.unique(np.concatenate([predictions.reference_ids, gt_r]), return_inverse=True)
    pair_keys = q_codes.astype(np.int64) * max(len(r_names), 1) + r_codes
    pred_keys, gt_keys = pair_keys[:n_pred], pair_keys[n_pred:]

    order = np.argsort(pred_keys, kind="stable")
    repeated = np.flatnonzero(pred_keys[order][1:] == pred_keys[order][:-1])
    if len(repeated):
        row = order[repeated[0] + 1]
        raise ValueError(
            f"predictions list the pair ({predictions.query_ids[row]}, {predictions.reference_ids[row]}) more than "
            f"once ({len(repeated)} duplicate rows in all); keep one score per (query_id, reference_id) pair"
        )
    scores = np.asarray(predictions.scores, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        i = bad[0]
        raise ValueError(
            f"prediction ({predictions.query_ids[i]}, {predictions.reference_ids[i]}) has score {scores[i]}; "
            "scores must be finite numbers"
        )
    return _Labelled(q_codes[:n_pred], scores, np.isin(pred_keys, gt_keys), len(gt_pairs))


def _ranked(labelled: _Labelled) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores in evaluation order: score descending, negatives before positives among ties."""
    order = np.lexsort((labelled.positive, -labelled.scores))
    return labelled.positive[order], labelled.scores[order]


def _curve(positive_ranked: np.ndarray, n_gt: int) -> tuple[np.ndarray, np.ndarray]:
    true_positives = np.cumsum(positive_ranked)
    precision = true_positives / np.arange(1, len(positive_ranked) + 1)
    recall = true_positives / n_gt
    return precision, recall


def precision_recall_curve(
    predictions: Predictions | Sequence[tuple[str, str, float]], ground_truth: Mapping[str, str | None]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, threshold) at every rank 1..P of the pooled ranking, for plotting."""
    labelled = _label(as_predictions(predictions), ground_truth)
    if labelled.n_gt == 0:
        raise ValueError("the ground truth has no matching pairs, so recall is undefined")
    positive, thresholds = _ranked(labelled)
    precision, recall = _curve(positive, labelled.n_gt)
    return precision, recall, thresholds


def _query_ranks(labelled: _Labelled) -> np.ndarray:
    """Rank of each prediction among its query's predictions: how many others score >= it (ties pessimistic)."""
    n = len(labelled.scores)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((-labelled.scores, labelled.query_codes))
    q, s = labelled.query_codes[order], labelled.scores[order]
    new_query = np.r_[True, q[1:] != q[:-1]]
    new_tie = new_query | np.r_[True, s[1:] != s[:-1]]
    tie_last = np.r_[np.flatnonzero(new_tie)[1:] - 1, n - 1]  # last row of each run of equal (query, score)
    query_first = np.flatnonzero(new_query)
    ranks_sorted = tie_last[np.cumsum(new_tie) - 1] - query_first[np.cumsum(new_query) - 1]
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = ranks_sorted
    return ranks


def annotate(
    predictions: Predictions | Sequence[tuple[str, str, float]], ground_truth: Mapping[str, str | None]
) -> tuple[np.ndarray, np.ndarray]:
    """Per prediction: whether its pair is a true copy, and its rank among its query's predictions
    (how many of them score at least as high, minus one: ties pessimistic)."""
    labelled = _label(as_predictions(predictions), ground_truth)
    return labelled.positive, _query_ranks(labelled)


def at_threshold(
    predictions: Predictions | Sequence[tuple[str, str, float]], ground_truth: Mapping[str, str | None],
    threshold: float,
) -> dict:
    """Precision and recall of the pairs scoring at least ``threshold`` (the pairs a user would call
    copies): ``precision`` (None when no pair reaches it), ``recall``, ``n_flagged``, ``n_true``, ``n_gt``."""
    labelled = _label(as_predictions(predictions), ground_truth)
    flagged = labelled.scores >= threshold
    n_flagged, n_true = int(flagged.sum()), int((flagged & labelled.positive).sum())
    return {"threshold": float(threshold), "precision": n_true / n_flagged if n_flagged else None,
            "recall": n_true / labelled.n_gt if labelled.n_gt else None,
            "n_flagged": n_flagged, "n_true": n_true, "n_gt": labelled.n_gt}


def evaluate(
    predictions: Predictions | Sequence[tuple[str, str, float]], ground_truth: Mapping[str, str | None]
) -> dict:
    """DISC2021 metrics of ``predictions`` against ``ground_truth`` ({query_id: reference_id or None}).

    Returns a dict with keys ``uAP``, ``recall_at_p90``, ``threshold_at_p90`` (both None when no rank
    reaches precision 0.9), ``acc_at_1``, ``recall_at_10``, ``n_gt`` and ``n_predictions``.
    """
    predictions = as_predictions(predictions)
    labelled = _label(predictions, ground_truth)
    n_gt = labelled.n_gt
    if n_gt == 0:
        raise ValueError(
            "the ground truth has no matching pairs (every reference_id is empty), so uAP and recall are undefined"
        )
    check_common_ids(predictions, ground_truth)
    positive, thresholds = _ranked(labelled)
    precision, recall = _curve(positive, n_gt)
    uap = float(np.sum(np.diff(recall, prepend=0.0) * precision))

    recall_at_p90 = threshold_at_p90 = None
    reaching = np.flatnonzero(precision >= 0.9)
    if len(reaching):
        best = reaching[np.argmax(recall[reaching])]  # first rank with the largest recall
        recall_at_p90, threshold_at_p90 = float(recall[best]), float(thresholds[best])

    true_ranks = _query_ranks(labelled)[labelled.positive]  # ground-truth pairs never predicted rank infinite
    return {
        "uAP": uap,
        "recall_at_p90": recall_at_p90,
        "threshold_at_p90": threshold_at_p90,
        "acc_at_1": float(np.sum(true_ranks == 0) / n_gt),
        "recall_at_10": float(np.sum(true_ranks < 10) / n_gt),
        "n_gt": n_gt,
        "n_predictions": len(predictions),
    }


def check_common_ids(predictions: Predictions, ground_truth: Mapping[str, str | None]) -> None:
    """Raise ValueError when no predicted query id is in the ground truth: the two files then
    describe different benchmarks (or name images differently), and a uAP of 0 would mean nothing."""
    if len(predictions) and not np.isin(predictions.query_ids, np.array(list(ground_truth), dtype=str)).any():
        example = sorted(ground_truth)[:1]
        raise ValueError(
            f"none of the {len(np.unique(predictions.query_ids))} query ids of the predictions (e.g. "
            f"{predictions.query_ids[0]!r}) is in the ground truth (e.g. {example[0] if example else None!r}): "
            "are they from the same benchmark, with ids named the same way (file stems)?")


def separation(query_ids: Sequence[str], query_vectors: np.ndarray, reference_ids: Sequence[str],
               reference_vectors: np.ndarray, ground_truth: Mapping[str, str | None], eps: float = 1e-3) -> dict:
    """How far apart copies and non-copies lie, from the descriptors themselves (no search, no ranking).

    With the references as a fixed set of keys: ``pos_cos`` is the mean cosine of each copy query to
    its reference; ``hardest_neg_cos`` the mean over all queries of the largest cosine to a reference
    that is not its own; ``hn`` the hard-negative loss of docs/method.md on those cosines,
    mean of -log(max(1 - hardest, eps)). Unlike the training log's values, which are measured against
    a key queue that fills up and changes with the key encoder, these are comparable across steps.
    Vectors are expected L2-normalised.
    """
    ref_row = {r: i for i, r in enumerate(reference_ids)}
    sims = np.asarray(query_vectors, dtype=np.float32) @ np.asarray(reference_vectors, dtype=np.float32).T
    own = np.array([ref_row.get(ground_truth.get(q) or "", -1) for q in query_ids])
    copy_rows = np.flatnonzero(own >= 0)
    pos = sims[copy_rows, own[copy_rows]]
    negatives = sims.copy()
    negatives[copy_rows, own[copy_rows]] = -np.inf
    hardest = negatives.max(axis=1)
    return {"pos_cos": float(pos.mean()) if len(pos) else None, "hardest_neg_cos": float(hardest.mean()),
            "hn": float(-np.log(np.maximum(1.0 - hardest, eps)).mean())}

"""Groups of copies inside one collection: the API behind ``rdcd dedup``.

Every image is searched against the whole collection (self kNN, k neighbours, itself left out);
pairs scoring at least the threshold are linked and the groups are the connected components of
those links. Components are transitive: a chain A~B~C puts A and C together even if A and C
alone score below the threshold. For copy detection that is what a curator wants (every version
of one picture in one group), and with a threshold at precision 0.9 chains through unrelated
images are rare; the CSV keeps each image's best link score so loose members can be checked.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rdcd.descriptors import atomic_path
from rdcd.metrics import Predictions
from rdcd.search import Index, knn_pairs


@dataclass
class Groups:
    ids: list[str]
    group: np.ndarray  # group number per image: 0 = the largest group; every singleton has its own
    best_score: np.ndarray  # each image's best link score (nan for images without a link)
    pairs: Predictions  # the links: pairs at or above the threshold, each once
    threshold: float
    paths: dict[str, Path] | None = None

    def members(self) -> list[list[str]]:
        """The groups with at least two images, largest first."""
        found: dict[int, list[str]] = {}
        for i, g in zip(self.ids, self.group):
            found.setdefault(int(g), []).append(i)
        return [m for _, m in sorted(found.items()) if len(m) > 1]


def find_groups(ids: Sequence[str], vectors: np.ndarray, threshold: float, k: int = 10, index=None,
                offsets: np.ndarray | None = None) -> Groups:
    """Connected components of the self-kNN pairs scoring >= ``threshold``. ``index``: a prebuilt index of
    the same vectors (a store's); ``offsets``: score normalisation, as ``rdcd.search.knn_pairs``."""
    ids = [str(i) for i in ids]
    index = index if index is not None else Index.build(ids, vectors)
    pairs = knn_pairs(ids, vectors, index, k=k + 1, offsets=offsets)
    keep = (pairs.query_ids != pairs.reference_ids) & (pairs.scores >= threshold)
    pairs = pairs.subset(np.flatnonzero(keep))
    position = {i: n for n, i in enumerate(ids)}
    parent = np.arange(len(ids))

    def root(n: int) -> int:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    best = np.full(len(ids), np.nan, np.float32)
    links: dict[tuple[int, int], float] = {}  # each pair once, at its higher score of the two directions
    for q, r, s in pairs.rows():
        a, b = position[q], position[r]
        parent[root(a)] = root(b)
        best[a], best[b] = np.fmax(best[a], s), np.fmax(best[b], s)
        links[min(a, b), max(a, b)] = max(s, links.get((min(a, b), max(a, b)), -np.inf))
    roots = np.array([root(n) for n in range(len(ids))])
    sizes = np.bincount(roots, minlength=len(ids))
    order = sorted(set(roots.tolist()), key=lambda r: (-sizes[r], r))  # largest first, then by first member
    number = {r: g for g, r in enumerate(order)}
    link_pairs = Predictions.from_rows([(ids[a], ids[b], s) for (a, b), s in sorted(links.items())])
    return Groups(ids, np.array([number[r] for r in roots]), best, link_pairs, float(threshold))


def dedup_images(images, model="rdcd-default", threshold: float | str = "auto", k: int = 10,
                 precision: str = "auto", draft: bool = True, batch_size: int = 32) -> Groups:
    """Groups of copies among the images of a folder / file list (ids are file stems)."""
    from rdcd.extract import extract
    from rdcd.images import list_images
    from rdcd.match import resolve_threshold
    from rdcd.models.runtime import resolve_runtime

    resolved = resolve_runtime(model, precision)
    threshold, _ = resolve_threshold(threshold, resolved.card, False, None, int8=resolved.int8,
                                     model_name=getattr(model, "name", model))
    result = extract(resolved, images, batch_size=batch_size, draft=draft, progress=False)
    groups = find_groups(result.ids, result.vectors, threshold, k)
    groups.paths = {p.stem: p for p in list_images(images)}
    return groups


def dedup_store(store, threshold: float | None = None, k: int = 10) -> Groups:
    """Groups of copies among a reference store's references, scored as the store scores queries."""
    threshold = store.threshold if threshold is None else threshold
    if threshold is None:
        raise ValueError(f"the store {store.location} has no threshold; give one (--threshold)")
    ids, vectors = store.backend.vectors()  # already in the searched space (whitened if the store whitens)
    normalizer = store.matcher.normalizer_
    offsets = None if normalizer is None else normalizer.bias(vectors)
    return find_groups(ids, vectors, threshold, k, index=store.backend, offsets=offsets)


def write_groups(path: str | os.PathLike, groups: Groups) -> Path:
    """One row per image: image_id, group, group_size, best_score (its strongest link), path."""
    sizes = np.bincount(groups.group)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["image_id", "group", "group_size", "best_score", "path"])
            for i, g, s in sorted(zip(groups.ids, groups.group, groups.best_score), key=lambda row: (row[1], row[0])):
                out.writerow([i, int(g), int(sizes[g]), "" if np.isnan(s) else f"{s:.4f}",
                              str((groups.paths or {}).get(i, ""))])
    return path


def write_groups_html(path: str | os.PathLike, groups: Groups, max_groups: int = 500) -> Path:
    """A self-contained page: each group of two or more images as a row of thumbnails."""
    from rdcd.report import STYLE, thumbnail_figure

    members = groups.members()
    best = dict(zip(groups.ids, groups.best_score))
    rows = []
    for n, group in enumerate(members[:max_groups]):
        figures = "".join(thumbnail_figure((groups.paths or {}).get(i), f"{i} ({best[i]:.3f})") for i in group)
        rows.append(f"<h2>group {n} ({len(group)} images)</h2><div class='plots'>{figures}</div>")
    more = f"<p class='note'>{len(members) - max_groups} more groups in the CSV.</p>" if len(members) > max_groups else ""
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>rdcd dedup</title><style>{STYLE}</style>"
            f"</head><body><h1>Groups of copies</h1><p>{len(groups.ids)} images, {len(members)} groups of two or more "
            f"(threshold {groups.threshold:.4f}; the number beside each image is its best link score).</p>"
            + "".join(rows) + more + "</body></html>")
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path

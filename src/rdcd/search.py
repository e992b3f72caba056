"""Nearest-neighbour search over descriptors with string ids, and candidate pairs from it.

An index is described by a FAISS factory string ("Flat" = exact, "IVF1024,Flat", "IVF4096,PQ32",
"HNSW32", "PCAW128,L2norm,Flat"...) and always ranks by inner product, which for L2-normalised
descriptors is cosine similarity. Two ways to turn searches into candidate pairs:
``knn_pairs`` keeps each query's k best references (the SSCD/RDCD protocol) and ``best_pairs``
keeps the N best pairs over all queries (the DISC2021 descriptor track).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from rdcd.descriptors import atomic_path
from rdcd.metrics import Predictions
from rdcd.models.base import as_matrix

log = logging.getLogger(__name__)


def set_threads(n: int | None = None) -> int:
    """Use ``n`` FAISS threads (default: all cores this process may use), never more; returns the number set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = cores if n is None else max(1, min(int(n), cores))
    faiss.omp_set_num_threads(n)
    return n


def faiss_index(factory: str, vectors: np.ndarray, nprobe: int | None = None, ef_search: int | None = None):
    """An inner-product FAISS index (no ids) from a factory string, trained on ``vectors`` and holding them."""
    vectors = as_matrix(vectors)
    index = _new_index(vectors.shape[1], factory)
    _train(index, factory, vectors)
    index.add(vectors)
    set_search_params(index, factory, nprobe, ef_search)
    return index


def _new_index(dim: int, factory: str) -> faiss.Index:
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"FAISS cannot build index {factory!r} for dimension {dim}: {str(e).strip()}") from None


def _train(index: faiss.Index, factory: str, vectors: np.ndarray) -> None:
    if index.is_trained:
        return
    log.info("training %s on %d vectors", factory, len(vectors))
    try:
        index.train(vectors)
    except RuntimeError as e:
        raise ValueError(
            f"training index {factory!r} on {len(vectors)} vectors failed ({str(e).strip().splitlines()[-1]}); "
            "train on more vectors or use fewer lists/centroids, e.g. IVF256 instead of IVF4096"
        ) from None


def set_search_params(index: faiss.Index, factory: str, nprobe: int | None = None, ef_search: int | None = None):
    """Set IVF ``nprobe`` / HNSW ``efSearch`` (also inside pre-transforms); None leaves a setting as it is."""
    space = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        if value is None:
            continue
        try:
            space.set_index_parameter(index, name, int(value))
        except RuntimeError:
            raise ValueError(f"index {factory!r} has no parameter {name}") from None


class Index:
    """A FAISS inner-product index whose entries carry string ids.

    >>> index = Index(64, "IVF1024,Flat"); index.add(reference_ids, references); index.nprobe = 16
    >>> scores, ids = index.search(queries, k=10)
    """

    def __init__(self, dim: int, factory: str = "Flat"):
        self.factory = factory
        self.faiss = _new_index(dim, factory)
        self._ids: list[str] = []
        self._known: set[str] = set()
        self._id_array: np.ndarray | None = None  # self._ids as an array for fast lookup, rebuilt after add

    @classmethod
    def build(cls, ids: Sequence[str], vectors: np.ndarray, factory: str = "Flat", **search_params) -> "Index":
        """Index ``vectors`` (training on them when the index type needs training)."""
        vectors = as_matrix(vectors)
        index = cls(vectors.shape[1], factory)
        index.add(ids, vectors)
        index.set_search_params(**search_params)
        return index

    @property
    def dim(self) -> int:
        return self.faiss.d

    @property
    def ids(self) -> list[str]:
        return self._ids

    def __len__(self) -> int:
        return self.faiss.ntotal

    def train(self, vectors: np.ndarray) -> None:
        _train(self.faiss, self.factory, as_matrix(vectors, self.dim))

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Append entries; an untrained index is first trained on these vectors."""
        vectors = as_matrix(vectors, self.dim)
        ids = [str(i) for i in ids]
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        new = set(ids)
        if len(new) != len(ids) or not self._known.isdisjoint(new):
            raise ValueError(f"id {_first_repeat(ids, self._known)!r} is already in the index; ids must be unique")
        self.train(vectors)
        self.faiss.add(vectors)
        self._ids.extend(ids)
        self._known |= new
        self._id_array = None

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Speed/recall knobs: ``nprobe`` (IVF lists visited), ``ef_search`` (HNSW candidate list size)."""
        set_search_params(self.faiss, self.factory, nprobe, ef_search)

    @property
    def nprobe(self) -> int | None:
        try:
            return faiss.extract_index_ivf(self.faiss).nprobe
        except RuntimeError:
            return None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.set_search_params(nprobe=value)

    @property
    def ef_search(self) -> int | None:
        hnsw = _find_hnsw(self.faiss)
        return None if hnsw is None else hnsw.hnsw.efSearch

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self.set_search_params(ef_search=value)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best entries per query: scores float32 (n, k), descending, and ids (n, k).

        Where fewer than k entries are found (small index, too few IVF lists probed) the id is ""
        and the score -inf.
        """
        vectors = as_matrix(vectors, self.dim, "query vectors")
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be at least 1; got {k}")
        scores, labels = self.faiss.search(vectors, k)
        found = labels >= 0
        if self._id_array is None:
            self._id_array = np.asarray(self._ids, dtype=_id_dtype(self._ids))
        ids = np.full(labels.shape, "", dtype=self._id_array.dtype)
        ids[found] = self._id_array[labels[found]]
        scores[~found] = -np.inf
        return scores, ids

    def save(self, path: str | os.PathLike) -> Path:
        """One ``.npz`` file holding the serialised FAISS index, the ids and the factory string; atomic."""
        path = Path(path)
        with atomic_path(path, ".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    index=faiss.serialize_index(self.faiss),
                    ids=np.asarray(self._ids, dtype=_id_dtype(self._ids)),
                    factory=np.array(self.factory),
                )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Index":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: index file not found")
        with np.load(path, allow_pickle=False) as f:
            if not {"index", "ids", "factory"} <= set(f.files):
                raise ValueError(f"{path}: not an rdcd index file (has {sorted(f.files)}); save one with Index.save")
            index = cls.__new__(cls)
            index.factory = str(f["factory"])
            index.faiss = faiss.deserialize_index(f["index"])
            index._ids = f["ids"].tolist()
        index._known = set(index._ids)
        index._id_array = None
        if len(index._ids) != index.faiss.ntotal:
            raise ValueError(f"{path}: {len(index._ids)} ids for {index.faiss.ntotal} indexed vectors")
        return index

    def __repr__(self) -> str:
        return f"<Index {self.factory!r} dim={self.dim} n={len(self)}>"


def _first_repeat(ids: Sequence[str], known: set[str]) -> str:
    seen = set(known)
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    raise AssertionError("no repeated id")


def _id_dtype(ids: Sequence[str]) -> np.dtype:
    return np.dtype(f"U{max([len(i) for i in ids] + [1])}")


def _find_hnsw(index: faiss.Index):
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return _find_hnsw(index.index)
    return index if hasattr(index, "hnsw") else None


def _check_queries(query_ids: Sequence[str], query_vectors: np.ndarray, offsets: np.ndarray | None):
    query_ids = np.asarray(query_ids, dtype=str)
    if len(query_ids) != len(query_vectors):
        raise ValueError(f"{len(query_ids)} query ids for {len(query_vectors)} query vectors")
    if offsets is None:
        offsets = np.zeros(len(query_ids), dtype=np.float32)
    offsets = np.asarray(offsets, dtype=np.float32)
    if offsets.shape != (len(query_ids),):
        raise ValueError(f"offsets must have one value per query ({len(query_ids)}); got shape {offsets.shape}")
    return query_ids, offsets


def knn_pairs(
    query_ids: Sequence[str],
    query_vectors: np.ndarray,
    index: Index,
    k: int = 10,
    offsets: np.ndarray | None = None,
) -> Predictions:
    """Each query's k nearest references as predictions (query by query, best first).

    ``offsets``: one value per query subtracted from its scores (score normalisation, see
    postprocess.ScoreNormalizer.bias).
    """
    query_ids, offsets = _check_queries(query_ids, query_vectors, offsets)
    scores, ids = index.search(query_vectors, min(k, max(len(index), 1)))
    found = ids != ""
    rows = np.broadcast_to(np.arange(len(query_ids))[:, None], ids.shape)[found]
    return Predictions(query_ids[rows], ids[found], scores[found] - offsets[rows])


def best_pairs(
    query_ids: Sequence[str],
    query_vectors: np.ndarray,
    index: Index,
    n: int,
    k: int = 10,
    offsets: np.ndarray | None = None,
) -> Predictions:
    """The ``n`` best (query, reference) pairs over all queries, best first.

    Every query is searched with k neighbours first; a query whose k-th score still beats the
    n-th best pair overall may hold more of the best pairs, so it is searched again with twice
    as many neighbours until none does. With an exact index the result is the exact global top n.
    """
    query_ids, offsets = _check_queries(query_ids, query_vectors, offsets)
    query_vectors = as_matrix(query_vectors, index.dim, "query vectors")
    n_refs = len(index)
    if n < 1 or n_refs == 0 or len(query_ids) == 0:
        return Predictions.from_rows([])
    depth = np.full(len(query_ids), min(max(k, 1), n_refs))
    found_scores: list[np.ndarray] = [np.empty(0, np.float32)] * len(query_ids)
    found_ids: list[np.ndarray] = [np.empty(0, str)] * len(query_ids)
    todo = np.arange(len(query_ids))
    while len(todo):
        for d in np.unique(depth[todo]):
            group = todo[depth[todo] == d]
            scores, ids = index.search(query_vectors[group], int(d))
            scores -= offsets[group, None]
            for row, q in enumerate(group):
                keep = ids[row] != ""
                found_scores[q], found_ids[q] = scores[row][keep], ids[row][keep]
        all_scores = np.concatenate(found_scores)
        cutoff = -np.inf if len(all_scores) < n else np.partition(all_scores, len(all_scores) - n)[len(all_scores) - n]
        # A query may hide better pairs only if its whole list made the cut and it has more references to give.
        last = np.array([s[-1] if len(s) == d else -np.inf for s, d in zip(found_scores, depth)])
        todo = np.flatnonzero((last > cutoff) & (depth < n_refs))
        depth[todo] = np.minimum(depth[todo] * 2, n_refs)
        if len(todo):
            log.debug("best_pairs: searching %d queries again with up to %d neighbours", len(todo), depth[todo].max())
    lengths = [len(s) for s in found_scores]
    pairs = Predictions(np.repeat(query_ids, lengths), np.concatenate(found_ids), np.concatenate(found_scores))
    order = np.argsort(-pairs.scores, kind="stable")[:n]
    return pairs.subset(order)

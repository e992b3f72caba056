"""Descriptor post-processing fitted on a background set (DISC2021 training images, never the references).

``PCAWhitening``: centre, project on the top principal components, scale each to unit variance,
L2-normalise. ``ScoreNormalizer``: SSCD's beta[i,j] normalisation, subtracting from every score
of a query how similar that query is to unrelated background images. Both follow scikit-learn's
shape: ``fit`` learns everything they hold, ``save``/``load`` keep it in one ``.npz`` file.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rdcd.descriptors import atomic_path
from rdcd.models.base import as_matrix, l2_normalize


def _save_npz(path: str | os.PathLike, **arrays) -> Path:
    path = Path(path)
    with atomic_path(path, ".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return path


def _load_npz(path: str | os.PathLike, kind: str) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    with np.load(path, allow_pickle=False) as f:
        found = str(f["kind"]) if "kind" in f.files else None
        if found != kind:
            raise ValueError(f"{path}: holds {found or 'no rdcd object'}, expected a saved {kind}")
        return {name: f[name] for name in f.files}


class PCAWhitening:
    """PCA whitening to ``dim`` dimensions followed by L2 normalisation; ``whiten=False``: plain PCA
    (centre and project, no scaling)."""

    def __init__(self, dim: int, whiten: bool = True):
        self.dim = int(dim)
        self.whiten_components = bool(whiten)
        self.mean_: np.ndarray | None = None
        self.projection_: np.ndarray | None = None  # (input dim, self.dim): components / sqrt(variance)

    def fit(self, background: np.ndarray, chunk: int = 65536) -> "PCAWhitening":
        x = as_matrix(background, what="background descriptors")
        n, d = x.shape
        if not 1 <= self.dim <= min(d, n - 1):
            raise ValueError(
                f"cannot whiten to {self.dim} dims with {n} background descriptors of dimension {d}; "
                f"choose a dim between 1 and {min(d, n - 1)}"
            )
        mean = x.mean(axis=0, dtype=np.float64)
        cov = np.zeros((d, d))
        for start in range(0, n, chunk):  # float64 accumulation without a float64 copy of the whole set
            part = x[start : start + chunk] - mean
            cov += part.T @ part
        cov /= n - 1
        variances, components = np.linalg.eigh(cov)
        top = np.argsort(variances)[::-1][: self.dim]
        variances, components = variances[top], components[:, top]
        if variances[-1] <= 1e-12 * max(variances[0], 1e-300):
            raise ValueError(
                f"the background set spans fewer than {self.dim} dimensions (variance {variances[-1]:.3g} on "
                f"component {self.dim}); whiten to fewer dims or use a larger, more varied background set"
            )
        # Fix each component's sign (largest coordinate positive) so refits give identical outputs.
        signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(self.dim)])
        self.mean_ = mean.astype(np.float32)
        scale = 1.0 / np.sqrt(variances) if self.whiten_components else 1.0
        self.projection_ = (components * signs * scale).astype(np.float32)
        return self

    def whiten(self, x: np.ndarray) -> np.ndarray:
        """Centred, projected and scaled, before the final L2 normalisation."""
        if self.projection_ is None:
            raise RuntimeError("PCAWhitening is not fitted; call fit(background) or PCAWhitening.load(path)")
        x = as_matrix(x, self.projection_.shape[0])
        return (x - self.mean_) @ self.projection_

    def transform(self, x: np.ndarray) -> np.ndarray:
        return l2_normalize(self.whiten(x))

    def fit_transform(self, background: np.ndarray) -> np.ndarray:
        return self.fit(background).transform(background)

    def save(self, path: str | os.PathLike, meta: str | None = None) -> Path:
        """One ``.npz``; ``meta``: a text stored with it (rdcd.models.projected keeps its model record there)."""
        if self.projection_ is None:
            raise RuntimeError("PCAWhitening is not fitted; nothing to save")
        extra = {} if meta is None else {"meta": np.array(meta)}
        return _save_npz(path, kind=np.array("PCAWhitening"), mean=self.mean_, projection=self.projection_,
                         whiten=np.array(self.whiten_components), **extra)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PCAWhitening":
        f = _load_npz(path, "PCAWhitening")
        whitening = cls(f["projection"].shape[1], bool(f["whiten"]) if "whiten" in f else True)
        whitening.mean_, whitening.projection_ = f["mean"], f["projection"]
        return whitening


class ScoreNormalizer:
    """Score normalisation beta[i,j]: score(q, r) = q.r - a(q), where a(q) = beta * mean of q's similarities
    to its nearest background descriptors at ranks i..j (0-based)."""

    def __init__(
        self,
        beta: float = 1.0,
        ranks: tuple[int, int] = (0, 2),
        index: str = "Flat",
        nprobe: int | None = None,
        ef_search: int | None = None,
    ):
        first, last = (int(r) for r in ranks)
        if not 0 <= first <= last:
            raise ValueError(f"ranks must be (i, j) with 0 <= i <= j; got {ranks}")
        self.beta = float(beta)
        self.ranks = (first, last)
        self.index = index  # FAISS factory string for searching the background; exact by default
        self.search_params = {"nprobe": nprobe, "ef_search": ef_search}
        self.background_ = None  # a faiss.Index once fitted

    def fit(self, background: np.ndarray) -> "ScoreNormalizer":
        background = as_matrix(background, what="background descriptors")
        if len(background) <= self.ranks[1]:
            raise ValueError(
                f"score normalisation at ranks {self.ranks} needs more than {self.ranks[1]} background "
                f"descriptors; got {len(background)}"
            )
        from rdcd.search import faiss_index  # FAISS only where it searches: PCA whitening runs without it

        self.background_ = faiss_index(self.index, background, **self.search_params)
        return self

    def bias(self, queries: np.ndarray) -> np.ndarray:
        """a(q) for each query: beta times the mean of its background similarities at ranks i..j."""
        if self.background_ is None:
            raise RuntimeError("ScoreNormalizer is not fitted; call fit(background) or ScoreNormalizer.load(path)")
        queries = as_matrix(queries, self.background_.d, "query descriptors")
        first, last = self.ranks
        similarities, _ = self.background_.search(queries, last + 1)
        return (self.beta * similarities[:, first : last + 1].mean(axis=1)).astype(np.float32)

    def normalize(self, scores: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """Scores (n, ...) of n queries, each row minus that query's a(q)."""
        scores = np.asarray(scores, dtype=np.float32)
        bias = self.bias(queries)
        return scores - bias.reshape((-1,) + (1,) * (scores.ndim - 1))

    def save(self, path: str | os.PathLike) -> Path:
        if self.background_ is None:
            raise RuntimeError("ScoreNormalizer is not fitted; nothing to save")
        import faiss

        return _save_npz(
            path,
            kind=np.array("ScoreNormalizer"),
            beta=np.array(self.beta),
            ranks=np.array(self.ranks),
            index=np.array(self.index),
            background=faiss.serialize_index(self.background_),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ScoreNormalizer":
        import faiss

        f = _load_npz(path, "ScoreNormalizer")
        normalizer = cls(float(f["beta"]), tuple(int(r) for r in f["ranks"]), str(f["index"]))
        normalizer.background_ = faiss.deserialize_index(f["background"])
        return normalizer

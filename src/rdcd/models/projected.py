"""Any model followed by a projection fitted on background images: PCA or PCA whitening to DIM dims.

The obvious way to get compact descriptors from a big model: embed images unrelated to the
references with it, fit PCA (``pca``) or PCA whitening (``pcaw``) on them, keep DIM components,
L2-normalise. Model specs (``rdcd models`` lists them):

    BASE+pcawDIM         e.g. sscd+pcaw128: SSCD at its own input size, whitened to 128 floats
    BASE@SIZE+pcaDIM     e.g. sscd-distilled@160+pca64: the base at SIZE px, plain PCA to 64 floats
    BASE@SIZE            the base at SIZE px (no projection)

BASE is any model spec (a name, ``student:...``, ``gem:BACKBONE``, a file). The projection is
fitted once per (base, size, kind, dim, background image list) and saved as a ``.npz`` file that is
itself a model file: ``--model FILE.npz`` runs the base and the projection, and is how a fitted
projection is reused and shipped. ``fit_projection`` caches it under ``~/.cache/rdcd/projections``
(``RDCD_CACHE`` moves the cache).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import DescriptorModel

_PROJECTED = re.compile(r"^(?P<base>.+?)(?:@(?P<size>\d+))?\+(?P<kind>pcaw|pca)(?P<dim>\d+)$")
_SIZED = re.compile(r"^(?P<base>.+?)@(?P<size>\d+)$")
FILE_KIND = "rdcd-projection"


@dataclass(frozen=True)
class ProjectionSpec:
    """A parsed ``BASE[@SIZE]+pca[w]DIM`` spec."""

    base: str
    size: int | None
    whiten: bool
    dim: int

    @property
    def base_spec(self) -> str:
        """The base model with its size, as ``load_model`` takes it."""
        return f"{self.base}@{self.size}" if self.size else self.base

    @property
    def name(self) -> str:
        return f"{self.base_spec}+{'pcaw' if self.whiten else 'pca'}{self.dim}"


def parse_projection(spec) -> ProjectionSpec | None:
    """The projection a model spec asks for, or None (not a projection spec, or an existing file)."""
    if not isinstance(spec, (str, os.PathLike)) or Path(spec).exists():
        return None
    match = _PROJECTED.match(str(spec))
    if match is None:
        return None
    dim = int(match["dim"])
    if dim < 1:
        raise ValueError(f"model {spec!r}: the projection needs at least 1 dimension")
    return ProjectionSpec(match["base"], int(match["size"]) if match["size"] else None, match["kind"] == "pcaw", dim)


def parse_sized(spec) -> tuple[str, int] | None:
    """``BASE@SIZE`` -> (BASE, SIZE), or None (no size, a projection spec, or an existing file)."""
    if not isinstance(spec, (str, os.PathLike)) or Path(spec).exists() or "+" in str(spec):
        return None
    match = _SIZED.match(str(spec))
    return (match["base"], int(match["size"])) if match else None


class ProjectedModel(DescriptorModel):
    """``base`` followed by a fitted ``rdcd.postprocess.PCAWhitening`` (whitening or plain PCA)."""

    def __init__(self, base: DescriptorModel, projection, name: str):
        self.base, self.projection, self.name = base, projection, name
        self.dim = int(projection.dim)

    @property
    def input_size(self) -> int:
        return self.base.input_size

    @property
    def runs_torch(self) -> bool:
        return self.base.runs_torch

    def how(self, base_how: str) -> str:
        """The one line saying how it runs, from the line of its base."""
        kind = "PCA whitening" if self.projection.whiten_components else "PCA"
        return f"{self.name}: {base_how}, then {kind} to {self.dim} dims"

    def embed(self, images: np.ndarray) -> np.ndarray:
        from .base import l2_normalize

        x = self.base.embed(images) - self.projection.mean_
        # einsum, not BLAS: a product this small takes 0.3 ms single-threaded, while waking BLAS threads
        # left them spinning on the cores the base model's runtime needs (measured: the ONNX network
        # ran 35 % slower per batch beside them)
        return l2_normalize(np.einsum("ij,jk->ik", x, self.projection.projection_))


def cache_dir() -> Path:
    return Path(os.environ.get("RDCD_CACHE", Path.home() / ".cache" / "rdcd")) / "projections"


def background_digest(paths) -> str:
    """What identifies a background set: each file's path, size and modification time, in order."""
    h = hashlib.sha256()
    for p in paths:
        stat = os.stat(p)
        h.update(f"{Path(p).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def fit_projection(spec: str | ProjectionSpec, background, output: str | os.PathLike | None = None,
                   precision: str = "auto", draft: bool = True, batch_size: int = 32, progress: bool = True,
                   base_beside: bool = False) -> Path:
    """Fit the projection of a ``BASE[@SIZE]+pca[w]DIM`` spec on the ``background`` images (a folder,
    file list or list of paths; never the references) and save it; returns the ``.npz`` model file.
    Without ``output`` it goes to the cache, and an earlier fit of the same spec on the same files
    is reused instead of embedding them again. ``base_beside``: BASE is a model file in the folder
    of ``output`` and is recorded by its name, so the two files can move together (shipped models)."""
    from ..extract import extract
    from ..images import list_images
    from ..postprocess import PCAWhitening
    from .shipped import file_sha256

    parsed = parse_projection(spec) if not isinstance(spec, ProjectionSpec) else spec
    if parsed is None:
        raise ValueError(f"{spec!r} is not a projection spec (BASE[@SIZE]+pcaDIM or +pcawDIM)")
    if base_beside and (output is None or Path(parsed.base).resolve().parent != Path(output).resolve().parent):
        raise ValueError(f"{parsed.base}: base_beside needs the base model file in the output's folder")
    paths = list_images(background)
    digest = background_digest(paths)
    # a base model file that changes in place (a retrained model.pt) must not reuse the old fit
    base_file = parsed.base[len("gem:"):] if parsed.base.startswith("gem:") else parsed.base
    weights = file_sha256(base_file) if Path(base_file).is_file() else None
    key = hashlib.sha256(json.dumps([parsed.name, precision, draft, digest, weights]).encode()).hexdigest()[:16]
    path = Path(output) if output else cache_dir() / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', parsed.name)}-{key}.npz"
    if output is None and path.is_file():
        return path
    from .runtime import resolve_runtime

    base = resolve_runtime(parsed.base_spec, precision)
    vectors = extract(base, paths, batch_size=batch_size, progress=progress, draft=draft).vectors
    try:
        projection = PCAWhitening(parsed.dim, whiten=parsed.whiten).fit(vectors)
    except ValueError as e:
        raise ValueError(f"{parsed.name}: fitting on {len(vectors)} background images ({background}): {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    recorded = Path(parsed.base).name if base_beside else parsed.base
    meta = {"format": FILE_KIND, "name": parsed.name, "base": recorded, "input_size": int(base.model.input_size),
            "whiten": parsed.whiten, "dim": parsed.dim, "background_images": len(vectors),
            "background_digest": digest, "precision": precision, "decode": "draft" if draft else "exact"}
    return projection.save(path, meta=json.dumps(meta))


def read_projection_meta(path: str | os.PathLike) -> dict | None:
    """The metadata of a projection model file, or None if ``path`` is not one."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "meta" not in f.files:
                return None
            meta = json.loads(str(f["meta"]))
    except (OSError, ValueError):
        return None
    return meta if meta.get("format") == FILE_KIND else None


def load_projected(path: str | os.PathLike, name: str | None = None, **kwargs) -> ProjectedModel:
    """A projection model file -> ProjectedModel (its base loaded at the recorded input size)."""
    from . import load_model
    from ..postprocess import PCAWhitening

    meta = read_projection_meta(path)
    if meta is None:
        raise ValueError(f"{path}: not an rdcd projection file (made by fit_projection / rdcd extract "
                         "--model BASE+pcawDIM --background DIR)")
    kwargs["input_size"] = kwargs.get("input_size") or meta["input_size"]
    beside = Path(path).parent / meta["base"]  # a base model file shipped next to the projection
    base = load_model(str(beside) if beside.is_file() else meta["base"], **kwargs)
    return ProjectedModel(base, PCAWhitening.load(path), name or meta["name"])


def resolve_projection(spec, background=None, **fit_options):
    """``spec`` unchanged unless it is a projection spec; then its fitted ``.npz`` file (fitted on
    ``background`` now, or reused from the cache). A projection spec without background is an error
    that says what to give."""
    parsed = parse_projection(spec)
    if parsed is None:
        return spec
    if background is None:
        raise ValueError(f"model {spec!r} reduces {parsed.base_spec} with {'PCA whitening' if parsed.whiten else 'PCA'} "
                         "fitted on background images: give them (CLI: --background DIR, images unrelated to the "
                         "references, e.g. your training images), or pass a fitted .npz file as the model")
    return str(fit_projection(parsed, background, **fit_options))

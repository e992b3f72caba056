"""Descriptor files in the DISC2021 formats.

Per-set HDF5: dataset ``vectors`` float32 (n, d) and ``image_names`` fixed-length ASCII bytes.
Readers strip any folder and the image suffix from names, and read shard lists in order.
Also ``.npy`` (vectors) with a ``.ids.txt`` sidecar (one id per line).
Every write goes to a temporary file in the same folder and is renamed into place, so a killed
save leaves the previous file intact.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_id(name: str | bytes) -> str:
    """DISC2021 id of an image: its file stem (folder and image suffix stripped)."""
    if isinstance(name, bytes):
        name = name.decode("utf-8")  # rdcd writes ASCII; other tools' UTF-8 names still read
    base = os.path.basename(name)
    stem, ext = os.path.splitext(base)
    return stem if ext.lower() in IMAGE_SUFFIXES else base


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path next to ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


HDF5_SUFFIXES = (".h5", ".hdf5")


def check_descriptor_suffix(path: str | os.PathLike) -> None:
    if Path(path).suffix.lower() not in HDF5_SUFFIXES + (".npy",):
        raise ValueError(f"{path}: unknown descriptor format {Path(path).suffix!r}; use .h5 (DISC2021) or .npy")


def unstorable_id(image_id: str, path: str | os.PathLike | None) -> str | None:
    """Why a descriptor file at ``path`` cannot hold ``image_id``, or None. DISC2021 HDF5 readers
    decode ids as ASCII (a UTF-8 name makes them raise); ``.npy`` sidecars hold one UTF-8 id a line."""
    suffix = Path(path).suffix.lower() if path is not None else ""
    if suffix in HDF5_SUFFIXES and not image_id.isascii():
        return (f"id {image_id!r} is not ASCII, which the DISC2021 HDF5 format cannot store "
                "(rename the file, or write .npy descriptors)")
    if any(c in image_id for c in "\r\n") or not image_id.strip():
        return f"id {image_id!r} is empty or holds a line break"
    return None


def _check_storable(ids: Sequence[str], path: Path) -> None:
    for i in ids:
        why = unstorable_id(i, path)
        if why:
            raise ValueError(f"{path}: {why}")


def write_descriptors(path: str | os.PathLike, ids: Sequence[str], vectors: np.ndarray,
                      info: dict[str, str] | None = None) -> Path:
    """Write descriptors atomically; the format follows the suffix (``.h5``/``.hdf5`` or ``.npy``).
    ``info`` (HDF5 only): string attributes of the file saying how it was made, e.g. ``rdcd.model``
    (the DISC2021 readers ignore attributes; ``descriptor_info`` reads them back)."""
    path = Path(path)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = [str(i) for i in ids]
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise ValueError(f"{path}: {len(ids)} ids but vectors of shape {vectors.shape}")
    check_descriptor_suffix(path)
    _check_storable(ids, path)
    if path.suffix.lower() in HDF5_SUFFIXES:
        with atomic_path(path, ".h5") as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("vectors", data=vectors)
                width = max([len(i) for i in ids] + [1])
                f.create_dataset("image_names", data=np.array(ids, dtype=f"S{width}"))
                for key, value in (info or {}).items():
                    f.attrs[key] = str(value)
    else:
        with atomic_path(path, ".npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, vectors)
            ids_path = ids_sidecar(path)
            with atomic_path(ids_path) as tmp_ids:
                tmp_ids.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    return path


def descriptor_info(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> dict[str, str]:
    """The ``rdcd.*`` attributes of a descriptor file (the first of several shards): how it was made,
    as ``rdcd extract`` records it. Empty for ``.npy`` files and files written by other tools."""
    first = Path(paths if isinstance(paths, (str, os.PathLike)) else next(iter(paths)))
    if first.suffix.lower() not in (".h5", ".hdf5") or not first.exists():
        return {}
    try:
        with h5py.File(first, "r") as f:
            return {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in f.attrs.items()
                    if k.startswith("rdcd.")}
    except OSError:
        return {}


def ids_sidecar(npy_path: str | os.PathLike) -> Path:
    p = Path(npy_path)
    return p.with_name(p.stem + ".ids.txt")


def _read_one(p: Path, shape_only: bool = False) -> tuple[list[str], np.ndarray | tuple[int, ...]]:
    """(ids, vectors) of one descriptor file, or (ids, vectors' shape); ValueError naming the file
    and the problem for anything that is not a readable, consistent descriptor file."""
    if not p.exists():
        raise FileNotFoundError(f"{p}: descriptor file not found")
    if p.is_dir():
        raise ValueError(f"{p}: is a folder, not a descriptor file")
    if p.suffix.lower() == ".npy":
        side = ids_sidecar(p)
        if not side.exists():
            raise FileNotFoundError(f"{p}: missing its id list {side}")
        try:
            vec = np.load(p, mmap_mode="r" if shape_only else None, allow_pickle=False)
            ids = side.read_text(encoding="utf-8").splitlines()
        except Exception as e:  # numpy's header parser raises ValueError, SyntaxError, EOFError, ... on damage
            raise ValueError(f"{p}: cannot read as .npy descriptors with ids ({type(e).__name__}: {e})") from None
    else:
        try:
            with h5py.File(p, "r") as f:
                if not isinstance(f.get("vectors"), h5py.Dataset) or not isinstance(f.get("image_names"), h5py.Dataset):
                    raise ValueError(f"{p}: not a DISC2021 descriptor file (needs datasets 'vectors' and "
                                     f"'image_names', found {sorted(f.keys())})")
                vec = f["vectors"].shape if shape_only else f["vectors"][()]
                names = f["image_names"][()]
                ids = [image_id(n) for n in np.atleast_1d(names).tolist()]
        except Exception as e:  # a damaged file makes h5py raise OSError, RuntimeError, KeyError, ...
            if isinstance(e, ValueError) and str(e).startswith(str(p)):
                raise
            raise ValueError(f"{p}: cannot read as DISC2021 HDF5 descriptors ({type(e).__name__}: {e})") from None
    shape = tuple(vec.shape if isinstance(vec, np.ndarray) else vec)
    if len(shape) != 2 or shape[0] != len(ids):
        raise ValueError(f"{p}: {len(ids)} names but vectors of shape {shape}")
    if not shape_only and vec.dtype.kind not in "fiu":
        raise ValueError(f"{p}: vectors of type {vec.dtype}, not numbers")
    return ids, (shape if shape_only else vec)


def descriptor_dim(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> int:
    """The dimension of descriptor files (shards must agree), read without loading the vectors."""
    dims = {}
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        dims[Path(p)] = _read_one(Path(p), shape_only=True)[1][1]
    if len(set(dims.values())) > 1:
        raise ValueError("descriptor shards differ in dimension: " + ", ".join(f"{p} {d}" for p, d in dims.items()))
    if not dims:
        raise ValueError("no descriptor files given")
    return next(iter(dims.values()))


def read_descriptors(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> tuple[list[str], np.ndarray]:
    """Read one descriptor file or a list of shards (concatenated in order); returns (ids, vectors)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    all_ids: list[str] = []
    parts: list[np.ndarray] = []
    for p in paths:
        p = Path(p)
        ids, vec = _read_one(p)
        if parts and vec.shape[1] != parts[0].shape[1]:
            raise ValueError(f"{p}: dimension {vec.shape[1]} differs from earlier shards ({parts[0].shape[1]})")
        all_ids.extend(ids)
        parts.append(vec.astype(np.float32, copy=False))
    if not parts:
        raise ValueError("no descriptor files given")
    return all_ids, np.concatenate(parts, axis=0)


def write_submission(path: str | os.PathLike, query_ids, query, reference_ids, reference) -> Path:
    """Descriptor-track submission HDF5: ``query``, ``reference``, ``query_ids``, ``reference_ids`` sorted by id."""
    path = Path(path)
    for name, v in (("query", query), ("reference", reference)):
        if v.shape[1] > 256:
            raise ValueError(f"{path}: {name} descriptors have d={v.shape[1]}; the descriptor track allows d <= 256")
    qo = np.argsort(np.asarray(query_ids))
    ro = np.argsort(np.asarray(reference_ids))
    qids = [query_ids[i] for i in qo]
    rids = [reference_ids[i] for i in ro]
    _check_storable(qids + rids, path)
    with atomic_path(path, ".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("query", data=np.asarray(query, np.float32)[qo])
            f.create_dataset("reference", data=np.asarray(reference, np.float32)[ro])
            f.create_dataset("query_ids", data=np.array(qids, dtype="S"))
            f.create_dataset("reference_ids", data=np.array(rids, dtype="S"))
    return path

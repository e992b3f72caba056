"""A persistent reference store: descriptors of known images, added and removed one batch at a time,
searched with the same ``Matcher`` as ``rdcd match``.

The store records at creation how its descriptors are made (the model record: model, file hash,
dimension, input size, precision, JPEG decoding) and the match settings (``MatchConfig``: index,
k, score normalisation, whitening, threshold), plus the background descriptors those settings are
fitted on, so every process that opens it searches exactly as ``rdcd match`` would. Images and
descriptor files from another model are refused.

Two backends keep the references (see docs/store.md):

* a folder (default): SQLite (ids, descriptors, metadata; WAL, one transaction per add or remove)
  and a FAISS index rebuilt from it on open and updated in place after each commit;
* ``milvus:URI``: a Milvus collection (``rdcd.store_milvus``), e.g. ``milvus:refs.db`` for a local
  milvus-lite file or ``milvus:http://host:19530`` for a Milvus server.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from rdcd.match import MatchConfig, Matcher, copies, load_set, resolve_beta, resolve_threshold
from rdcd.metrics import Predictions
from rdcd.search import _new_index, _train, as_matrix, set_search_params

log = logging.getLogger(__name__)

STORE_FORMAT = 1
#: model record keys that must agree between the store and any model or descriptor file given to it
RECORD_KEYS = ("rdcd.model", "rdcd.input_size", "rdcd.decode", "rdcd.dim", "rdcd.model_sha256")


class StoreError(ValueError):
    """Bad use of a store: unknown path, another model, duplicate id, wrong dimension."""


class DuplicateIdError(StoreError):
    pass


def model_record(model, precision: str = "auto", draft: bool = True):
    """(record, runtime): how this model makes descriptors, in ``rdcd.descriptors.descriptor_info``
    terms plus its dimension, precision and the sha256 of the file that runs, and the model's
    ``rdcd.models.runtime.ModelRuntime`` (loaded model and card)."""
    from rdcd.extract import descriptor_info_of
    from rdcd.models.runtime import resolve_runtime
    from rdcd.models.shipped import file_sha256

    resolved = resolve_runtime(model, precision)
    loaded, how, file = resolved.model, resolved.how, resolved.file
    record = descriptor_info_of(loaded, loaded.input_size, draft)
    record.update({
        "rdcd.dim": str(loaded.dim),
        "rdcd.model_spec": str(getattr(model, "name", model)),
        # what ran, not what was asked: "auto" may resolve differently elsewhere (fp32 on a GPU)
        "rdcd.precision": resolved.precision if resolved.precision in ("int8", "fp32") else precision,
        "rdcd.runtime": how,
        "rdcd.model_sha256": file_sha256(file) if file else "",
    })
    return record, resolved


def check_record(store_record: dict, other: dict, what: str, location) -> None:
    """Refuse ``other`` (a model's record or a descriptor file's attributes) where it differs from the store's."""
    for key in RECORD_KEYS:
        if key in other and other[key] != store_record.get(key):
            raise StoreError(
                f"{what} differs from the store {location} in {key}: {other[key]!r}, the store's is "
                f"{store_record.get(key)!r} (model {store_record.get('rdcd.model_spec')}); scores across models "
                "are meaningless: use the store's model or make a new store")


class ReferenceStore:
    """References (ids, descriptors, metadata) on disk, searched like ``rdcd match``.

    >>> store = ReferenceStore.create("refs.store", "rdcd-default", threshold="auto")
    >>> store.add_images("references/")
    >>> store.query_images("queries/")            # Predictions, k per query
    """

    def __init__(self, backend, record: dict, config: MatchConfig, location):
        self.backend, self.record, self.config, self.location = backend, record, config, str(location)
        self.matcher = Matcher(config).fit_background(backend.background())
        self.matcher.index_ = backend
        self._model = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, location, model, background=None, k: int = 10, index: str = "Flat", score_norm: bool = False,
               whiten_dim: int | None = None, beta: float | None = None, ranks=(0, 2), nprobe: int | None = None,
               ef_search: int | None = None, threshold: float | str | None = None, precision: str = "auto",
               draft: bool = True, batch_size: int = 32) -> "ReferenceStore":
        """A new, empty store at ``location`` (a folder, or ``milvus:URI``) for descriptors of ``model``.
        ``background`` (images or descriptor files, as ``rdcd match``) is embedded and kept when
        ``score_norm`` or ``whiten_dim`` needs it; ``threshold``: a score or ``"auto"`` (the shipped
        model's calibrated one)."""
        backend_class, target = _backend_for(location)
        if backend_class.exists(target):
            raise StoreError(f"{location}: a store already exists there; open it, or remove it first")
        record, resolved = model_record(model, precision, draft)
        loaded = resolved.model
        beta, beta_source = resolve_beta(beta, resolved.card)
        config = MatchConfig(k=k, index=index, nprobe=nprobe, ef_search=ef_search, score_norm=score_norm, beta=beta,
                             beta_source=beta_source, ranks=tuple(ranks), whiten_dim=whiten_dim, draft=draft)
        config.model, config.runtime = record["rdcd.model_spec"], record["rdcd.runtime"]
        if threshold is not None:
            config.threshold, config.threshold_source = resolve_threshold(
                threshold, resolved.card, score_norm, whiten_dim, beta, tuple(ranks), resolved.int8,
                model_name=record["rdcd.model_spec"])
        vectors = None
        if score_norm or whiten_dim:
            if background is None:
                raise StoreError("score normalisation and whitening need a background set (--background)")
            _, vectors = load_set(background, model=loaded, name="background", batch_size=batch_size, draft=draft)
            Matcher(config).fit_background(vectors)  # fail here, before anything is written
        dim = int(record["rdcd.dim"])
        searched = whiten_dim or dim
        meta = {"format": STORE_FORMAT, "record": record, "config": asdict(config), "created": time.time()}
        backend = backend_class.create(target, dim=dim, searched_dim=searched, meta=meta, background=vectors)
        store = cls(backend, record, config, location)
        store._model = loaded
        return store

    @classmethod
    def open(cls, location, model=None) -> "ReferenceStore":
        """Open an existing store; ``model`` (optional) must be the one it was made with."""
        backend_class, target = _backend_for(location)
        if not backend_class.exists(target):
            raise FileNotFoundError(f"{location}: no reference store there (make one with `rdcd index create`)")
        backend = backend_class.open(target)
        meta = backend.meta
        if meta.get("format") != STORE_FORMAT:
            raise StoreError(f"{location}: store format {meta.get('format')!r}; this rdcd reads {STORE_FORMAT}")
        config = MatchConfig(**{**meta["config"], "ranks": tuple(meta["config"]["ranks"])})
        store = cls(backend, meta["record"], config, location)
        if model is not None:
            record, resolved = model_record(model, meta["record"]["rdcd.precision"], config.draft)
            check_record(store.record, record, f"model {model}", location)
            store._model = resolved.model
        return store

    # ------------------------------------------------------------------------------ properties
    @property
    def model(self):
        """The descriptor model, loaded on first use (descriptor-only use never loads it)."""
        with self._lock:
            if self._model is None:
                record, resolved = model_record(self.record["rdcd.model_spec"], self.record["rdcd.precision"],
                                                self.config.draft)
                self._model = resolved.model
                check_record(self.record, record, f"model {self.record['rdcd.model_spec']} as installed now",
                             self.location)
            return self._model

    @property
    def dim(self) -> int:
        return int(self.record["rdcd.dim"])

    @property
    def threshold(self) -> float | None:
        return self.config.threshold

    def __len__(self) -> int:
        return len(self.backend)

    def __contains__(self, reference_id: str) -> bool:
        with self._lock:
            return bool(self.backend.existing([str(reference_id)]))

    def get(self, reference_id: str) -> dict | None:
        """The metadata of one reference (source, added, label), or None."""
        with self._lock:
            return self.backend.metadata(str(reference_id))

    def info(self) -> dict:
        return {"location": self.location, "references": len(self), "backend": self.backend.kind,
                "model": self.record, "config": asdict(self.config)}

    # ------------------------------------------------------------------------------ add / remove
    def add(self, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[dict] | None = None,
            upsert: bool = False, info: dict | None = None) -> int:
        """Add descriptors under ``ids`` in one atomic step; an id already present is a DuplicateIdError
        (nothing is added) unless ``upsert``. ``info``: the ``rdcd.*`` attributes of the descriptors'
        file, checked against the model record. Returns the number added."""
        ids = [str(i) for i in ids]
        vectors = as_matrix(vectors, what="descriptors")
        if vectors.shape[1] != self.dim:
            raise StoreError(f"descriptors of dimension {vectors.shape[1]}; the store {self.location} holds "
                             f"{self.dim}-d descriptors of {self.record['rdcd.model_spec']}")
        check_record(self.record, info or {}, "the descriptors' model", self.location)
        if len(ids) != len(vectors):
            raise StoreError(f"{len(ids)} ids for {len(vectors)} descriptors")
        if len(set(ids)) != len(ids):
            raise DuplicateIdError(f"the same id is given twice in one add: {_first_repeat(ids)!r}")
        if any(not i or len(i) > 512 for i in ids):
            raise StoreError("reference ids must be 1 to 512 characters long")
        now = time.time()
        metadata = [dict({"added": now}, **(m or {})) for m in (metadata or [{}] * len(ids))]
        with self._lock:
            if not upsert:
                present = self.backend.existing(ids)
                if present:
                    raise DuplicateIdError(f"{len(present)} id(s) already in the store {self.location}, e.g. "
                                           f"{present[0]!r}; remove them first or add with upsert")
            self.backend.add(ids, self.matcher.transform(vectors), metadata, upsert)
        return len(ids)

    def add_images(self, images, label: str | None = None, upsert: bool = False, batch_size: int = 32) -> int:
        """Embed images (a folder, file list or paths; ids are file stems) with the store's model and add them."""
        from rdcd.extract import extract
        from rdcd.images import list_images

        paths = {p.stem: p for p in list_images(images)}
        result = extract(self.model, images, batch_size=batch_size, draft=self.config.draft, progress=False)
        for path, reason in result.failures:
            log.warning("%s: not added (%s)", path, reason)
        metadata = [{"source": str(paths.get(i, "")), **({"label": label} if label else {})} for i in result.ids]
        return self.add(result.ids, result.vectors, metadata, upsert=upsert)

    def remove(self, ids: Sequence[str]) -> list[str]:
        """Remove these ids in one atomic step; returns the ones that were there."""
        with self._lock:
            return self.backend.remove([str(i) for i in ids])

    # ------------------------------------------------------------------------------ search
    def query(self, query_ids: Sequence[str], vectors: np.ndarray, k: int | None = None,
              info: dict | None = None) -> Predictions:
        """Each query's k best references (the store's k by default), scored as ``rdcd match`` scores them."""
        check_record(self.record, info or {}, "the query descriptors' model", self.location)
        vectors = as_matrix(vectors, what="query descriptors")
        if vectors.shape[1] != self.dim:
            raise StoreError(f"query descriptors of dimension {vectors.shape[1]}; the store {self.location} "
                             f"holds {self.dim}-d descriptors of {self.record['rdcd.model_spec']}")
        matcher = self.matcher
        if k is not None and k != self.config.k:
            matcher = Matcher(MatchConfig(**{**asdict(self.config), "k": int(k)}))
            matcher.whitening_, matcher.normalizer_, matcher.index_ = (self.matcher.whitening_,
                                                                        self.matcher.normalizer_, self.backend)
        with self._lock:
            return matcher.search(list(query_ids), vectors)

    def query_images(self, images, k: int | None = None, batch_size: int = 32) -> Predictions:
        from rdcd.extract import extract

        result = extract(self.model, images, batch_size=batch_size, draft=self.config.draft, progress=False)
        return self.query(result.ids, result.vectors, k)

    def copies(self, predictions: Predictions, threshold: float | None = None) -> Predictions:
        threshold = self.threshold if threshold is None else threshold
        if threshold is None:
            raise StoreError(f"the store {self.location} has no threshold; give one")
        return copies(predictions, threshold)

    def close(self) -> None:
        self.backend.close()


def _first_repeat(ids: Sequence[str]) -> str:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return ""


def _backend_for(location):
    location = str(location)
    if location.startswith("milvus:"):
        try:
            from rdcd.store_milvus import MilvusBackend
            import pymilvus  # noqa: F401
        except ImportError:
            raise StoreError(f"{location}: the Milvus backend needs pymilvus: pip install 'rdcd[milvus]'") from None

        return MilvusBackend, location[len("milvus:"):]
    return SQLiteBackend, Path(location)


# ---------------------------------------------------------------------------------------- SQLite + FAISS


class SQLiteBackend:
    """A folder: ``store.sqlite`` (WAL) holds everything; the FAISS index lives in memory, rebuilt on open.

    Each add or remove is one SQLite transaction, committed before the in-memory index changes, so
    a killed process leaves the file before or after it; the FAISS labels are SQLite row ids."""

    kind = "sqlite+faiss"
    FILE = "store.sqlite"

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.db = sqlite3.connect(self.folder / self.FILE, isolation_level=None, check_same_thread=False)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # an acknowledged add is on disk, even after a power cut
            self.db.execute("PRAGMA busy_timeout=10000")
        except sqlite3.DatabaseError as e:  # not an SQLite file: a damaged or foreign store
            self.db.close()
            raise StoreError(f"{self.folder}: not an rdcd reference store ({e})") from None
        self.meta = {}

    @classmethod
    def exists(cls, folder: Path) -> bool:
        return (Path(folder) / cls.FILE).is_file()

    @classmethod
    def create(cls, folder: Path, dim: int, searched_dim: int, meta: dict, background) -> "SQLiteBackend":
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()):
            raise StoreError(f"{folder}: folder exists and is not empty; a new store needs a new folder")
        folder.mkdir(parents=True, exist_ok=True)
        self = cls(folder)
        with self._transaction():
            self.db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.db.execute("CREATE TABLE background (row INTEGER PRIMARY KEY, vector BLOB NOT NULL)")
            self.db.execute("CREATE TABLE refs (row INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
                            "vector BLOB NOT NULL, metadata TEXT NOT NULL)")
            self.db.execute("INSERT INTO meta VALUES ('store', ?)", (json.dumps(meta),))
            if background is not None:
                self.db.executemany("INSERT INTO background (vector) VALUES (?)",
                                    [(v.tobytes(),) for v in as_matrix(background)])
        return self._load(meta)

    @classmethod
    def open(cls, folder: Path) -> "SQLiteBackend":
        self = cls(folder)
        try:
            (value,) = self.db.execute("SELECT value FROM meta WHERE key = 'store'").fetchone()
        except (sqlite3.DatabaseError, TypeError) as e:
            self.db.close()
            raise StoreError(f"{folder}: not an rdcd reference store ({e})") from None
        return self._load(json.loads(value))

    def _load(self, meta: dict) -> "SQLiteBackend":
        self.meta = meta
        config = meta["config"]
        self.dim = config["whiten_dim"] or int(meta["record"]["rdcd.dim"])
        self.factory, self.search_params = config["index"], (config["nprobe"], config["ef_search"])
        self._rebuild()
        return self

    def _rebuild(self) -> None:
        rows = self.db.execute("SELECT row, id, vector FROM refs ORDER BY row").fetchall()
        self.index = faiss.IndexIDMap2(_new_index(self.dim, self.factory))
        set_search_params(self.index.index, self.factory, *self.search_params)
        self.id_of = {row: i for row, i, _ in rows}
        if rows:
            vectors = np.frombuffer(b"".join(r[2] for r in rows), np.float32).reshape(len(rows), self.dim)
            _train(self.index.index, self.factory, vectors)
            self.index.add_with_ids(vectors, np.array([r[0] for r in rows], np.int64))

    def _transaction(self):
        return _Transaction(self.db)

    def background(self) -> np.ndarray | None:
        rows = self.db.execute("SELECT vector FROM background ORDER BY row").fetchall()
        if not rows:
            return None
        return np.frombuffer(b"".join(r[0] for r in rows), np.float32).reshape(len(rows), -1)

    def __len__(self) -> int:
        return self.index.ntotal

    def existing(self, ids: Sequence[str]) -> list[str]:
        found = []
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            found += [r[0] for r in self.db.execute(
                f"SELECT id FROM refs WHERE id IN ({','.join('?' * len(part))})", part)]
        return found

    def metadata(self, reference_id: str) -> dict | None:
        row = self.db.execute("SELECT metadata FROM refs WHERE id = ?", (reference_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def add(self, ids, vectors: np.ndarray, metadata, upsert: bool) -> None:
        if not self.index.is_trained:
            _train(self.index.index, self.factory, vectors)  # before the commit: a failure adds nothing
        with self._transaction():
            replaced = self._delete(ids) if upsert else []
            rows = [self.db.execute("INSERT INTO refs (id, vector, metadata) VALUES (?, ?, ?)",
                                    (i, v.tobytes(), json.dumps(m))).lastrowid
                    for i, v, m in zip(ids, vectors, metadata)]
        if self._forget(replaced):  # rebuilt from the committed rows, the new ones included
            return
        self.index.add_with_ids(vectors, np.array(rows, np.int64))
        self.id_of.update(zip(rows, ids))

    def remove(self, ids: Sequence[str]) -> list[str]:
        with self._transaction():
            removed = self._delete(ids)
        self._forget(removed)
        return [i for _, i in removed]

    def _delete(self, ids) -> list[tuple[int, str]]:
        rows = []
        for start in range(0, len(ids), 500):
            part = list(ids[start:start + 500])
            rows += self.db.execute(f"DELETE FROM refs WHERE id IN ({','.join('?' * len(part))}) RETURNING row, id",
                                    part).fetchall()
        return rows

    def _forget(self, rows: list[tuple[int, str]]) -> bool:
        """Take deleted rows out of the index; True when that meant rebuilding it from the committed rows."""
        if not rows:
            return False
        if self.factory.replace(" ", "") != "Flat":
            # Only the exact index removes entries safely under an id map: graphs (HNSW) cannot remove
            # at all, and an IVF removal leaves FAISS's id map out of step (the next removal aborts the
            # process). Rebuild from the committed rows instead: slower removals, never a wrong index.
            self._rebuild()
            return True
        self.index.remove_ids(np.array([r for r, _ in rows], np.int64))
        for r, _ in rows:
            self.id_of.pop(r, None)
        return False

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``rdcd.search.Index.search``'s contract: scores (n, k) descending and string ids, "" / -inf where none."""
        scores, labels = self.index.search(as_matrix(vectors, self.dim, "query vectors"), int(k))
        ids = np.array([[self.id_of.get(int(label), "") for label in row] for row in labels], dtype=object)
        scores[ids == ""] = -np.inf
        return scores, ids.astype(str)

    def vectors(self) -> tuple[list[str], np.ndarray]:
        """Every reference's id and searched vector, in insertion order."""
        rows = self.db.execute("SELECT id, vector FROM refs ORDER BY row").fetchall()
        vectors = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), self.dim)
        return [r[0] for r in rows], vectors

    def close(self) -> None:
        self.db.close()


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, traceback):
        self.db.execute("ROLLBACK" if kind else "COMMIT")
        return False

"""The Milvus backend of ``rdcd.store.ReferenceStore``: the same store on a Milvus server, or in a
local milvus-lite file (``milvus:refs.db``), through ``pymilvus.MilvusClient``.

Three collections per store, named after ``?collection=NAME`` in the URI (default ``rdcd``):
``NAME`` (id, searched vector, metadata JSON), ``NAME_meta`` (the store's model record and match
settings as one JSON row) and ``NAME_background`` (background descriptors, when the settings need
them). Milvus requires a vector field in every collection, so the meta row carries a 2-d dummy.
Reads use Strong consistency, so a search sees every add acknowledged before it.
"""
from __future__ import annotations

import json
import re
import threading
from typing import Sequence

import numpy as np

from rdcd.search import as_matrix


def _parse(target: str) -> tuple[str, str]:
    uri, _, query = target.partition("?")
    match = re.fullmatch(r"collection=([A-Za-z_][A-Za-z0-9_]*)", query) if query else None
    if query and not match:
        raise ValueError(f"milvus:{target}: the only option is ?collection=NAME (letters, digits, _)")
    return uri, match.group(1) if match else "rdcd"


def _index_params(factory: str) -> tuple[str, dict]:
    """A FAISS factory string as the Milvus index that does the same: Flat, IVFn,Flat, HNSWm."""
    ivf = re.fullmatch(r"IVF(\d+),Flat", factory)
    hnsw = re.fullmatch(r"HNSW(\d+)", factory)
    if factory == "Flat":
        return "FLAT", {}
    if ivf:
        return "IVF_FLAT", {"nlist": int(ivf.group(1))}
    if hnsw:
        return "HNSW", {"M": int(hnsw.group(1)), "efConstruction": 200}
    raise ValueError(f"the Milvus backend maps Flat, IVFn,Flat and HNSWm to Milvus indexes; not {factory!r}")


class MilvusBackend:
    kind = "milvus"

    def __init__(self, target: str):
        from pymilvus import MilvusClient

        self.uri, self.name = _parse(target)
        self.client = MilvusClient(self.uri)
        self.meta: dict = {}
        self._lock = threading.Lock()  # one client, used from the service's threads

    @classmethod
    def exists(cls, target: str) -> bool:
        uri, name = _parse(target)
        if not uri.startswith(("http://", "https://", "tcp://")):
            from pathlib import Path

            if not Path(uri).exists():
                return False
        probe = cls(target)
        try:
            return probe.client.has_collection(f"{name}_meta")
        finally:
            probe.close()  # milvus-lite runs a local server per client: do not leave one behind

    @classmethod
    def create(cls, target: str, dim: int, searched_dim: int, meta: dict, background) -> "MilvusBackend":
        from pymilvus import DataType, MilvusClient

        self = cls(target)
        kind, params = _index_params(meta["config"]["index"])
        schemas = {
            self.name: (("id", DataType.VARCHAR, 512), ("vector", searched_dim), ("metadata", DataType.JSON)),
            f"{self.name}_meta": (("id", DataType.VARCHAR, 64), ("vector", 2), ("value", DataType.VARCHAR, 65535)),
            f"{self.name}_background": (("id", DataType.INT64), ("vector", dim)),
        }
        for name, fields in schemas.items():
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            for i, field in enumerate(fields):
                if field[0] == "vector":
                    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=field[1])
                else:
                    schema.add_field(field[0], field[1], is_primary=i == 0,
                                     **({"max_length": field[2]} if len(field) > 2 else {}))
            index = self.client.prepare_index_params()
            index.add_index(field_name="vector", metric_type="IP",
                            **({"index_type": kind, "params": params} if name == self.name else {"index_type": "FLAT"}))
            self.client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")
        if background is not None:
            rows = [{"id": i, "vector": v.tolist()} for i, v in enumerate(as_matrix(background))]
            for start in range(0, len(rows), 1000):
                self.client.insert(f"{self.name}_background", rows[start:start + 1000])
        # written last: a store whose creation was cut short has no meta row and is not opened
        self.client.insert(f"{self.name}_meta", [{"id": "store", "vector": [0.0, 0.0], "value": json.dumps(meta)}])
        return self._load(meta)

    @classmethod
    def open(cls, target: str) -> "MilvusBackend":
        self = cls(target)
        rows = self.client.get(f"{self.name}_meta", ids=["store"], output_fields=["value"])
        if not rows:
            raise ValueError(f"milvus:{target}: collection {self.name}_meta holds no rdcd store record")
        return self._load(json.loads(rows[0]["value"]))

    def _load(self, meta: dict) -> "MilvusBackend":
        self.meta = meta
        config = meta["config"]
        self.dim = config["whiten_dim"] or int(meta["record"]["rdcd.dim"])
        self.search_params = {"metric_type": "IP", "params": {
            k: v for k, v in (("nprobe", config["nprobe"]), ("ef", config["ef_search"])) if v is not None}}
        return self

    def background(self) -> np.ndarray | None:
        rows = self.client.query(f"{self.name}_background", filter="id >= 0", output_fields=["id", "vector"])
        if not rows:
            return None
        rows = sorted(rows, key=lambda r: r["id"])
        return np.asarray([r["vector"] for r in rows], np.float32)

    def __len__(self) -> int:
        with self._lock:
            rows = self.client.query(self.name, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def existing(self, ids: Sequence[str]) -> list[str]:
        with self._lock:
            return [r["id"] for r in self.client.get(self.name, ids=list(ids), output_fields=["id"])]

    def metadata(self, reference_id: str) -> dict | None:
        with self._lock:
            rows = self.client.get(self.name, ids=[reference_id], output_fields=["metadata"])
        return rows[0]["metadata"] if rows else None

    def add(self, ids, vectors: np.ndarray, metadata, upsert: bool) -> None:
        rows = [{"id": i, "vector": v.tolist(), "metadata": m} for i, v, m in zip(ids, vectors, metadata)]
        with self._lock:
            # one request per add: Milvus applies a batch as a whole
            (self.client.upsert if upsert else self.client.insert)(self.name, rows)

    def remove(self, ids: Sequence[str]) -> list[str]:
        with self._lock:
            present = [r["id"] for r in self.client.get(self.name, ids=list(ids), output_fields=["id"])]
            if present:
                self.client.delete(self.name, ids=present)
        return present

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``rdcd.search.Index.search``'s contract: scores (n, k) descending and string ids, "" / -inf where none."""
        vectors = as_matrix(vectors, self.dim, "query vectors")
        with self._lock:
            hits = self.client.search(self.name, data=vectors.tolist(), limit=int(k), output_fields=["id"],
                                      search_params=self.search_params)
        scores = np.full((len(vectors), int(k)), -np.inf, np.float32)
        ids = np.full((len(vectors), int(k)), "", dtype=object)
        for row, found in enumerate(hits):
            for col, hit in enumerate(found):
                scores[row, col], ids[row, col] = hit["distance"], hit["id"]
        return scores, ids.astype(str)

    def vectors(self) -> tuple[list[str], np.ndarray]:
        with self._lock:
            rows = self.client.query(self.name, filter='id != ""', output_fields=["id", "vector"])
        return [r["id"] for r in rows], np.asarray([r["vector"] for r in rows], np.float32).reshape(-1, self.dim)

    def close(self) -> None:
        self.client.close()

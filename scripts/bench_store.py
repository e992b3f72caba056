"""Lookup speed and memory of the reference store's index at scale: N synthetic 128-d unit vectors.

Exact (FAISS Flat, what a store uses by default) and approximate (IVF, the nprobe sweep stops at the
first setting with recall@10 >= 0.95 against Flat): single-query latency p50/p99, batched lookups/s,
resident memory of the index; and the SQLite store's add throughput (rdcd.store.ReferenceStore, one
transaction per add). The vectors are clustered (a mixture of 20k centres with noise) rather than
uniform on the sphere (where nearest neighbours carry no meaning), closer to real descriptors. Usage:

    python scripts/bench_store.py [--n 1000000] [--queries 1000]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import faiss
import numpy as np

from rdcd.search import Index, set_threads


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def data(n: int, n_queries: int, dim: int = 128, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((20_000, dim), dtype=np.float32))
    vectors = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        part = min(100_000, n - start)
        vectors[start:start + part] = unit(centres[rng.integers(0, len(centres), part)]
                                           + 0.5 * rng.standard_normal((part, dim), dtype=np.float32) / np.sqrt(dim))
    queries = unit(vectors[rng.integers(0, n, n_queries)]
                   + 0.2 * rng.standard_normal((n_queries, dim), dtype=np.float32) / np.sqrt(dim))
    return vectors, queries.astype(np.float32)


def timings(index: Index, queries: np.ndarray, singles: int = 200) -> dict:
    single = []
    for q in queries[:singles]:
        start = time.perf_counter()
        index.search(q[None], 10)
        single.append(time.perf_counter() - start)
    start = time.perf_counter()
    _, ids = index.search(queries, 10)
    batched = time.perf_counter() - start
    return {"p50_ms": round(1000 * float(np.percentile(single, 50)), 2),
            "p99_ms": round(1000 * float(np.percentile(single, 99)), 2),
            "lookups_per_s_single": round(len(single) / sum(single), 1),
            "lookups_per_s_batched": round(len(queries) / batched, 1)}, ids


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)]))


def store_adds(vectors: np.ndarray, batch: int, n: int) -> float:
    from rdcd.models.hashes import PHashModel
    from rdcd.store import ReferenceStore

    class Vectors128(PHashModel):  # a model record for 128-d vectors; nothing is embedded
        name, dim = "synthetic-128", 128

    with tempfile.TemporaryDirectory() as folder:
        store = ReferenceStore.create(f"{folder}/s", Vectors128())
        start = time.perf_counter()
        for i in range(0, n, batch):
            store.add([f"r{j}" for j in range(i, i + batch)], vectors[i:i + batch])
        seconds = time.perf_counter() - start
        store.close()
    return round(n / seconds, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--ivf", default="IVF4096,Flat")
    args = parser.parse_args()
    threads = set_threads()
    vectors, queries = data(args.n, args.queries)
    ids = [str(i) for i in range(args.n)]
    report = {"n": args.n, "dim": 128, "threads": threads, "vectors_mb": round(vectors.nbytes / 2**20, 1)}

    before = rss_mb()
    start = time.perf_counter()
    flat = Index.build(ids, vectors, "Flat")
    report["flat"] = {"build_s": round(time.perf_counter() - start, 1), "index_rss_mb": round(rss_mb() - before, 1)}
    stats, exact = timings(flat, queries)
    report["flat"].update(stats)
    del flat

    before = rss_mb()
    start = time.perf_counter()
    ivf = Index(128, args.ivf)
    ivf.train(vectors[np.random.default_rng(1).choice(args.n, min(args.n, 200_000), replace=False)])
    ivf.add(ids, vectors)
    report["ivf"] = {"index": args.ivf, "build_s": round(time.perf_counter() - start, 1),
                     "index_rss_mb": round(rss_mb() - before, 1), "sweep": {}}
    for nprobe in (8, 16, 32, 64, 128, 256):
        ivf.nprobe = nprobe
        stats, found = timings(ivf, queries)
        stats["recall_at_10"] = round(recall_at_10(found, exact), 4)
        report["ivf"]["sweep"][nprobe] = stats
        if stats["recall_at_10"] >= 0.95:
            report["ivf"]["nprobe"] = nprobe
            break
    del ivf
    report["store_adds_per_s"] = {"batch_1": store_adds(vectors, 1, 2000), "batch_100": store_adds(vectors, 100, 20000)}
    report["faiss"] = faiss.__version__
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Exact vs approximate FAISS search on a synthetic DISC-sized reference set.

1M clustered 64-d unit vectors (a seeded Gaussian mixture, so IVF has structure to use) and 10k
queries that are noisy copies of random references. Reports build time, queries per second and
recall@10 against exact search for IVF and HNSW settings, as a markdown table.

    python scripts/bench_search.py --threads 2 > docs/bench_search.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass

import faiss
import numpy as np

from rdcd.machine import cpu_model
from rdcd.search import Index, set_threads


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_set(n_refs: int, n_queries: int, dim: int, clusters: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32) / np.sqrt(dim)
    refs = np.empty((n_refs, dim), np.float32)
    for start in range(0, n_refs, 100_000):  # chunks keep the float64-free peak memory low
        stop = min(start + 100_000, n_refs)
        members = rng.integers(clusters, size=stop - start)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * (spread / np.sqrt(dim))
        refs[start:stop] = unit(centres[members] + noise)
    sources = rng.choice(n_refs, size=n_queries, replace=False)
    queries = unit(refs[sources] + rng.standard_normal((n_queries, dim), dtype=np.float32) * (0.35 / np.sqrt(dim)))
    return refs, queries.astype(np.float32), sources


@dataclass
class Row:
    index: str
    params: str
    build_s: float
    search_s: float  # wall clock
    search_cpu_s: float  # CPU time of all threads: robust to other processes competing for the cores
    recall: float
    source_at_1: float


def timed(fn):
    """(result, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-refs", type=int, default=1_000_000)
    parser.add_argument("--n-queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=4096, help="Gaussian mixture components")
    parser.add_argument("--spread", type=float, default=1.0,
                        help="norm of a reference's offset from its component centre (centres have norm ~1)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ivf", default="IVF4096,Flat")
    parser.add_argument("--train-size", type=int, default=262_144, help="IVF training sample (64 per list)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--hnsw", default="HNSW32")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128, 256])
    args = parser.parse_args()

    threads = set_threads(args.threads)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    log(f"generating {args.n_refs} references and {args.n_queries} queries ({args.dim}-d)")
    refs, queries, sources = synthetic_set(args.n_refs, args.n_queries, args.dim, args.clusters, args.spread, args.seed)
    ids = [str(i) for i in range(args.n_refs)]
    k = args.k

    rows: list[Row] = []

    def measure(name: str, params: str, index: Index, build_s: float, exact_ids=None):
        (_, found), search_s, search_cpu_s = timed(lambda: index.search(queries, k))
        found = found.astype(np.int64)
        recall = 1.0
        if exact_ids is not None:
            recall = float(np.mean([len(set(a) & set(e)) / k for a, e in zip(found, exact_ids)]))
        rows.append(Row(name, params, build_s, search_s, search_cpu_s, recall, float(np.mean(found[:, 0] == sources))))
        log(f"{name} {params}: build {build_s:.1f}s, search {search_s:.2f}s (CPU {search_cpu_s:.2f}s), "
            f"recall@{k} {recall:.4f}")
        return found

    exact, build_s, _ = timed(lambda: Index.build(ids, refs, "Flat"))
    exact_ids = measure("Flat (exact)", "-", exact, build_s)
    del exact

    def build_ivf() -> Index:
        index = Index(args.dim, args.ivf)
        index.train(refs[np.random.default_rng(args.seed).choice(len(refs), args.train_size, replace=False)])
        index.add(ids, refs)
        return index

    ivf, build_s, _ = timed(build_ivf)
    for nprobe in args.nprobe:
        ivf.nprobe = nprobe
        measure(args.ivf, f"nprobe={nprobe}", ivf, build_s, exact_ids)
    del ivf

    hnsw, build_s, _ = timed(lambda: Index.build(ids, refs, args.hnsw))
    for ef in args.ef_search:
        hnsw.ef_search = ef
        measure(args.hnsw, f"efSearch={ef}", hnsw, build_s, exact_ids)

    exact_row = rows[0]
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print("# Search benchmark: exact vs approximate FAISS indexes\n")
    print(f"- command: `{command}`")
    print(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"- machine: {cpu_model()}, {os.cpu_count()} cores visible, {threads} FAISS threads; "
          f"faiss {faiss.__version__}, numpy {np.__version__}, Python {platform.python_version()}; "
          f"load average at the end {os.getloadavg()[0]:.1f}; timings include contention from other processes")
    print(f"- data: {args.n_refs:,} references, {args.n_queries:,} queries, {args.dim}-d unit vectors; references "
          f"from a {args.clusters}-component Gaussian mixture (spread {args.spread}), queries = noisy copies of "
          f"random references (seed {args.seed}); inner-product search, k = {k}")
    print(f"- build = train (IVF: on {args.train_size:,} sampled references) + add; recall@{k} = share of exact "
          f"search's {k} neighbours found; source@1 = share of queries whose first neighbour is the reference they "
          "were copied from")
    print("- speed-up = exact search time / this search time, on wall clock and on CPU time (all threads); "
          "CPU time is the fairer measure when other processes share the cores\n")
    print(f"| index | search params | build s | search s | queries/s | speed-up (wall) | speed-up (CPU) "
          f"| recall@{k} | source@1 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.index} | {r.params} | {r.build_s:.1f} | {r.search_s:.2f} | {args.n_queries / r.search_s:,.0f} | "
              f"{exact_row.search_s / r.search_s:.1f}x | {exact_row.search_cpu_s / r.search_cpu_s:.1f}x | "
              f"{r.recall:.4f} | {r.source_at_1:.4f} |")
    print()
    good = [r for r in rows[1:] if r.recall >= 0.95 and r.search_cpu_s * 10 <= exact_row.search_cpu_s]
    if good:
        best = min(good, key=lambda r: r.search_cpu_s)
        print(f"Fastest setting with recall@{k} >= 0.95: {best.index} {best.params}, "
              f"{exact_row.search_cpu_s / best.search_cpu_s:.1f}x exact's throughput in CPU time "
              f"({exact_row.search_s / best.search_s:.1f}x wall clock) at recall@{k} {best.recall:.4f}.")
    else:
        print(f"No setting reached both recall@{k} >= 0.95 and 10x exact's throughput (CPU time).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

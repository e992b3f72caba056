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

import faiss
import numpy as np

from rdcd.search import Index, set_threads


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-refs", type=int, default=1_000_000)
    parser.add_argument("--n-queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=4096, help="Gaussian mixture components")
    parser.add_argument("--spread", type=float, default=1.2,
                        help="norm of a reference's offset from its component centre (centres have norm ~1)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ivf", default="IVF4096,Flat")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--hnsw", default="HNSW32")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128])
    args = parser.parse_args()

    threads = set_threads(args.threads)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    log(f"generating {args.n_refs} references and {args.n_queries} queries ({args.dim}-d)")
    refs, queries, sources = synthetic_set(args.n_refs, args.n_queries, args.dim, args.clusters, args.spread, args.seed)
    ids = [str(i) for i in range(args.n_refs)]
    k = args.k

    rows = []

    def measure(name: str, params: str, index: Index, build_s: float, exact_ids=None):
        (_, found), search_s = timed(lambda: index.search(queries, k))
        found = found.astype(np.int64)
        recall = 1.0 if exact_ids is None else float(np.mean([len(set(a) & set(e)) / k for a, e in zip(found, exact_ids)]))
        source_at_1 = float(np.mean(found[:, 0] == sources))
        rows.append((name, params, build_s, search_s, args.n_queries / search_s, recall, source_at_1))
        log(f"{name} {params}: build {build_s:.1f}s, search {search_s:.2f}s, recall@{k} {recall:.4f}")
        return found

    exact, build_s = timed(lambda: Index.build(ids, refs, "Flat"))
    exact_ids = measure("Flat (exact)", "-", exact, build_s)
    del exact

    ivf, build_s = timed(lambda: Index.build(ids, refs, args.ivf))
    for nprobe in args.nprobe:
        ivf.nprobe = nprobe
        measure(args.ivf, f"nprobe={nprobe}", ivf, build_s, exact_ids)
    del ivf

    hnsw, build_s = timed(lambda: Index.build(ids, refs, args.hnsw))
    for ef in args.ef_search:
        hnsw.ef_search = ef
        measure(args.hnsw, f"efSearch={ef}", hnsw, build_s, exact_ids)

    exact_qps = rows[0][4]
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print("# Search benchmark: exact vs approximate FAISS indexes\n")
    print(f"- command: `{command}`")
    print(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"- machine: {cpu_model()}, {os.cpu_count()} cores visible, {threads} FAISS threads; "
          f"faiss {faiss.__version__}, numpy {np.__version__}, Python {platform.python_version()}")
    print(f"- data: {args.n_refs:,} references, {args.n_queries:,} queries, {args.dim}-d unit vectors; references "
          f"from a {args.clusters}-component Gaussian mixture (spread {args.spread}), queries = noisy copies of random references "
          f"(seed {args.seed}); inner-product search, k = {k}")
    print("- build = train + add; recall@10 = share of exact search's 10 neighbours found; source@1 = share of "
          "queries whose first neighbour is the reference they were copied from\n")
    print(f"| index | search params | build s | search s | queries/s | speed-up vs exact | recall@{k} | source@1 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, params, build_s, search_s, qps, recall, source_at_1 in rows:
        print(f"| {name} | {params} | {build_s:.1f} | {search_s:.2f} | {qps:,.0f} | {qps / exact_qps:.1f}x | "
              f"{recall:.4f} | {source_at_1:.4f} |")
    good = [r for r in rows[1:] if r[5] >= 0.95 and r[4] >= 10 * exact_qps]
    print()
    if good:
        best = max(good, key=lambda r: r[4])
        print(f"Fastest setting with recall@{k} >= 0.95: {best[0]} {best[1]}, {best[4] / exact_qps:.1f}x exact's "
              f"throughput at recall@{k} {best[5]:.4f}.")
    else:
        print(f"No setting reached both recall@{k} >= 0.95 and 10x exact's throughput.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

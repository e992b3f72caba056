"""Loopback load test of ``rdcd serve``: single-image match requests/s and latency, and add throughput.

Starts ``rdcd serve`` on 127.0.0.1 (a free port) over a store made here from --references with
--model (or an existing --store), sends --requests single-image POST /v1/match requests from
--clients threads (images from --queries, in turn), then --adds single-image POST /v1/references
requests, and prints requests/s, p50/p99 latency and the status counts as JSON. Bounded by the
request counts and --max-seconds. Usage:

    python scripts/bench_service.py --references ../shared/data/devbench/references \\
        --queries ../shared/data/devbench/queries [--model rdcd-default] [--clients 4] [--requests 300]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import requests

KEY = "bench-write-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, route: str, images: list[Path], n: int, clients: int, deadline: float, add: bool) -> dict:
    latencies, statuses, lock, counter = [], Counter(), threading.Lock(), iter(range(n))

    def client():
        session = requests.Session()
        for i in counter:
            if time.monotonic() > deadline:
                return
            path = images[i % len(images)]
            data = {"ids": f"bench-{i}"} if add else {}
            start = time.perf_counter()
            response = session.post(url + route, headers={"X-API-Key": KEY}, data=data,
                                    files=[("images", (path.name, path.read_bytes()))], timeout=120)
            with lock:
                latencies.append(time.perf_counter() - start)
                statuses[response.status_code] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    seconds = time.perf_counter() - start
    return {"requests": len(latencies), "clients": clients, "seconds": round(seconds, 2),
            "requests_per_s": round(len(latencies) / seconds, 1),
            "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1), "statuses": dict(statuses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--references", help="images for a new store (or give --store)")
    parser.add_argument("--store", help="an existing store (rdcd index create)")
    parser.add_argument("--queries", required=True, help="folder of query images")
    parser.add_argument("--model", default="rdcd-default")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--adds", type=int, default=200)
    parser.add_argument("--max-seconds", type=float, default=120)
    args = parser.parse_args()
    work = tempfile.TemporaryDirectory()
    store = args.store
    if store is None:
        store = f"{work.name}/refs.store"
        subprocess.run(["rdcd", "index", "create", "--index", store, "--model", args.model], check=True)
        subprocess.run(["rdcd", "index", "add", "--index", store, "--images", args.references], check=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(["rdcd", "serve", "--index", store, "--port", str(port)],
                              env=dict(os.environ, RDCD_API_KEYS=f"write:{KEY}"))
    try:
        for _ in range(600):
            try:
                if requests.get(url + "/v1/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        images = sorted(Path(args.queries).glob("*.jpg"))
        load(url, "/v1/match", images, 20, 2, time.monotonic() + 60, add=False)  # warm-up
        deadline = time.monotonic() + args.max_seconds
        report = {"model": args.model, "store_references": requests.get(url + "/v1/health").json()["references"],
                  "match": load(url, "/v1/match", images, args.requests, args.clients, deadline, add=False),
                  "match_1_client": load(url, "/v1/match", images, args.requests // 3, 1, deadline, add=False),
                  "add": load(url, "/v1/references", images, args.adds, args.clients, deadline, add=True)}
        metrics = requests.get(url + "/metrics", headers={"X-API-Key": KEY}).text
        report["embed_batches"] = [line for line in metrics.splitlines() if line.startswith("rdcd_embed")]
        print(json.dumps(report, indent=2))
    finally:
        server.terminate()
        server.wait(timeout=30)
        work.cleanup()
    sys.exit(0)


if __name__ == "__main__":
    main()

"""What machine a benchmark ran on: every number in BENCHMARKS.md states it."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or what ``platform`` knows elsewhere."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


#: instruction-set extensions that change int8 and fp32 inference speed the most
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")


def cpu_flags(flags: tuple[str, ...] = SPEED_FLAGS) -> str:
    """Which of ``flags`` the CPU has (from /proc/cpuinfo), e.g. "avx2 fma"; "unknown" elsewhere."""
    try:
        with open("/proc/cpuinfo") as fh:
            present = next((set(line.split(":", 1)[1].split()) for line in fh if line.startswith("flags")), None)
    except OSError:
        present = None
    if present is None:
        return "unknown"
    return " ".join(f for f in flags if f in present) or "none of " + ", ".join(flags)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def interleaved_rates(jobs: dict, items: int, rounds: int = 5, warmup: bool = True) -> dict:
    """Items per second of each job (a callable processing ``items`` items), measured in ``rounds``
    rounds that each run every job once, in turn, after one warm-up call each (``warmup``). A slow
    spell of a machine whose speed drifts then hits every job alike: compare the jobs by the median
    of their per-round ratios, or by their median rates. Returns {name: array of ``rounds`` rates}."""
    import time

    import numpy as np

    if warmup:
        for job in jobs.values():
            job()
    rates = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            rates[name].append(items / (time.perf_counter() - start))
    return {name: np.asarray(r) for name, r in rates.items()}

"""Fault injection for end-to-end tests: run a command, SIGKILL it at seeded random moments, run it
again until it completes, and report what happened. Any component with a resumable output (extract,
train, a reference store) can use it: compare ``kill_and_finish``'s output with an uninterrupted run."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence


def env() -> dict[str, str]:
    """A child environment: one thread each (the machine is shared), unbuffered, no torchrun leftovers."""
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out.pop("WORLD_SIZE", None)
    return out


def rdcd(*args) -> list[str]:
    return [sys.executable, "-m", "rdcd", *[str(a) for a in args]]


def run(command: Sequence[str], timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    """Run to completion (raising on a non-zero exit, with its stderr); returns the result and seconds."""
    start = time.perf_counter()
    done = subprocess.run(list(command), capture_output=True, text=True, env=env(), timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done, time.perf_counter() - start


def kill_after(command: Sequence[str], seconds: float, timeout: float = 600) -> bool:
    """Start ``command``, SIGKILL it after ``seconds``; False if it finished first (then it must have
    succeeded)."""
    proc = subprocess.Popen(list(command), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=timeout)
        proc.stderr.close()
        return True
    err = proc.stderr.read()
    proc.stderr.close()
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {proc.returncode} before the kill:\n{err[-3000:]}")
    return False


def kill_when(command: Sequence[str], condition: Callable[[], bool], timeout: float = 300) -> bool:
    """Start ``command``, SIGKILL it as soon as ``condition()`` holds (polled every 10 ms); False if it
    finished first (then it must have succeeded)."""
    proc = subprocess.Popen(list(command), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not condition():
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {proc.returncode} before the kill")
    return False


@dataclass
class KillReport:
    kills: int = 0  # SIGKILLs that hit a running process
    finished_early: int = 0  # planned kills the command outlived
    moments: list[float] = field(default_factory=list)  # seconds after start of each kill


def kill_and_finish(command: Sequence[str], seconds: float, seed: int, kills: int = 2,
                    rerun: Sequence[str] | None = None) -> KillReport:
    """Kill ``command`` ``kills`` times at moments drawn (with ``seed``) uniformly from 5 % to 85 % of
    ``seconds`` (the length of an uninterrupted run), each attempt restarting it (``rerun``: the command
    that continues a killed run, if another), then run it to completion."""
    rng = random.Random(seed)
    report = KillReport()
    current = list(command)
    for _ in range(kills):
        moment = rng.uniform(0.05, 0.85) * seconds
        if kill_after(current, moment):
            report.kills += 1
            report.moments.append(round(moment, 2))
        else:
            report.finished_early += 1
        current = list(rerun or command)
    run(current)
    return report

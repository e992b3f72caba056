"""What a run reports: timing of the step's parts, log.csv (and TensorBoard), messages on rank 0."""
from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import torch

from .. import distributed as du
from ..descriptors import atomic_path

TIME_KEYS = ("data", "teacher", "key", "student")
#: what validate() returns that the log keeps, as val_<key>
VAL_KEYS = ("uAP", "recall_at_p90", "acc_at_1", "recall_at_10", "n_gt", "seconds", "pos_cos", "hardest_neg_cos", "hn")
LOG_COLUMNS = (
    "step", "epoch", "lr", "loss", "con", "hn", "rel",
    "pos_cos", "neg_cos", "hardest_neg_cos", "eff_rank", "teacher_cos",
    "images_per_s", "t_data", "t_teacher", "t_key", "t_student", "t_step",
) + tuple(f"val_{k}" for k in VAL_KEYS)


def say(message: str) -> None:
    """Print on the main process only (every rank runs the same code)."""
    if du.is_main():
        print(message, flush=True)


class StopWatch:
    """Seconds since the previous ``lap`` (synchronising the GPU first, so each lap is its own work)."""

    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.last = time.perf_counter()

    def lap(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


class StepTimes:
    """Seconds per step part, summed since the last log row (``window``) and over the run (``totals``,
    the first step of an invocation, start-up, left out)."""

    def __init__(self):
        self.window = {k: 0.0 for k in TIME_KEYS + ("step",)}
        self.window_steps = 0
        self.totals = {k: 0.0 for k in TIME_KEYS + ("step",)}
        self.totals_steps = 0

    def add(self, times: dict, first: bool) -> None:
        for k, seconds in times.items():
            self.window[k] += seconds
        self.window_steps += 1
        if not first:
            for k, seconds in times.items():
                self.totals[k] += seconds
            self.totals_steps += 1

    def take_window(self, global_batch: int) -> dict:
        """The log row's speed columns for the steps since the previous call."""
        row = {"images_per_s": self.window_steps * global_batch / self.window["step"],
               **{f"t_{k}": self.window[k] / self.window_steps for k in self.window}}
        self.window = {k: 0.0 for k in self.window}
        self.window_steps = 0
        return row

    def summary(self, global_batch: int) -> dict:
        n = self.totals_steps
        return {"seconds_per_step": {k: self.totals[k] / n for k in self.totals} if n else {},
                "images_per_s": n * global_batch / self.totals["step"] if n else None}


class RunLog:
    """log.csv (one row per logged step, one per validation) and, when installed, TensorBoard."""

    def __init__(self, output: Path, resume_step: int | None, tensorboard: bool):
        self.path = output / "log.csv"
        if resume_step is not None and self.path.exists():
            self._truncate(resume_step)
        else:
            with open(self.path, "w", newline="") as fh:
                csv.writer(fh).writerow(LOG_COLUMNS)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=(resume_step or 0) + 1)

    def _truncate(self, step: int) -> None:
        """Drop rows of steps after the checkpoint: the resumed run logs them again."""
        with open(self.path, newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows or not set(rows[0]) <= set(LOG_COLUMNS) or rows[0][0] != "step":
            raise ValueError(f"{self.path}: not a log of this rdcd version (unexpected header); move it away to resume")
        old = rows[0]  # a log of an older version has fewer columns: widen its rows, empty cells for the new ones
        kept = [list(LOG_COLUMNS)] + [[dict(zip(old, r)).get(c, "") for c in LOG_COLUMNS]
                                      for r in rows[1:] if r and int(r[0]) <= step]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as fh:
            csv.writer(fh).writerows(kept)

    def write(self, row: dict) -> None:
        unknown = set(row) - set(LOG_COLUMNS)
        if unknown:
            raise KeyError(f"not log columns: {sorted(unknown)}")
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow([_format(row.get(c)) for c in LOG_COLUMNS])
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.9g}"
    return str(value)


def read_log(path: str | os.PathLike) -> list[dict]:
    """log.csv -> rows as dicts of floats (empty cells: None), step as int."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: (int(v) if k == "step" else float(v)) if v != "" else None for k, v in r.items()} for r in rows]

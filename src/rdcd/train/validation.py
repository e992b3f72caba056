"""Validation during training: DISC2021 metrics of the student on a benchmark folder."""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch

from .. import distributed as du
from ..models.student import StudentNet
from .log import VAL_KEYS, RunLog, say


def validate(net: StudentNet, benchmark: str | os.PathLike, size: int, batch_size: int = 32,
             device: torch.device | str = "cpu") -> dict | None:
    """DISC2021 metrics of the student on a benchmark folder (k = 10 nearest references, inner product).

    Runs on every rank (extraction is shared out); returns the metrics on rank 0, None elsewhere.
    Nothing is cached between calls: images are decoded again each time.
    """
    from ..extract import extract
    from ..metrics import evaluate, read_ground_truth, separation
    from ..models.student import StudentModel
    from ..search import Index, knn_pairs

    bench = Path(benchmark)
    threads = torch.get_num_threads()  # extract() sets its own
    model = StudentModel(copy.deepcopy(net).float(), device=device)
    start = time.perf_counter()
    queries = extract(model, bench / "queries", size=size, batch_size=batch_size, progress=False)
    references = extract(model, bench / "references", size=size, batch_size=batch_size, progress=False)
    torch.set_num_threads(threads)
    if not du.is_main():
        return None
    index = Index.build(references.ids, references.vectors)
    ground_truth = read_ground_truth(bench / "ground_truth.csv")
    metrics = evaluate(knn_pairs(queries.ids, queries.vectors, index, k=10), ground_truth)
    metrics.update(separation(queries.ids, queries.vectors, references.ids, references.vectors, ground_truth))
    metrics["seconds"] = time.perf_counter() - start
    return metrics


def check_benchmark(benchmark: str | os.PathLike) -> None:
    bench = Path(benchmark)
    missing = [p for p in ("queries", "references", "ground_truth.csv") if not (bench / p).exists()]
    if missing:
        raise FileNotFoundError(f"{bench}: not a benchmark folder, missing {', '.join(missing)} "
                                "(expected queries/, references/ and ground_truth.csv, e.g. `rdcd make-benchmark`)")




def validate_and_log(net: StudentNet, benchmark: str, size: int, batch_size: int, device: torch.device, step: int,
                     steps_per_epoch: int, log: RunLog | None) -> dict | None:
    """``validate`` at ``step``, written to the log as a val_* row; returns that row on rank 0."""
    metrics = validate(net, benchmark, size, batch_size, device)
    if not du.is_main():
        return None
    row = {"step": step, "epoch": step / steps_per_epoch, **{f"val_{k}": metrics[k] for k in VAL_KEYS}}
    log.write(row)
    say(f"step {step:>6}  validation on {benchmark}: uAP {metrics['uAP']:.4f}  "
        f"acc@1 {metrics['acc_at_1']:.4f}  copy cos {metrics['pos_cos']:.3f}  hardest non-copy cos "
        f"{metrics['hardest_neg_cos']:.3f}  L_hn {metrics['hn']:.3f}  ({metrics['n_gt']} true pairs, "
        f"{metrics['seconds']:.0f} s)")
    return row

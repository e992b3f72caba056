"""Several models on one benchmark folder, in one run on one machine: the API behind ``rdcd bench``.

For each model: embed ``queries/``, ``references/`` and ``train/`` (timing queries + references end
to end, decoding included), match with per-query kNN (k = 10, exact inner product) with and without
SSCD score normalisation (background = ``train/``, beta = 1, ranks 0..2), and score with the DISC2021
metrics (docs/evaluation.md). Descriptors live in memory for one model at a time and are never
cached on disk, so a run cannot pick up stale descriptors of an earlier one.

Storage convention (``bytes_per_image``): what one image's descriptor needs when stored as the
model means it: float32 descriptors 4 * dim bytes; binary hashes one bit per dimension
(pHash 64 bits = 8 bytes, PDQ 256 bits = 32 bytes), since their unit vectors (2b - 1) / sqrt(n)
are fixed by the bits.

Breakdown by edit (``uAP_by_edit``, needs ``edits.csv``): for an op name ``o``, the positives are
the queries that have a match in the ground truth and whose recipe (op names joined by ``+``)
contains ``o``; the distractors are ALL queries without a match (whatever their edits). uAP_o is
the uAP of the predictions of these queries only, against their ground truth, so its N is the
number of such positives (``n_positives``, given with each figure). A query with several ops
counts towards each of them.
"""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rdcd.metrics import Predictions, evaluate
from rdcd.models import DescriptorModel
from rdcd.scoring import SCORE_NORM_BETA, BenchmarkFolder, embed_benchmark, score_sets

log = logging.getLogger(__name__)

#: columns of the summary table: (title, result key, format)
TABLE_COLUMNS = (
    ("model", "model", "{}"),
    ("dim", "dim", "{}"),
    ("bytes", "bytes_per_image", "{}"),
    ("img/s", "images_per_second", "{:.1f}"),
    ("uAP", "uAP", "{:.3f}"),
    ("uAP_sn", "uAP_sn", "{:.3f}"),
    ("own_beta", "beta_own", "{:g}"),
    ("uAP_sn_own", "uAP_sn_own", "{:.3f}"),
    ("R@P90", "recall_at_p90", "{:.3f}"),
    ("acc@1", "acc_at_1", "{:.3f}"),
)
NOT_REACHED = "-"


def bytes_per_image(model: DescriptorModel) -> int:
    """Storage per image under the module's convention: d / 8 for binary hashes, 4 * d for float32."""
    from rdcd.models.hashes import PDQModel, PHashModel

    return model.dim // 8 if isinstance(model, (PHashModel, PDQModel)) else 4 * model.dim


def uap_by_edit(predictions: Predictions, ground_truth: Mapping[str, str | None],
                edits: Mapping[str, Sequence[str]]) -> dict[str, dict]:
    """{op: {"n_positives", "uAP"}} as defined in the module docstring, ops sorted by name."""
    negatives = {q for q, r in ground_truth.items() if not r}
    is_negative = np.isin(predictions.query_ids, list(negatives))
    by_op: dict[str, list[str]] = {}
    for query, ops in edits.items():
        if ground_truth.get(query):
            for op in set(ops):
                by_op.setdefault(op, []).append(query)
    breakdown = {}
    for op in sorted(by_op):
        positives = by_op[op]
        kept = is_negative | np.isin(predictions.query_ids, positives)
        truth = {q: ground_truth[q] for q in positives} | dict.fromkeys(negatives)
        breakdown[op] = {"n_positives": len(positives), "uAP": evaluate(predictions.subset(kept), truth)["uAP"]}
    return breakdown


def run_bench(
    benchmark_dir: str | os.PathLike,
    models: Sequence[str | os.PathLike | DescriptorModel],
    k: int = 10,
    size: int | None = None,
    batch_size: int = 32,
    report_dir: str | os.PathLike | None = None,
    progress: bool = True,
    precision: str = "auto",
    draft: bool = True,
) -> list[dict]:
    """Evaluate each model on the benchmark folder; one dict per model, in the order given.

    ``size``: input size (pixels, square) for every model instead of each model's own. Each dict
    holds ``model``, ``dim``, ``bytes_per_image``, ``input_size``, ``images_per_second`` (queries +
    references, end to end), ``uAP``, ``recall_at_p90``, ``threshold_at_p90``, ``acc_at_1``,
    ``recall_at_10``, the same with score normalisation (``uAP_sn``, ``recall_at_p90_sn``...),
    ``beta_own`` and ``uAP_sn_own`` (the model's own score-normalisation beta, ``match.resolve_beta``),
    ``n_queries``, ``n_gt``, ``n_failures`` and ``uAP_by_edit`` ({op: {n_positives, uAP, uAP_sn}},
    None without edits.csv) and ``runtime`` (how the model ran: ``rdcd.models.runtime.resolve_runtime``, which
    ``precision`` is passed to). ``draft``: JPEG draft decoding, as ``rdcd extract``. ``report_dir``:
    also one HTML report per model (kNN predictions without score normalisation). Untrained students get their random layers from torch seed 0, so
    a run gives the same numbers every time (timings aside).
    """
    if not models:
        raise ValueError("no model to benchmark; give at least one model name or file")
    names = [m.name if isinstance(m, DescriptorModel) else str(m) for m in models]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"model {repeated[0]!r} is listed twice; list each model once")
    bench = BenchmarkFolder.read(benchmark_dir)
    embedded: dict = {}  # (base model, size) -> (model, how, sets): projections of one base share its embedding
    return [_bench_one(model, bench, k, size, batch_size, report_dir, progress, precision, draft, embedded)
            for model in models]


def _bench_one(spec, bench: BenchmarkFolder, k: int, size: int | None, batch_size: int,
               report_dir, progress: bool, precision: str = "auto", draft: bool = True,
               embedded: dict | None = None) -> dict:
    from rdcd.models.projected import parse_projection

    projection = parse_projection(spec)  # BASE+pcawDIM: fitted on the benchmark's train/ images
    base_spec = projection.base_spec if projection else spec
    key = (str(base_spec), size)
    if embedded is not None and key in embedded:
        resolved, sets = embedded[key]
    else:
        resolved = _load_seeded(base_spec, precision)
        log.info("bench: %s", base_spec)
        sets = embed_benchmark(resolved, bench, size=size, batch_size=batch_size, progress=progress, draft=draft)
        if embedded is not None and isinstance(base_spec, (str, os.PathLike)):
            embedded[key] = (resolved, sets)
    model, how = resolved.model, resolved.how
    label = spec if isinstance(spec, (str, os.PathLike)) else model.name
    dim, stored_bytes = int(model.dim), bytes_per_image(model)
    if projection is not None:
        sets, how = project_sets(sets, projection), f"{how}, then {'PCA whitening' if projection.whiten else 'PCA'} " \
            f"to {projection.dim} dims fitted on {len(sets['train'].ids)} train/ images"
        dim, stored_bytes = projection.dim, 4 * projection.dim
    timed = (sets["queries"], sets["references"])
    n_timed = sum(len(s.ids) + len(s.failures) for s in timed)
    seconds = sum(s.seconds for s in timed)

    result = {
        "model": str(label),
        "runtime": how,
        "dim": dim,
        "bytes_per_image": stored_bytes,
        "input_size": int(size or model.input_size),
        "images_per_second": n_timed / seconds if seconds > 0 else None,
        "extract_seconds": seconds,
        "n_images_timed": n_timed,
        "n_failures": sum(len(s.failures) for s in sets.values()),
        "k": int(k),
        "n_queries": len(bench.queries),
    }
    # a shipped model's own score-normalisation beta (chosen on its validation benchmark, used by
    # `rdcd match --score-norm`); every other model's is SSCD's 1
    from rdcd.match import resolve_beta

    beta_own = resolve_beta(None, resolved.card if projection is None else None)[0]
    row_keys = ("uAP", "recall_at_p90", "threshold_at_p90", "acc_at_1", "recall_at_10", "n_gt")
    scores, predictions = score_sets(sets, bench, k, beta_own, row_keys=row_keys)
    columns = {"": "raw", "_sn": "score_norm_beta1" if beta_own != SCORE_NORM_BETA else "score_norm"}
    by_edit: dict[str, dict] = {}
    for suffix, key in columns.items():
        for name in row_keys[:-1]:
            result[name + suffix] = scores[key][name]
        if bench.edits is not None:
            for op, row in uap_by_edit(predictions[key], bench.ground_truth, bench.edits).items():
                by_edit.setdefault(op, {"n_positives": row["n_positives"]})["uAP" + suffix] = row["uAP"]
    result["n_gt"] = scores["raw"]["n_gt"]
    if report_dir is not None:
        from rdcd.report import write_report

        path = Path(report_dir) / f"{safe_filename(str(label))}.html"
        write_report(path, predictions["raw"], bench.ground_truth, evaluate(predictions["raw"], bench.ground_truth),
                     query_dir=bench.root / "queries", reference_dir=bench.root / "references",
                     title=f"rdcd bench: {label} on {bench.root.name} (k={k})")
        result["report"] = str(path)
    result["beta_own"], result["uAP_sn_own"] = beta_own, scores["score_norm"]["uAP"]
    result["uAP_by_edit"] = by_edit if bench.edits is not None else None
    return result


def project_sets(sets: dict, projection) -> dict:
    """Embedded benchmark sets reduced by a projection spec's PCA (whitening), fitted on their train/ set."""
    import dataclasses

    from rdcd.postprocess import PCAWhitening

    fitted = PCAWhitening(projection.dim, whiten=projection.whiten).fit(sets["train"].vectors)
    return {name: dataclasses.replace(result, vectors=fitted.transform(result.vectors)) for name, result in sets.items()}


def _load_seeded(spec, precision: str = "auto"):
    """The model's runtime (``rdcd.models.runtime.ModelRuntime``, the one rdcd extract would use),
    loaded once (an untrained student must embed every set with the same weights) with torch's RNG
    seeded, so that the random layers of an untrained student, and its numbers, are the same in every
    run; the caller's RNG state is left as it was."""
    import torch

    from rdcd.models.runtime import resolve_runtime

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        resolved = resolve_runtime(spec, precision)
        log.info("bench: %s", resolved.how)
        return resolved


def safe_filename(name: str) -> str:
    """``student:tf_efficientnet_lite0:128`` -> ``student_tf_efficientnet_lite0_128``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


# ------------------------------------------------------------------------------------ presentation


def machine_description(load: bool = True) -> str:
    """CPU model and cores (from /proc/cpuinfo where there is one), the GPU if PyTorch sees one, and
    (``load``) the current load average (other jobs on the machine slow extraction down; call it
    before the run)."""
    from .machine import cpu_model, usable_cores

    parts = [f"{cpu_model()}, {usable_cores()} cores usable of {os.cpu_count()}"]
    import torch

    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    if load and hasattr(os, "getloadavg"):
        parts.append(f"1-min load average {os.getloadavg()[0]:.1f} at the start")
    return "; ".join(parts)


def _cell(result: dict, key: str, fmt: str) -> str:
    value = result.get(key)
    return NOT_REACHED if value is None else fmt.format(value)


def format_table(results: Sequence[dict], markdown: bool = False) -> str:
    """The summary table (one row per model), aligned text or a Markdown table."""
    header = [title for title, _, _ in TABLE_COLUMNS]
    rows = [[_cell(r, key, fmt) for _, key, fmt in TABLE_COLUMNS] for r in results]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(c) for c in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in [header, *rows])


def counts_line(results: Sequence[dict]) -> str:
    first = results[0]
    return (f"{first['n_queries']} queries, {first['n_gt']} of them with a matching reference (n_gt); "
            f"k = {first['k']} candidates per query; {NOT_REACHED} in R@P90: precision 0.9 never reached")


def format_edit_table(results: Sequence[dict]) -> str | None:
    """Markdown table of uAP per edit op (rows) and model (columns), with each op's number of positives."""
    ops = sorted({op for r in results for op in (r.get("uAP_by_edit") or {})})
    if not ops:
        return None
    lines = ["| op | positives | " + " | ".join(r["model"] for r in results) + " |",
             "|---|---:|" + "---:|" * len(results)]
    for op in ops:
        cells = [r["uAP_by_edit"].get(op) for r in results]
        n = next(c["n_positives"] for c in cells if c)
        lines.append(f"| {op} | {n} | " + " | ".join(
            f"{c['uAP']:.3f} ({c['uAP_sn']:.3f})" if c else NOT_REACHED for c in cells) + " |")
    return "\n".join(lines)


def format_markdown(results: Sequence[dict], command: str, machine: str, date: str | None = None,
                    note: str | None = None) -> str:
    """A section ready for BENCHMARKS.md: command, machine, date, summary table, per-edit table."""
    date = date or time.strftime("%Y-%m-%d")
    parts = [
        f"Command: `{command}`", "",
        f"Machine: {machine}. Date: {date}.", "",
        format_table(results, markdown=True), "",
        counts_line(results) + ". img/s: queries + references, end to end (decoding, resizing, model); "
        "bytes: float32 descriptors 4 x dim, binary hashes 1 bit per dimension. "
        "uAP_sn: score normalisation on train/ (beta 1, ranks 0..2); own_beta: the beta a shipped model's "
        "card calibrated on its validation benchmark (what `rdcd match --score-norm` uses for it; 1 for "
        "every other model), uAP_sn_own: uAP_sn with it.",
    ]
    runtimes = [f"- {r['model']}: {r['runtime']}" for r in results if r.get("runtime")]
    if runtimes:
        parts += ["", "How each model ran (as `rdcd extract` would run it):", "", *runtimes]
    if note:
        parts += ["", note]
    edit_table = format_edit_table(results)
    if edit_table:
        parts += ["", "uAP by edit op, without (and with) score normalisation: positives = matching queries "
                      "whose recipe has the op; every query without a match is kept as a distractor.", "",
                  edit_table]
    return "\n".join(parts) + "\n"

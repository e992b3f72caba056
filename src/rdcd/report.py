"""One self-contained HTML page about a set of predictions: metrics, precision-recall curve, score
histograms and, with the image folders, thumbnails of the worst mistakes.

Everything (plots, thumbnails, style) is inlined, so the file can be mailed or archived alone.
"""
from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rdcd.descriptors import IMAGE_SUFFIXES, atomic_path
from rdcd.images import ImageLoadError, open_image
from rdcd.metrics import Predictions, annotate, as_predictions, evaluate, precision_recall_curve

THUMBNAIL_PX = 160

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; background: #fff; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 4px 10px; border-bottom: 1px solid #eee; text-align: left; }
table.metrics td:nth-child(2) { font-family: monospace; text-align: right; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
.examples td { vertical-align: top; }
figure { margin: 0; text-align: center; font-size: 0.8em; width: 170px; overflow-wrap: anywhere; }
figure img { max-width: 160px; max-height: 160px; border: 1px solid #ccc; }
.missing { width: 160px; height: 60px; line-height: 60px; background: #f3f3f3; color: #999; }
.note { color: #666; font-size: 0.9em; }
"""


def write_report(
    path: str | os.PathLike,
    predictions: Predictions | Sequence[tuple[str, str, float]],
    ground_truth: Mapping[str, str | None],
    metrics: dict | None = None,
    query_dir: str | os.PathLike | None = None,
    reference_dir: str | os.PathLike | None = None,
    title: str = "rdcd copy detection report",
    n_examples: int = 12,
) -> Path:
    """Write the report to ``path`` (atomically) and return the path.

    ``metrics`` defaults to ``evaluate(predictions, ground_truth)``. With ``query_dir`` and
    ``reference_dir`` the highest-scoring false positives and the missed copies are shown as
    thumbnails; without them, as ids.
    """
    predictions = as_predictions(predictions)
    metrics = evaluate(predictions, ground_truth) if metrics is None else metrics
    is_copy, rank = annotate(predictions, ground_truth)
    thumbs = _Thumbnails(query_dir, reference_dir)
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Metrics</h2>",
        _metrics_table(metrics),
        "<h2>Scores</h2>",
        '<div class="plots">',
        _img(_figure_png(_plot_precision_recall(predictions, ground_truth, metrics)), "precision-recall curve"),
        _img(_figure_png(_plot_histograms(predictions.scores, is_copy)), "score histograms"),
        "</div>",
        _false_positives(predictions, is_copy, rank, ground_truth, thumbs, n_examples),
        _missed_copies(predictions, is_copy, rank, ground_truth, thumbs, n_examples),
    ]
    page = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{STYLE}</style>\n</head>\n<body>\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )
    path = Path(path)
    with atomic_path(path, ".html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ sections

METRIC_ROWS = (
    ("uAP", "micro average precision (uAP)"),
    ("recall_at_p90", "recall at precision 0.9"),
    ("threshold_at_p90", "score threshold at precision 0.9"),
    ("acc_at_1", "accuracy@1 (true reference ranked first)"),
    ("recall_at_10", "recall@10"),
    ("n_gt", "ground-truth pairs"),
    ("n_predictions", "predictions"),
)


def _metrics_table(metrics: dict) -> str:
    rows = []
    for key, label in METRIC_ROWS:
        value = metrics.get(key)
        if value is None:
            shown = "not reached" if key.endswith("p90") else "-"
        elif isinstance(value, float):
            shown = f"{value:.4f}"
        else:
            shown = str(value)
        rows.append(f"<tr><td>{html.escape(label)}</td><td>{shown}</td><td class=note>{key}</td></tr>")
    return '<table class="metrics">' + "".join(rows) + "</table>"


def _false_positives(predictions, is_copy, rank, ground_truth, thumbs, n) -> str:
    wrong = np.flatnonzero(~is_copy)
    worst = wrong[np.argsort(-predictions.scores[wrong], kind="stable")[:n]]
    rows = []
    for i in worst:
        q, r, score = predictions.query_ids[i], predictions.reference_ids[i], predictions.scores[i]
        true_ref = ground_truth.get(q)
        rows.append(
            [
                thumbs.query(q),
                thumbs.reference(r, f"predicted {r}"),
                thumbs.reference(true_ref, f"true {true_ref}") if true_ref else _placeholder("query has no copy"),
                f"score {score:.4f}<br>position {rank[i] + 1} in its query",
            ]
        )
    header = f"<h2>Highest-scoring false positives ({len(worst)} of {len(wrong)})</h2>"
    return header + _examples_table(["query", "predicted reference", "true reference", ""], rows)


def _missed_copies(predictions, is_copy, rank, ground_truth, thumbs, n) -> str:
    wrong = np.flatnonzero(~is_copy)
    wrong = wrong[np.lexsort((-predictions.scores[wrong], predictions.query_ids[wrong]))]
    queries, first = np.unique(predictions.query_ids[wrong], return_index=True)
    best_wrong = dict(zip(queries.tolist(), wrong[first].tolist()))  # query -> its best-scoring false pair
    true_row = {predictions.query_ids[i]: i for i in np.flatnonzero(is_copy)}
    missed = []
    for q, r in ground_truth.items():
        if r and (q not in true_row or rank[true_row[q]] != 0):
            top = best_wrong.get(q)
            missed.append((q, r, true_row.get(q), top))
    # Most confidently wrong first: by the score of the false pair that took first place.
    missed.sort(key=lambda m: -predictions.scores[m[3]] if m[3] is not None else np.inf)
    rows = []
    for q, r, found, top in missed[:n]:
        status = "never predicted" if found is None else (
            f"true pair score {predictions.scores[found]:.4f}, position {rank[found] + 1} in its query"
        )
        top_cell = _placeholder("no other prediction")
        if top is not None:
            top_ref = predictions.reference_ids[top]
            top_cell = thumbs.reference(top_ref, f"ranked first: {top_ref} ({predictions.scores[top]:.4f})")
        rows.append([thumbs.query(q), thumbs.reference(r, f"true {r}"), top_cell, status])
    header = f"<h2>Missed copies: true reference not ranked first ({len(rows)} of {len(missed)})</h2>"
    return header + _examples_table(["query", "true reference", "ranked first instead", ""], rows)


def _examples_table(columns: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "<p class=note>none</p>"
    head = "".join(f"<th>{c}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="examples"><tr>{head}</tr>{body}</table>'


def _placeholder(text: str) -> str:
    return f'<figure><div class="missing">-</div>{html.escape(text)}</figure>'


class _Thumbnails:
    """Inline JPEG thumbnails of images found by id in a folder (``<dir>/<id>.<image suffix>``)."""

    def __init__(self, query_dir, reference_dir):
        self.query_dir = Path(query_dir) if query_dir else None
        self.reference_dir = Path(reference_dir) if reference_dir else None

    def query(self, image_id: str) -> str:
        return self._figure(self.query_dir, image_id, image_id)

    def reference(self, image_id: str, caption: str) -> str:
        return self._figure(self.reference_dir, image_id, caption)

    def _figure(self, folder: Path | None, image_id: str, caption: str) -> str:
        if folder is None:
            return f"<figure>{html.escape(caption)}</figure>"
        path = next((folder / f"{image_id}{s}" for s in IMAGE_SUFFIXES if (folder / f"{image_id}{s}").exists()), None)
        return thumbnail_figure(path, caption)


def thumbnail_figure(path: Path | None, caption: str) -> str:
    """An inline JPEG thumbnail of one image with its caption, or a placeholder saying why not."""
    if path is None:
        return _placeholder(f"{caption} (image not found)")
    try:
        image = open_image(path)
    except ImageLoadError as e:
        return _placeholder(f"{caption} ({e.reason})")
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return f"<figure>{_img(buffer.getvalue(), caption, 'image/jpeg')}<br>{html.escape(caption)}</figure>"


# --------------------------------------------------------------------------------------------- plots


def _img(data: bytes, alt: str, mime: str = "image/png") -> str:
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{base64.b64encode(data).decode("ascii")}">'


def _figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _plot_precision_recall(predictions: Predictions, ground_truth, metrics: dict) -> Figure:
    figure = Figure(figsize=(5, 4), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    if len(predictions):
        precision, recall, _ = precision_recall_curve(predictions, ground_truth)
        axes.plot(np.r_[0, recall], np.r_[1, precision], color="tab:blue", label=f"uAP {metrics['uAP']:.3f}")
    axes.axhline(0.9, color="grey", linestyle=":", linewidth=1)
    if metrics.get("recall_at_p90") is not None:
        axes.plot([metrics["recall_at_p90"]], [0.9], "o", color="tab:red",
                  label=f"recall@P90 {metrics['recall_at_p90']:.3f}")
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
             title="Precision-recall (all queries pooled)")
    axes.legend(loc="lower left")
    axes.grid(alpha=0.3)
    return figure


def _plot_histograms(scores: np.ndarray, is_copy: np.ndarray) -> Figure:
    figure = Figure(figsize=(5, 4), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    if len(scores):
        low, high = float(scores.min()), float(scores.max())
        bins = np.linspace(low, high if high > low else low + 1, 50)
        for mask, label, colour in ((~is_copy, "false pairs", "tab:orange"), (is_copy, "true pairs", "tab:blue")):
            if mask.any():
                axes.hist(scores[mask], bins=bins, alpha=0.6, color=colour, label=f"{label} ({mask.sum()})")
        axes.set_yscale("log")
        axes.legend()
    axes.set(xlabel="score", ylabel="predictions", title="Scores of true and false pairs")
    return figure

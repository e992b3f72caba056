#!/usr/bin/env python
"""Plot an `rdcd train` run: the three losses, the descriptor diagnostics and validation uAP vs step.

    python scripts/plot_training.py RUN_DIR --output docs/training_curve.png

Also prints the mean seconds per step of each component (data, teacher, key encoder, student) and
the throughput, from RUN_DIR/log.csv (the first logged step, which includes start-up, is left out).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rdcd.train import read_log  # noqa: E402


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start), so the curve stays aligned with its steps."""
    out = np.empty_like(values)
    for i in range(len(values)):
        out[i] = values[max(0, i - window + 1):i + 1].mean()
    return out


def column(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    kept = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    if not kept:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*kept)
    return np.asarray(steps, float), np.asarray(values, float)


def timing_summary(rows: list[dict]) -> dict:
    train_rows = [r for r in rows if r["loss"] is not None][1:]
    if not train_rows:
        return {}
    summary = {k: float(np.mean([r[f"t_{k}"] for r in train_rows])) for k in ("data", "teacher", "key", "student", "step")}
    summary["images_per_s"] = float(np.mean([r["images_per_s"] for r in train_rows]))
    return summary


def plot(run: Path, output: Path, window: int) -> None:
    rows = read_log(run / "log.csv")
    config = json.loads((run / "config.json").read_text())
    c, r = config["config"], config["resolved"]
    title = (f"{run.name}: {c['student']} {c['dim']}-d from {c['teacher']}, {c['size']} px, global batch "
             f"{r['global_batch']}, queue {c['loss']['queue_size']}, {r['total_steps']} steps, lr {r['lr']:g}")

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, label) in zip(axes[0], [("con", "L_con (InfoNCE)"), ("hn", "L_hn (hard negative)"),
                                          ("rel", "L_rel (relational KL)")]):
        steps, values = column(rows, key)
        if len(steps):
            ax.plot(steps, values, color="0.75", lw=0.8, label="per step")
            ax.plot(steps, smooth(values, window), color="C0", lw=2, label=f"mean of {window}")
            ax.legend(loc="upper right", fontsize=8)
        else:
            ax.text(0.5, 0.5, "switched off", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label)
        ax.set_xlabel("step")
    steps, values = column(rows, "val_hn")
    if len(steps):  # L_hn against a fixed key set (the validation references): comparable across steps
        ax = axes[0, 1].twinx()
        ax.plot(steps, values, "s--", color="C3", label="held out, vs fixed references (right axis)")
        ax.set_ylabel("held-out L_hn", color="C3")
        ax.legend(loc="lower right", fontsize=8)

    ax = axes[1, 0]
    for key, label, color in [("pos_cos", "z_S . positive key", "C2"), ("hardest_neg_cos", "z_S . hardest negative", "C3"),
                              ("neg_cos", "z_S . mean negative", "C7"), ("teacher_cos", "cos(h_S, h_T)", "C0")]:
        steps, values = column(rows, key)
        if len(steps):
            ax.plot(steps, smooth(values, window), color=color, label=label)
    ax.set_title("cosines (descriptor vs key queue; student vs teacher)")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    steps, values = column(rows, "eff_rank")
    ax.plot(steps, smooth(values, window), color="C4", label="effective rank of z_S (batch)")
    ax.set_ylabel("effective rank")
    ax.set_xlabel("step")
    lr_ax = ax.twinx()
    steps, values = column(rows, "lr")
    lr_ax.plot(steps, values, color="0.5", ls="--", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    ax.set_title(f"effective rank (at most {min(c['dim'], r['global_batch'])}) and LR")
    lines = ax.get_lines() + lr_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center right")

    ax = axes[1, 2]
    steps, values = column(rows, "val_uAP")
    if len(steps):
        ax.plot(steps, values, "o-", color="C1")
        for x, y in zip(steps, values):
            ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        n_gt = column(rows, "val_n_gt")[1]
        bench = Path(c["val_benchmark"]).name if c.get("val_benchmark") else "benchmark"
        ax.set_title(f"{bench} uAP (kNN k=10, {int(n_gt[0])} true pairs, {c['eval_size']} px)")
        ax.margins(y=0.15)
    else:
        ax.set_title("no validation")
    ax.set_xlabel("step")

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    print(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run folder of `rdcd train` (holds log.csv and config.json)")
    parser.add_argument("--output", type=Path, default=None, help="PNG path (default: RUN/training_curve.png)")
    parser.add_argument("--smooth", type=int, default=10, help="moving-average window in logged steps")
    args = parser.parse_args()
    plot(args.run, args.output or args.run / "training_curve.png", args.smooth)
    summary = timing_summary(read_log(args.run / "log.csv"))
    if summary:
        print("seconds per step: " + "  ".join(f"{k} {summary[k]:.3f}" for k in ("data", "teacher", "key", "student", "step"))
              + f"  |  {summary['images_per_s']:.2f} images/s")


if __name__ == "__main__":
    main()

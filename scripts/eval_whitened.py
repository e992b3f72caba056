"""Validation uAP of training runs as they are and with their descriptors PCA-whitened again.

    python scripts/eval_whitened.py runs/p128_b runs/p128_b_norel --background runs/split/train.txt \
        --valbench runs/valbench [--dim 128]

For each run folder: its latest checkpoint (or ``model.pt`` when finished) becomes a student file
``RUN/stepN.pt``; its raw uAP on the validation benchmark is measured, then again after PCA
whitening of its own descriptors fitted on ``--background`` (the training pool, never the
benchmark): ``RUN/stepN.pt+pcawDIM``. Training can lose the isotropic spread of its start while it
learns what separates copies; re-whitening tells the two apart.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rdcd.models import load_model
from rdcd.models.projected import fit_projection
from rdcd.models.student import StudentConfig, StudentNet, save_student
from rdcd.scoring import score_model


def student_file(run: Path) -> Path:
    """The run's latest weights as a student file (model.pt of a finished run, else the checkpoint's)."""
    checkpoint = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    path = run / f"step{checkpoint['step']}.pt"
    if not path.exists():
        net = StudentNet(StudentConfig.from_dict(checkpoint["student_config"]))
        net.load_state_dict(checkpoint["student"])
        save_student(net.eval(), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--background", required=True, help="images the whitening is fitted on (training pool)")
    parser.add_argument("--valbench", required=True)
    parser.add_argument("--dim", type=int, default=None, help="whitened dimension (default: the student's)")
    args = parser.parse_args()
    rows = {}
    for run in map(Path, args.runs):
        path = student_file(run)
        model = load_model(str(path))
        raw = score_model(model, args.valbench, score_norm=False)["raw"]
        projection = fit_projection(f"{path}+pcaw{args.dim or model.dim}", args.background, progress=False)
        whitened = score_model(str(projection), args.valbench, score_norm=False)["raw"]
        rows[str(run)] = {"weights": path.name, "uAP": raw["uAP"], "uAP_rewhitened": whitened["uAP"],
                          "n_gt": raw["n_gt"]}
        print(json.dumps({str(run): rows[str(run)]}), flush=True)
    print("| run | weights | valbench uAP | re-whitened |\n|---|---|---:|---:|")
    for run, r in rows.items():
        print(f"| {run} | {r['weights']} | {r['uAP']:.3f} | {r['uAP_rewhitened']:.3f} |")


if __name__ == "__main__":
    main()

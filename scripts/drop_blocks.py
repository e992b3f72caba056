"""Experiment: a shallower 128-d student (target: faster than sscd-distilled on a CPU).

Residual blocks of an EfficientNet can be removed with little damage (the network was trained with
stochastic depth, so each residual block only refines its input). This script measures it:

* ``scan``: drop each residual inverted-residual block of the shipped student alone (the block becomes
  the identity), or with ``--drop`` the given blocks together, and report the uAP on the validation benchmark (160 px, k = 10, fp32 PyTorch) and the
  GFLOPs per image at 224 px, next to the full model.
* ``speed``: int8 images/s of the backbone (batch 32; 5 interleaved rounds) with each ``--drop``
  combination (one quoted argument per combination) next to the shipped one.
* ``train``: drop the given blocks (``--drop 3.2 4.2 5.3``: stage.index, as in the scan) and
  self-distil the shallower network from the shipped model (1 - cosine to the shipped descriptors,
  images of the training split under the "advanced" augmentations), then report uAP on the validation
  benchmark and devbench before and after training; the weights go to OUTPUT/state_dict.pt.

    python scripts/drop_blocks.py scan
    python scripts/drop_blocks.py speed --drop "1.1 3.2 4.2 5.1 5.3" "1.1 2.1 3.2 4.2 5.1 5.3"
    python scripts/drop_blocks.py train --drop 3.2 4.2 5.3 --steps 600 --output runs/drop_a
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from rdcd.models import model_file
from rdcd.models.student import StudentModel, StudentNet, load_student, residual_block_names, shallower


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prune_student = _script("prune_student")
bench_expansion = _script("bench_expansion")


def residual_blocks(net) -> list[str]:
    """Names ("stage.index" in the full architecture) of the residual blocks ``net`` still has."""
    full = StudentNet(dataclasses.replace(net.config, drop_blocks=()))
    return [n for n in residual_block_names(full.backbone) if n not in net.config.drop_blocks]


def gflops(net, size: int = 224) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net.eval()(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("scan", "speed", "train"))
    ap.add_argument("--model", default="rdcd-tf_efficientnet_lite0-128",
                    help="the student to make shallower (shipped name or .pt; default: the full-depth 128-d one)")
    ap.add_argument("--drop", nargs="*", default=[])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--data", default="runs/split/train.txt")
    ap.add_argument("--valbench", default="runs/valbench")
    ap.add_argument("--devbench", default="../shared/data/devbench")
    ap.add_argument("--output")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bn", choices=("frozen", "batch"), default="frozen",
                    help="frozen: batch norm keeps the shipped model's statistics (the network runs in eval mode "
                         "while it learns); batch: batch statistics, as scripts/prune_student.py")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    teacher = load_student(model_file(args.model) or args.model).eval()
    valbench = Path(args.valbench)

    if args.mode == "scan":
        rows = [("none", gflops(teacher), prune_student.uap(StudentModel(teacher), valbench))]
        print(f"full model: {rows[0][1]:.3f} GFLOPs at 224 px, valbench uAP {rows[0][2]:.3f}", flush=True)
        for name in [" ".join(args.drop)] if args.drop else residual_blocks(teacher):
            net = shallower(teacher, name.split()).eval()
            rows.append((name, gflops(net), prune_student.uap(StudentModel(net.eval()), valbench)))
            print(f"drop {name}: {rows[-1][1]:.3f} GFLOPs, valbench uAP {rows[-1][2]:.3f}", flush=True)
        return

    if args.mode == "speed":  # the backbones alone, int8, untrained calibration: speed does not depend on it
        bench_expansion._register_onnx_symbolics()
        variants = {"shipped": teacher, **{combo: shallower(teacher, combo.split()) for combo in args.drop}}
        with tempfile.TemporaryDirectory(prefix="rdcd-drop-") as tmp:
            sessions = {name: bench_expansion.int8_session(copy.deepcopy(net.backbone).eval(), Path(tmp) / f"v{i}.onnx")
                        for i, (name, net) in enumerate(variants.items())}
            for size, speed in bench_expansion.interleaved(sessions, sizes=(160, 224, 288)).items():
                print(f"{size} px, int8 batch 32, images/s (ratio to shipped): " + ", ".join(
                    f"[{name}] {v:.1f} ({v / speed['shipped']:.2f}x)" for name, v in speed.items()), flush=True)
        return

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    student = shallower(teacher, args.drop)
    report = {"drop": args.drop, "bn": args.bn, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
              "gflops_224": {"shipped": gflops(teacher), "dropped": gflops(student)}}
    for label, net in (("shipped", teacher), ("dropped, before training", student)):
        report[label] = prune_student.uaps(net, valbench, Path(args.devbench))
        print(label, report[label], flush=True)
    report.update(prune_student.self_distill(student, teacher, args.data, args.steps, args.batch_size, args.lr,
                                             args.seed, batch_norm=args.bn == "batch"))
    report["dropped, after training"] = prune_student.uaps(student, valbench, Path(args.devbench))
    print("dropped, after training", report["dropped, after training"], flush=True)
    torch.save(student.state_dict(), out / "state_dict.pt")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

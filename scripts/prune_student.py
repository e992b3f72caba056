"""Experiment: a pruned 128-d student (target: faster than sscd-distilled on a CPU). Not a shipped model.

1. Take the shipped student and rebuild its backbone with every inverted-residual block expanding
   ``--expansion``x instead of 6x (scripts/bench_expansion.py measured e3 at 1.27-1.53x the speed),
   keeping in each block the expansion channels that matter most for its output (|BN gamma after
   the depthwise conv| x L1 norm of the projection weights that read the channel).
2. Self-distillation: train the pruned network for ``--steps`` steps to give the shipped model's
   descriptors (1 - cosine) on images of the training split under the "advanced" augmentations at
   160 px (the same image goes to both; batch-norm statistics re-estimated on the way).
3. Report uAP on the validation benchmark and on devbench (160 px, k = 10, fp32 PyTorch) for the
   pruned network before and after training, next to the shipped model.

    python scripts/prune_student.py --steps 600 --output runs/pruned_e3   # ~20 min on 2 cores
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from rdcd.augment import advanced
from rdcd.images import list_images, open_image
from rdcd.models import model_file
from rdcd.models.student import StudentModel, load_student
from rdcd.scoring import score_model

import importlib.util

_spec = importlib.util.spec_from_file_location("bench_expansion", Path(__file__).with_name("bench_expansion.py"))
bench_expansion = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_expansion)


def pruned_copy(net, expansion: int):
    """The shipped StudentNet with its backbone rebuilt at ``expansion`` and the weights carried over."""
    small = bench_expansion.lite0(expansion)
    big = net.backbone
    small.conv_stem.load_state_dict(big.conv_stem.state_dict())
    small.bn1.load_state_dict(big.bn1.state_dict())
    small.conv_head.load_state_dict(big.conv_head.state_dict())
    small.bn2.load_state_dict(big.bn2.state_dict())
    for s, (stage_small, stage_big) in enumerate(zip(small.blocks, big.blocks)):
        for b_small, b_big in zip(stage_small, stage_big):
            if s == 0:  # the depthwise-separable block has no expansion
                b_small.load_state_dict(b_big.state_dict())
                continue
            keep = b_small.conv_pw.out_channels
            importance = b_big.bn2.weight.detach().abs() * b_big.conv_pwl.weight.detach().abs().sum(dim=(0, 2, 3))
            idx = importance.argsort(descending=True)[:keep].sort().values
            b_small.conv_pw.weight.data = b_big.conv_pw.weight.data[idx].clone()
            b_small.conv_dw.weight.data = b_big.conv_dw.weight.data[idx].clone()
            b_small.conv_pwl.weight.data = b_big.conv_pwl.weight.data[:, idx].clone()
            for bn_small, bn_big in ((b_small.bn1, b_big.bn1), (b_small.bn2, b_big.bn2)):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(bn_small, name).data = getattr(bn_big, name).data[idx].clone()
            b_small.bn3.load_state_dict(b_big.bn3.state_dict())
    out = copy.deepcopy(net)
    out.backbone = small
    return out


class Views(Dataset):
    def __init__(self, paths, size: int, seed: int):
        self.paths, self.aug, self.seed = paths, advanced(size), seed

    def __len__(self):
        return 10 ** 9

    def __getitem__(self, i):
        rng = random.Random(self.seed * 1_000_003 + i)
        image = open_image(self.paths[rng.randrange(len(self.paths))])
        return self.aug(image, rng)


def uap(model, folder: Path) -> float:
    """Raw uAP of ``model`` on a benchmark folder (k = 10), as ``rdcd bench`` scores it."""
    return score_model(model, folder, score_norm=False)["raw"]["uAP"]


def uaps(net, valbench: Path, devbench: Path) -> dict:
    """uAP of a student network (160 px, k = 10, fp32 PyTorch) on the validation benchmark and devbench."""
    model = StudentModel(net.eval())
    return {"valbench_uAP": uap(model, valbench), "devbench_uAP": uap(model, devbench)}


def self_distill(student, teacher, data: str, steps: int, batch_size: int, lr: float, seed: int,
                 batch_norm: bool = True) -> dict:
    """Train ``student`` for ``steps`` steps to give ``teacher``'s descriptors (1 - cosine, AdamW,
    cosine schedule) on images of ``data`` under the "advanced" augmentations at the teacher's input
    size; ``batch_norm``: batch statistics (False: the network stays in eval mode, batch norm frozen).
    Returns the training seconds and the final loss (mean of the last 20 steps)."""
    loader = DataLoader(Views(list_images(data), teacher.config.input_size, seed), batch_size=batch_size,
                        num_workers=1)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    student.train(batch_norm)  # no dropout or drop-path in these students: eval mode only freezes batch norm
    start, log = time.time(), []
    for step, x in enumerate(loader, 1):
        with torch.no_grad():
            target = teacher(x)
        loss = (1 - F.cosine_similarity(student(x), target, dim=1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        log.append(loss.item())
        if step % 20 == 0:
            print(f"step {step} loss {np.mean(log[-20:]):.4f} {time.time() - start:.0f} s", flush=True)
        if step >= steps:
            break
    student.eval()
    return {"train_seconds": time.time() - start, "final_loss": float(np.mean(log[-20:]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--expansion", type=int, default=3)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--data", default="runs/split/train.txt")
    ap.add_argument("--valbench", default="runs/valbench")
    ap.add_argument("--devbench", default="../shared/data/devbench")
    ap.add_argument("--output", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    teacher = load_student(model_file("rdcd-tf_efficientnet_lite0-128")).eval()  # the full-depth model
    student = pruned_copy(teacher, args.expansion)
    report = {"expansion": args.expansion, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr}
    valbench, devbench = Path(args.valbench), Path(args.devbench)
    for label, net in (("shipped", teacher), ("pruned, before training", student)):
        report[label] = uaps(net, valbench, devbench)
        print(label, report[label], flush=True)
    report.update(self_distill(student, teacher, args.data, args.steps, args.batch_size, args.lr, args.seed))
    report["pruned, after training"] = uaps(student, valbench, devbench)
    print("pruned, after training", report["pruned, after training"], flush=True)
    torch.save(student.state_dict(), out / "state_dict.pt")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

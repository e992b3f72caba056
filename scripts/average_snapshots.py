"""Average the weights of several snapshots of one training run (stochastic weight averaging).

    python scripts/average_snapshots.py runs/RUN/step1200.pt runs/RUN/step1800.pt ... --output runs/RUN/swa.pt

The snapshots must share one architecture; floating tensors are averaged, integer ones (batch-norm
counters) taken from the last. With ``--bn frozen`` runs the batch-norm statistics are the same in
every snapshot, so the average needs no statistics pass; after a ``--bn batch`` run the averaged
running statistics only approximate the averaged network's (re-estimate them before trusting it).
The result is an ordinary student file.
"""
from __future__ import annotations

import argparse

import torch

from rdcd.models.student import load_student, save_student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snapshots", nargs="+")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    nets = [load_student(path) for path in args.snapshots]
    states = [net.state_dict() for net in nets]
    if any(s.keys() != states[0].keys() for s in states):
        raise SystemExit("the snapshots do not share one architecture")
    average = {k: (torch.stack([s[k].float() for s in states]).mean(0).to(states[-1][k].dtype)
                   if states[-1][k].is_floating_point() else states[-1][k]) for k in states[-1]}
    net = nets[-1]
    net.load_state_dict(average)
    save_student(net.eval(), args.output)
    print(f"{args.output}: average of {len(states)} snapshots")


if __name__ == "__main__":
    main()

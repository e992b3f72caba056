"""Singular-value spectrum and effective rank of descriptors (RDCD's Figure 3: dimensional collapse).

    python scripts/plot_spectrum.py --images runs/valbench/references \
        --models full=runs/r128/model.pt no_hn=runs/r128_nohn/model.pt --output docs/spectrum.png

For each model: embed the images, centre the descriptors, take the singular values of the (n, d)
matrix, and plot them normalised by the largest, on a log scale. Prints the effective rank
exp(entropy of the normalised singular values of the uncentred descriptors, as logged during
training: rdcd.losses.effective_rank) and writes the numbers
to OUTPUT with .json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def spectrum(vectors: np.ndarray) -> np.ndarray:
    x = vectors - vectors.mean(0, keepdims=True)
    return np.linalg.svd(x, compute_uv=False)


def main() -> None:
    from rdcd.extract import extract
    from rdcd.losses import effective_rank

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="image folder or file list")
    parser.add_argument("--models", required=True, nargs="+", metavar="LABEL=MODEL")
    parser.add_argument("--output", required=True, help="PNG to write (numbers go to the same name .json)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for item in args.models:
        label, _, model = item.partition("=")
        vectors = extract(model, args.images, progress=False).vectors
        s = spectrum(vectors)
        rank = float(effective_rank(torch.from_numpy(vectors)))
        results[label] = {"model": model, "n": len(vectors), "dim": int(vectors.shape[1]), "effective_rank": rank,
                          "singular_values": s.tolist()}
        ax.plot(np.arange(1, len(s) + 1), s / s[0], label=f"{label} (eff. rank {rank:.1f})")
        print(f"{label}: {model}: {len(vectors)} x {vectors.shape[1]}, effective rank {rank:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("singular value / largest")
    ax.set_title(f"descriptor spectrum on {Path(args.images).name} ({len(vectors)} images)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    Path(args.output).with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

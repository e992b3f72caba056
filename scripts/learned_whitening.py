"""Experiment: learned whitening from augmented pairs of the training pool, against PCA whitening.

    python scripts/learned_whitening.py --bases gem:tf_efficientnet_lite0@160 sscd-distilled@160 \
        --background runs/split/train.txt --benchmarks runs/valbench ../shared/data/devbench --dims 64 128 256

Radenovic et al.'s learned whitening ("Fine-tuning CNN image retrieval with no human annotation",
TPAMI 2018), with the matching pairs made by augmentation instead of labels: each background image
and one view of it from the training recipe (``--augmentation``, seeded). The projection whitens
the covariance of the pair differences (what an edit changes), then keeps the top principal
directions of the background in that space. Compared in the same run with PCA whitening fitted on
the same clean background images. Raw uAP, k = 10. Embeddings are cached under ``--cache``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rdcd.augment import build_augmentation, view_seed
from rdcd.extract import extract
from rdcd.images import list_images, open_image
from rdcd.models import load_model
from rdcd.models.base import l2_normalize
from rdcd.models.shipped import file_sha256
from rdcd.postprocess import PCAWhitening
from rdcd.scoring import BenchmarkFolder, embed_benchmark, score_transformed


def augmented(model, paths, recipe: str, seed: int, batch: int = 32) -> np.ndarray:
    views = build_augmentation(recipe, model.input_size, normalize=False)
    out, pending = [], []
    for i, path in enumerate(tqdm(paths, desc="augmented views", leave=False)):
        pending.append(views(open_image(path), view_seed(seed, 0, i)).permute(1, 2, 0).numpy())
        if len(pending) == batch or i == len(paths) - 1:
            out.append(model.embed(np.stack(pending)))
            pending = []
    return np.concatenate(out)


def fit_learned(x: np.ndarray, x_view: np.ndarray, dim: int, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean, projection): whiten the pair-difference covariance, then PCA of the background there."""
    x, x_view = x.astype(np.float64), x_view.astype(np.float64)
    mean = x.mean(0)
    diff = x - x_view
    c_s = diff.T @ diff / len(diff)
    c_s += shrink * np.trace(c_s) / len(c_s) * np.eye(len(c_s))
    s, u = np.linalg.eigh(c_s)
    p1 = u @ np.diag(np.maximum(s, 1e-12 * s.max()) ** -0.5) @ u.T  # rank-deficient pairs: no NaN
    y = (x - mean) @ p1
    variances, v = np.linalg.eigh(y.T @ y / len(y))
    top = np.argsort(variances)[::-1][:dim]
    return mean, p1 @ v[:, top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", nargs="+", required=True)
    parser.add_argument("--background", required=True)
    parser.add_argument("--benchmarks", nargs="+", required=True)
    parser.add_argument("--dims", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--shrink", nargs="+", type=float, default=[0.0, 0.01, 0.1])
    parser.add_argument("--augmentation", default="advanced")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="runs/lw_cache")
    args = parser.parse_args()
    benches = [BenchmarkFolder.read(b) for b in args.benchmarks]
    paths = list_images(args.background)
    for spec in args.bases:
        base_file = Path(spec.split(":", 1)[-1].split("@")[0])  # gem:FILE@SIZE or FILE: its weights
        weights = file_sha256(base_file) if base_file.is_file() else None
        key = hashlib.sha256(json.dumps([spec, weights, [str(p) for p in paths], args.augmentation, args.seed,
                                         args.benchmarks]).encode()).hexdigest()[:12]
        cache = Path(args.cache) / f"{key}.npz"
        model = load_model(spec)
        sets = [embed_benchmark(model, bench) for bench in benches]
        if cache.exists():
            with np.load(cache) as f:
                x, x_view = f["x"], f["x_view"]
        else:
            x = extract(model, paths, progress=False).vectors
            x_view = augmented(model, paths, args.augmentation, args.seed)
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, x=x, x_view=x_view)
        for dim in args.dims:
            pcaw = PCAWhitening(dim).fit(x)
            heads = {"pcaw": (pcaw.mean_, pcaw.projection_)}
            for shrink in args.shrink:
                heads[f"lw shrink {shrink:g}"] = fit_learned(x, x_view, dim, shrink)
            for head, (mean, projection) in heads.items():
                cells = []
                for bench, embedded in zip(benches, sets):
                    raw = score_transformed(embedded, bench, lambda x, m=mean, p=projection: l2_normalize(
                        ((x - m) @ p).astype(np.float32)))
                    cells.append(f"{raw['uAP']:.3f} ({raw['n_gt']})")
                print(f"| {spec} | {dim} | {head} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

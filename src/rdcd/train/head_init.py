"""Before step 1 of a new run: fit the student's GeM standardisation and head on seeded light views."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..augment import build_augmentation, view_seed
from ..images import ImageLoadError, open_image
from ..models.student import StudentNet, fit_head_pcaw
from .config import TrainConfig
from .log import say
from .model import FrozenTeacher, Normalize, load_teacher


def initialise_head(student: StudentNet, config: TrainConfig, teacher: FrozenTeacher | None, paths: Sequence[Path],
                    device: torch.device, threads: int, world: int) -> None:
    """Before step 1 of a new run: fit the GeM standardisation (``feature_norm``) and the head
    (``head_init`` teacher / pcaw) on ``head_init_images`` light views; a random head needs nothing."""
    if config.head_init == "random" and not config.feature_norm:
        return
    fit_teacher = None
    if config.head_init == "teacher":  # teacher_in_workers: load one here for the fit only
        fit_teacher = teacher or FrozenTeacher(load_teacher(config.teacher, device, threads))
    pooled, h_t = head_fit_views(student, paths, config.size, config.head_init_images, config.seed, device,
                                 fit_teacher)
    features = fit_feature_norm(student, pooled)
    if config.head_init == "teacher":
        fit = fit_head_to_teacher(student, features, h_t)
        say(f"rdcd train: head fitted to the teacher on {fit['images']} views (mean cosine {fit['fit_cosine']:.3f})")
    elif config.head_init == "pcaw":
        fit = fit_head_pcaw(student, features)
        say(f"rdcd train: head set to PCA whitening of the student's features on {fit['images']} views")
    if config.feature_norm:
        say(f"rdcd train: GeM features standardised (statistics of {len(pooled)} views)")
    if world > 1:  # every rank fitted the same seeded views; make the heads bit-identical anyway
        for tensor in (*student.fc.parameters(), *student.projector.parameters(), *student.buffers()):
            torch.distributed.broadcast(tensor.data, src=0)


@torch.no_grad()
def head_fit_views(student: StudentNet, paths: Sequence[Path], size: int, n_images: int, seed: int,
                   device: torch.device, teacher: FrozenTeacher | None = None, batch_size: int = 32
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GeM features (before any standardisation, float64) of ``n_images`` light-augmented views of the
    training images, and the teacher's features of the same views when a ``teacher`` is given.

    The images are visited in a seeded order, again and again (new views each round) when there are
    fewer images than views wanted; views come from epochs no training run reaches, so the fit never
    sees a training view. Deterministic."""
    was_training = student.training
    student.eval()
    normalize = Normalize(student.config.mean, student.config.std, device, False)
    views = build_augmentation("light", size, normalize=False)
    order = np.random.default_rng([seed, 7_777]).permutation(len(paths))
    pooled, targets, pending = [], [], []

    def flush() -> None:
        batch = torch.stack(pending)
        pooled.append(student.pooled(normalize(batch), standardized=False).double())
        if teacher is not None:
            targets.append(teacher(batch).to(device).double())
        pending.clear()

    used, rounds = 0, 0
    while used < n_images and rounds * len(paths) < 100 * n_images:  # the bound stops a pool of bad files
        for index in order:
            if used >= n_images:
                break
            try:
                image = open_image(paths[index])
            except ImageLoadError:
                continue  # named by the training loop when it meets the file
            pending.append(views(image, view_seed(seed, 10**9 + rounds, int(index))))
            used += 1
            if len(pending) == batch_size:
                flush()
        rounds += 1
    if pending:
        flush()
    student.train(was_training)
    if not pooled:
        raise RuntimeError("head initialisation: none of the training images could be decoded")
    return torch.cat(pooled), (torch.cat(targets) if teacher is not None else None)


@torch.no_grad()
def fit_feature_norm(student: StudentNet, pooled: torch.Tensor) -> torch.Tensor:
    """Fit the student's GeM standardisation (if it has one) on ``pooled``; returns fc's input."""
    if not student.config.feature_norm:
        return pooled
    student.feature_norm.fit(pooled)
    return student.feature_norm(pooled.to(student.feature_norm.mean)).double()


@torch.no_grad()
def fit_head_to_teacher(student: StudentNet, features: torch.Tensor, h_t: torch.Tensor, ridge: float = 1.0) -> dict:
    """``head_init="teacher"``: fc = ridge regression of the teacher feature h_T on fc's input
    ``features`` (penalty ``ridge`` x the mean feature variance per sample), projector = the top-d
    principal directions of the fitted h_S, centred. Returns diagnostics (cosine of the fit)."""
    mean = features.mean(0)
    x = features - mean
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    w = torch.linalg.solve(x.T @ x + ridge * len(x) * x.var(0).mean() * eye, x.T @ h_t)  # (F, D_T)
    h = x @ w + h_t.mean(0)
    bias = h_t.mean(0) - mean @ w
    h_mean = h.mean(0)
    _, _, vt = torch.linalg.svd(h - h_mean, full_matrices=False)
    dim = student.projector.out_features
    if vt.shape[0] < dim:
        raise ValueError(f"head_init='teacher' needs at least {dim} images, got {vt.shape[0]}")
    proj = vt[:dim]
    student.fc.weight.copy_(w.T.float())
    student.fc.bias.copy_(bias.float())
    student.projector.weight.copy_(proj.float())
    student.projector.bias.copy_((-proj @ h_mean).float())
    cos = F.cosine_similarity(h, h_t, dim=1).mean().item()
    return {"images": len(features), "fit_cosine": cos}

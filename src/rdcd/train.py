"""RDCD training: distil a frozen teacher into a small student with a compact descriptor.

One step (METHOD.md), per batch of B images:

    x, x'  = two augmented views (uint8)                      data
    h_T    = teacher(x)              frozen, eval, no grad    teacher
    z_S'   = momentum_student(x')    EMA update first, no grad key encoder
    h_S, z_S = student(x)                                      student (with the loss, backward, SGD step)
    L = lambda_con * (L_con + lambda_hn * L_hn) + lambda_rel * L_rel       rdcd.losses.RDCDLoss
    enqueue(all_gather(z_S'), all_gather(h_T))

The loop in ``train`` is plain Python you can step through (DINO style); the pieces it calls live
above it. The same code runs in one process (no process group) and under
``torchrun --nproc_per_node N -m rdcd train ...`` (DDP: gloo on CPU, NCCL on GPU).

Reproducibility and resuming: the data order is a permutation seeded by (seed, epoch), cut into
global batches and then per-rank slices; the views of image i in epoch e are drawn from
``view_seed(seed, e, i)``. A batch is therefore a pure function of (seed, step), whichever worker
loads it, so a run resumed from a checkpoint reproduces the batches, and with them the losses, of
an uninterrupted run.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import distributed as du
from .augment import TwoViews, build_augmentation, view_seed
from .descriptors import atomic_path
from .images import ImageLoadError, list_images, open_image
from .losses import LossConfig, RDCDLoss, descriptor_stats, effective_rank
from .models import DescriptorModel, load_model
from .models.student import (OFFLINE_PRETRAINED, StudentConfig, StudentNet, TorchImageModel, build_student,
                             load_student, save_student, shallower)

CHECKPOINT_FORMAT = "rdcd-train-checkpoint"
CHECKPOINT_VERSION = 1


# ================================================================================== configuration


@dataclass
class TrainConfig:
    """Everything that defines a training run; defaults are the paper's setting (METHOD.md)."""

    data: str = ""  # image folder (recursive) or file list, no labels
    output: str = ""  # run folder: config.json, log.csv, checkpoint.pt, model.pt
    teacher: str | DescriptorModel = "sscd"  # load_model name or file (SSCD int8 ONNX), or a model object
    student: str = "efficientnet_b0"  # timm backbone name
    pretrained: bool = False  # ImageNet init (offline weights exist for tf_efficientnet_lite0 only)
    init: str | None = None  # start from a trained student instead: shipped model name or student .pt file
    drop_blocks: list[str] = field(default_factory=list)  # residual blocks to remove ("stage.index"; with init)
    dim: int = 128  # descriptor size d
    size: int = 224  # training view size (px, square)
    eval_size: int = 288  # inference size stored in model.pt, also used by validation
    augmentations: str = "advanced"  # "advanced" (SSCD) or "light"
    # budget: epochs, unless steps is set
    epochs: int = 100
    steps: int | None = None
    warmup_epochs: float = 5.0
    warmup_steps: int | None = None  # default: warmup_epochs' share of the budget
    batch_size: int = 128  # per process; global batch = batch_size x world size (paper: 2 x 128)
    lr: float = 1.0  # per 256 images: lr = lr * global_batch / 256
    momentum: float = 0.9
    weight_decay: float = 1e-6
    key_momentum: float = 0.99  # EMA factor m of the momentum student
    # short-budget options (off = the paper): see docs/training.md "Short CPU budgets"
    bn: str = "batch"  # "batch": batch statistics (paper); "frozen": batch norm keeps its running statistics
    head_lr: float = 1.0  # learning-rate multiplier for the student's fc and projector (the new layers)
    head_init: str = "random"  # "random" (paper); "teacher": fc fitted to the teacher, projector = PCA;
    #                            "pcaw": the head whitens the student's own features (step 0 = PCA whitening)
    head_init_images: int = 1024  # views used by head_init "teacher" / "pcaw" and by feature_norm
    feature_norm: bool = False  # standardise the GeM features before fc (fitted on those views before step 1)
    loss: LossConfig = field(default_factory=LossConfig)
    seed: int = 0
    # how to run it (may change when resuming)
    workers: int | None = None  # DataLoader processes per rank (default: half the rank's cores, at least 1)
    teacher_in_workers: bool = False  # compute h_T inside the DataLoader workers (CPU teachers)
    threads: int | None = None  # torch / ONNX Runtime threads per rank (default: the rank's cores)
    amp: str = "auto"  # auto (bf16/fp16 on GPU, off on CPU), bf16, fp16, off
    channels_last: bool = True
    log_every: int = 10
    checkpoint_every: int = 1000
    val_benchmark: str | None = None  # DISC-like folder: queries/, references/, ground_truth.csv
    val_every: int = 1000
    val_batch_size: int = 32
    stop_at: int | None = None  # end this invocation after this step (schedule unchanged); --resume continues
    max_seconds: float | None = None  # end this invocation (checkpoint written) once training ran this long
    tensorboard: bool = True  # also write TensorBoard events when tensorboard is installed

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["loss"] = LossConfig(**d.get("loss", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training config keys {sorted(unknown)}")
        return cls(**d)


#: fields that say how to run, not what to compute: a resumed run may change them
RUN_CONTROL_FIELDS = {"workers", "teacher_in_workers", "threads", "log_every", "checkpoint_every",
                      "val_benchmark", "val_every", "val_batch_size", "stop_at", "max_seconds", "tensorboard",
                      "output"}


@dataclass
class Schedule:
    """The budget resolved against the data and the number of processes."""

    n_images: int
    world_size: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    lr: float  # peak learning rate (after warm-up)


def resolve_schedule(config: TrainConfig, n_images: int, world_size: int) -> Schedule:
    global_batch = config.batch_size * world_size
    steps_per_epoch = n_images // global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"{config.data}: {n_images} images cannot fill one global batch of {global_batch} "
                         f"({config.batch_size} per process x {world_size}); use a smaller --batch-size")
    total = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    if total < 1:
        raise ValueError("the training budget is empty: give --steps N or --epochs E with N, E >= 1")
    if config.warmup_steps is not None:
        warmup = config.warmup_steps
    elif config.steps is not None:  # same share of the budget as the paper's 5 of 100 epochs
        warmup = round(total * config.warmup_epochs / config.epochs)
    else:
        warmup = round(config.warmup_epochs * steps_per_epoch)
    return Schedule(n_images, world_size, global_batch, steps_per_epoch, total, min(warmup, total),
                    config.lr * global_batch / 256)


class WarmupCosine:
    """LR factor for step s (0-based): linear warm-up to 1 over ``warmup`` steps, then cosine to 0."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ================================================================================== data


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the n images (same on every rank)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class SeededBatches:
    """This rank's batches of (epoch, image index), from global step ``start`` to ``stop``.

    Global step s belongs to epoch s // steps_per_epoch and takes the global batch at position
    s % steps_per_epoch of that epoch's order (the incomplete last batch is dropped); rank r takes
    slice r of it. Like DistributedSampler, but a function of (seed, step) only.
    """

    def __init__(self, n_images: int, batch_size: int, seed: int, start: int, stop: int,
                 rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n_images, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world_size
        self.steps_per_epoch = n_images // (batch_size * world_size)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def batch(self, step: int, order: np.ndarray | None = None) -> list[tuple[int, int]]:
        epoch, position = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.seed, epoch, self.n) if order is None else order
        first = (position * self.world + self.rank) * self.batch_size
        return [(epoch, int(i)) for i in order[first:first + self.batch_size]]

    def __iter__(self):
        epoch, order = None, None
        for step in range(self.start, self.stop):
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                order = epoch_order(self.seed, epoch, self.n)
            yield self.batch(step, order)


class TwoViewImages(Dataset):
    """Item (epoch, index) -> (index, view x, view x', failures): two uint8 views of one image.

    A file that cannot be decoded is skipped: the next file in the list that decodes takes its
    place (views still drawn from the seed of the original index, so the batch stays a function of
    the step and keeps its size, which the cross-process batch shuffle needs). The skipped files
    travel with the batch so the loop can report them.
    """

    def __init__(self, paths: Sequence[Path], views: TwoViews, seed: int):
        self.paths, self.views, self.seed = list(paths), views, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        failures = []
        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            try:
                image = open_image(path)
            except ImageLoadError as e:
                failures.append((str(path), e.reason))
                continue
            view1, view2 = self.views(image, view_seed(self.seed, epoch, index))
            return index, view1, view2, failures
        raise RuntimeError(f"none of the {len(self.paths)} training images could be decoded")


class ViewBatch(NamedTuple):
    indices: torch.Tensor  # (B,) image indices
    view1: torch.Tensor  # (B, 3, S, S) uint8: student and teacher input
    view2: torch.Tensor  # (B, 3, S, S) uint8: momentum student input
    teacher_features: torch.Tensor | None  # (B, D_T) when computed in the DataLoader worker
    teacher_seconds: float
    failures: list  # [(path, reason)] files skipped while making this batch


class CollateViews:
    """Stacks the views; with ``teacher`` (a load_model spec) also runs the frozen teacher on view x,
    so that on CPU the teacher works in the DataLoader processes while the main process trains."""

    def __init__(self, teacher: str | None = None):
        self.teacher_spec = teacher
        self._teacher: FrozenTeacher | None = None  # loaded lazily, once per worker process

    def __call__(self, items) -> ViewBatch:
        indices, view1, view2, failures = zip(*items)
        view1 = torch.stack(view1)
        features, seconds = None, 0.0
        if self.teacher_spec is not None:
            if self._teacher is None:
                self._teacher = FrozenTeacher(load_teacher(self.teacher_spec, torch.device("cpu"), threads=1))
            start = time.perf_counter()
            features = self._teacher(view1)
            seconds = time.perf_counter() - start
        return ViewBatch(torch.tensor(indices), view1, torch.stack(view2), features, seconds,
                         [f for batch_failures in failures for f in batch_failures])


def paths_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode() + b"\0")
    return h.hexdigest()[:16]


# ================================================================================== networks


def load_teacher(spec: str | os.PathLike | DescriptorModel, device: torch.device, threads: int | None = None
                 ) -> DescriptorModel:
    """A teacher by load_model name or file; torch models on ``device``, ONNX with ``threads`` threads."""
    if isinstance(spec, DescriptorModel):
        return spec
    text = str(spec)
    if text.startswith("student:") or text.endswith((".pt", ".pth")):
        return load_model(text, device=device)
    try:
        return load_model(text, threads=threads)
    except TypeError:  # a model whose constructor takes no thread count
        return load_model(text)


class FrozenTeacher:
    """The teacher in eval mode without gradients: uint8 views (B, 3, H, W) -> features (B, D_T).

    The teacher sees the same view as the student, before any normalisation: an ONNX teacher gets
    the uint8 pixels (its graph normalises), a torch teacher its own mean/std (``to_input``).
    """

    def __init__(self, model: DescriptorModel, autocast_dtype: torch.dtype | None = None):
        self.model = model
        self.dim = int(model.dim)
        self.autocast_dtype = autocast_dtype
        if isinstance(model, TorchImageModel):
            model.module.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        images = views.permute(0, 2, 3, 1).cpu().numpy()  # uint8 NHWC, the DescriptorModel input
        if isinstance(self.model, TorchImageModel):
            device_type = self.model.device.type
            with torch.autocast(device_type, dtype=self.autocast_dtype or torch.bfloat16,
                                enabled=self.autocast_dtype is not None):
                return self.model.module(self.model.to_input(images)).float()
        return torch.from_numpy(self.model.embed(images))


class StudentFeatures(nn.Module):
    """``forward`` = the student's (h_S, z_S), so DistributedDataParallel sees both outputs."""

    def __init__(self, net: StudentNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.forward_features(x)


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose gradient is the sum of the processes' gradients (as SyncBatchNorm's)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """Batch norm over the global batch of all processes, for any backend (gloo included).

    ``torch.nn.SyncBatchNorm`` only runs on accelerators; this is the same computation written with
    an autograd-aware all-reduce of the per-channel sum, sum of squares and count. Also stands in
    for timm's BatchNormAct2d (its ``drop`` and ``act`` are applied after the norm). Outside
    training, or without a process group, it is an ordinary BatchNorm2d.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.drop: nn.Module = nn.Identity()
        self.act: nn.Module = nn.Identity()

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Replace every BatchNorm2d (and timm BatchNormAct2d) in ``module``, keeping weights and names."""
        if isinstance(module, nn.BatchNorm2d) and not isinstance(module, cls):
            if module.momentum is None or not module.affine or not module.track_running_stats:
                raise ValueError("GlobalBatchNorm2d converts affine batch norms with running stats and a momentum")
            new = cls(module.num_features, module.eps, module.momentum)
            new.drop = getattr(module, "drop", nn.Identity())
            new.act = getattr(module, "act", nn.Identity())
            new.load_state_dict(module.state_dict())
            new.train(module.training)
            return new.to(module.weight.device)
        for name, child in module.named_children():
            setattr(module, name, cls.convert(child))
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and du.is_distributed()):
            return self.act(self.drop(super().forward(x)))
        channels = x.shape[1]
        xf = x.float()
        count = torch.full((1,), x.numel() / channels, dtype=xf.dtype, device=x.device)
        totals = _AllReduceSum.apply(torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count]))
        n = totals[-1]
        mean = totals[:channels] / n
        var = (totals[channels:2 * channels] / n - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), self.momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)
        y = (xf - mean[None, :, None, None]) * scale[None, :, None, None] + self.bias[None, :, None, None]
        return self.act(self.drop(y.to(x.dtype)))


def sync_batchnorm(net: nn.Module, device: torch.device) -> nn.Module:
    """Batch norm over the global batch: native SyncBatchNorm on GPU, GlobalBatchNorm2d on CPU."""
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm  # keeps timm's fused norm+activation layers

        return convert_sync_batchnorm(net)
    return GlobalBatchNorm2d.convert(net)


HEAD_INITS = ("random", "teacher", "pcaw")


def check_config(config: TrainConfig) -> None:
    """Settings that contradict each other, refused before anything is loaded."""
    if config.head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {', '.join(HEAD_INITS)}, not {config.head_init!r}")
    if not config.loss.use_rel and config.head_init == "teacher":
        raise ValueError("--no-rel trains the teacher-free baseline, but --head-init teacher fits the head to the "
                         "teacher: use --head-init random or pcaw")
    if config.init and config.feature_norm:
        raise ValueError("--feature-norm builds a new student's head; with --init the trained student keeps its own")


def initialise_head(student: StudentNet, config: TrainConfig, teacher: "FrozenTeacher | None", paths: Sequence[Path],
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
        _log(f"rdcd train: head fitted to the teacher on {fit['images']} views (mean cosine {fit['fit_cosine']:.3f})")
    elif config.head_init == "pcaw":
        fit = fit_head_pcaw(student, features)
        _log(f"rdcd train: head set to PCA whitening of the student's features on {fit['images']} views")
    if config.feature_norm:
        _log(f"rdcd train: GeM features standardised (statistics of {len(pooled)} views)")
    if world > 1:  # every rank fitted the same seeded views; make the heads bit-identical anyway
        for tensor in (*student.fc.parameters(), *student.projector.parameters(), *student.buffers()):
            torch.distributed.broadcast(tensor.data, src=0)


@torch.no_grad()
def head_fit_views(student: StudentNet, paths: Sequence[Path], size: int, n_images: int, seed: int,
                   device: torch.device, teacher: "FrozenTeacher | None" = None, batch_size: int = 32
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


@torch.no_grad()
def fit_head_pcaw(student: StudentNet, features: torch.Tensor) -> dict:
    """``head_init="pcaw"``: fc = PCA whitening of its input ``features`` to kd_dim (centred,
    unit variance per component, components by decreasing variance), projector = the first d of
    those components. At step 0 the descriptor is then exactly PCA whitening of the student's own
    features to d dimensions (``rdcd.postprocess.PCAWhitening``), the untrained baseline; no
    teacher is involved."""
    from .postprocess import PCAWhitening

    kd, dim = student.fc.out_features, student.projector.out_features
    if len(features) <= kd:
        raise ValueError(f"head_init='pcaw' whitens to kd_dim {kd}: it needs more than {kd} views "
                         f"(--head-init-images), got {len(features)}")
    whitening = PCAWhitening(kd).fit(features.cpu().numpy())
    projection = torch.from_numpy(whitening.projection_).double()  # (F, kd)
    mean = torch.from_numpy(whitening.mean_).double()
    student.fc.weight.copy_(projection.T.float())
    student.fc.bias.copy_((-mean @ projection).float())
    student.projector.weight.copy_(torch.eye(dim, kd))
    student.projector.bias.zero_()
    return {"images": len(features)}


def upgrade_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """Checkpoints from before the backbone/head groups hold one parameter group; split it (its
    parameter order, backbone first, is the groups' order), so such runs still resume."""
    if len(state["param_groups"]) != 1 or len(optimizer.param_groups) != 2:
        return state
    group = state["param_groups"][0]
    n_body = len(optimizer.param_groups[0]["params"])
    body = dict(group, params=group["params"][:n_body])
    head = dict(group, params=group["params"][n_body:])
    return {"state": state["state"], "param_groups": [body, head]}


def upgrade_scheduler_state(state: dict, scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict:
    """The scheduler half of ``upgrade_optimizer_state``: one base LR per group, the current
    factor of the schedule kept (a one-group state would stop LambdaLR at its next step)."""
    n = len(scheduler.base_lrs)
    if len(state.get("base_lrs", ())) != 1 or n == 1:
        return state
    factor = state["_last_lr"][0] / state["base_lrs"][0] if state["base_lrs"][0] else 0.0
    return dict(state, base_lrs=list(scheduler.base_lrs), _last_lr=[b * factor for b in scheduler.base_lrs])


def parameter_groups(student: nn.Module, lr: float, head_lr: float) -> list[dict]:
    """SGD groups: the backbone at ``lr``, the new layers (fc, projector, a learnable GeM p) at
    ``lr * head_lr``. LambdaLR scales every group by the same warm-up/cosine factor."""
    head = [p for n, p in student.named_parameters() if not n.startswith("backbone.")]
    body = [p for n, p in student.named_parameters() if n.startswith("backbone.")]
    return [{"params": body, "lr": lr}, {"params": head, "lr": lr * head_lr}]


def set_train_mode(net: nn.Module, bn: str) -> None:
    """Training mode; with ``bn="frozen"`` every batch norm stays in eval mode (running statistics
    used and kept, affine parameters still trained), the usual fine-tuning choice for small batches."""
    if bn not in ("batch", "frozen"):
        raise ValueError(f"bn must be 'batch' or 'frozen', not {bn!r}")
    net.train()
    if bn == "frozen":
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


@torch.no_grad()
def momentum_update(key_encoder: nn.Module, student: nn.Module, m: float) -> None:
    """key <- m * key + (1 - m) * student, parameters only (MoCo)."""
    key_params = list(key_encoder.parameters())
    torch._foreach_mul_(key_params, m)
    torch._foreach_add_(key_params, list(student.parameters()), alpha=1.0 - m)


class Normalize:
    """uint8 (B, 3, H, W) on any device -> float, (x/255 - mean) / std, on ``device``."""

    def __init__(self, mean, std, device: torch.device, channels_last: bool):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
        self.device, self.channels_last = device, channels_last

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.to(self.device, non_blocking=True).float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@torch.no_grad()
def encode_keys(key_encoder: nn.Module, views: torch.Tensor, normalize: Normalize, shuffle: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Momentum-student keys z_S' of view x': (this rank's keys, all ranks' keys in rank order).

    Across processes the global batch is shuffled before the key encoder and unshuffled after
    (MoCo's shuffled BN): each rank normalises a random mix of images, so batch statistics cannot
    tell a query which key is its positive. ``shuffle`` must give the same permutation on every rank.
    """
    world = du.world_size()
    if world == 1:
        keys = key_encoder(normalize(views)).float()
        return keys, keys
    everyone = du.concat_all_gather(views.to(normalize.device))
    order = torch.randperm(len(everyone), generator=shuffle).to(everyone.device)
    mine = order.view(world, -1)[du.rank()]
    shuffled_keys = du.concat_all_gather(key_encoder(normalize(everyone[mine])).float())
    keys = torch.empty_like(shuffled_keys)
    keys[order] = shuffled_keys
    batch = views.shape[0]
    return keys[du.rank() * batch:(du.rank() + 1) * batch], keys


def replica_digest(student: nn.Module, key_encoder: nn.Module) -> str:
    """sha256 of what must be equal on every rank: the student's parameters and buffers (its batch
    norm is synchronised) and the momentum student's parameters (its batch-norm running statistics
    are per rank, from its shuffled share of the batch, and never used)."""
    h = hashlib.sha256()
    tensors = list(student.state_dict().items()) + [("key." + n, p) for n, p in key_encoder.named_parameters()]
    for name, tensor in tensors:
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ================================================================================== timing and logging


class StopWatch:
    """Seconds since the previous ``lap`` (synchronising the GPU first, so each lap is its own work)."""

    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.last = time.perf_counter()

    def lap(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


TIME_KEYS = ("data", "teacher", "key", "student")
#: what validate() returns that the log keeps, as val_<key>
VAL_KEYS = ("uAP", "recall_at_p90", "acc_at_1", "recall_at_10", "n_gt", "seconds", "pos_cos", "hardest_neg_cos", "hn")
LOG_COLUMNS = (
    "step", "epoch", "lr", "loss", "con", "hn", "rel",
    "pos_cos", "neg_cos", "hardest_neg_cos", "eff_rank", "teacher_cos",
    "images_per_s", "t_data", "t_teacher", "t_key", "t_student", "t_step",
) + tuple(f"val_{k}" for k in VAL_KEYS)


class RunLog:
    """log.csv (one row per logged step, one per validation) and, when installed, TensorBoard."""

    def __init__(self, output: Path, resume_step: int | None, tensorboard: bool):
        self.path = output / "log.csv"
        if resume_step is not None and self.path.exists():
            self._truncate(resume_step)
        else:
            with open(self.path, "w", newline="") as fh:
                csv.writer(fh).writerow(LOG_COLUMNS)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=(resume_step or 0) + 1)

    def _truncate(self, step: int) -> None:
        """Drop rows of steps after the checkpoint: the resumed run logs them again."""
        with open(self.path, newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows or not set(rows[0]) <= set(LOG_COLUMNS) or rows[0][0] != "step":
            raise ValueError(f"{self.path}: not a log of this rdcd version (unexpected header); move it away to resume")
        old = rows[0]  # a log of an older version has fewer columns: widen its rows, empty cells for the new ones
        kept = [list(LOG_COLUMNS)] + [[dict(zip(old, r)).get(c, "") for c in LOG_COLUMNS]
                                      for r in rows[1:] if r and int(r[0]) <= step]
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="") as fh:
                csv.writer(fh).writerows(kept)

    def write(self, row: dict) -> None:
        unknown = set(row) - set(LOG_COLUMNS)
        if unknown:
            raise KeyError(f"not log columns: {sorted(unknown)}")
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow([_format(row.get(c)) for c in LOG_COLUMNS])
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.9g}"
    return str(value)


def read_log(path: str | os.PathLike) -> list[dict]:
    """log.csv -> rows as dicts of floats (empty cells: None), step as int."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: (int(v) if k == "step" else float(v)) if v != "" else None for k, v in r.items()} for r in rows]


# ================================================================================== validation


def validate(net: StudentNet, benchmark: str | os.PathLike, size: int, batch_size: int = 32,
             device: torch.device | str = "cpu") -> dict | None:
    """DISC2021 metrics of the student on a benchmark folder (k = 10 nearest references, inner product).

    Runs on every rank (extraction is shared out); returns the metrics on rank 0, None elsewhere.
    Nothing is cached between calls: images are decoded again each time.
    """
    from .extract import extract
    from .metrics import evaluate, read_ground_truth, separation
    from .models.student import StudentModel
    from .search import Index, knn_pairs

    bench = Path(benchmark)
    threads = torch.get_num_threads()  # extract() sets its own
    model = StudentModel(copy.deepcopy(net).float(), device=device)
    start = time.perf_counter()
    queries = extract(model, bench / "queries", size=size, batch_size=batch_size, progress=False)
    references = extract(model, bench / "references", size=size, batch_size=batch_size, progress=False)
    torch.set_num_threads(threads)
    if not du.is_main():
        return None
    index = Index.build(references.ids, references.vectors)
    ground_truth = read_ground_truth(bench / "ground_truth.csv")
    metrics = evaluate(knn_pairs(queries.ids, queries.vectors, index, k=10), ground_truth)
    metrics.update(separation(queries.ids, queries.vectors, references.ids, references.vectors, ground_truth))
    metrics["seconds"] = time.perf_counter() - start
    return metrics


def check_benchmark(benchmark: str | os.PathLike) -> None:
    bench = Path(benchmark)
    missing = [p for p in ("queries", "references", "ground_truth.csv") if not (bench / p).exists()]
    if missing:
        raise FileNotFoundError(f"{bench}: not a benchmark folder, missing {', '.join(missing)} "
                                "(expected queries/, references/ and ground_truth.csv, e.g. `rdcd make-benchmark`)")


# ================================================================================== checkpoints


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: Path, **state) -> None:
    """Atomic torch.save of the whole training state (rank 0 only)."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    with atomic_path(path, ".pt") as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict:
    # the checkpoint holds RNG states and the config as plain Python objects: trusted, our own file
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an rdcd training checkpoint")
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {payload['version']} is newer than this rdcd")
    return payload


def student_from_init(config: TrainConfig, teacher_dim: int) -> StudentNet:
    """The student ``config.init`` (a shipped model name or a student file) with ``config.drop_blocks``
    removed as well, its weights carried over; it must match ``--student``, ``--dim`` and the teacher."""
    from .models import model_file

    path = model_file(config.init) or Path(config.init)
    if not path.is_file():
        raise FileNotFoundError(f"--init {config.init}: neither a shipped model name nor a file")
    try:
        source = load_student(path)
    except Exception as e:  # torch.load raises many kinds (UnpicklingError, KeyError, EOFError, ...)
        raise ValueError(f"--init {path}: not an rdcd student model file ({type(e).__name__}: {e})") from e
    wanted = {"backbone": config.student, "dim": config.dim, "kd_dim": teacher_dim}
    differ = [f"{k} {getattr(source.config, k)!r} (asked: {v!r})" for k, v in wanted.items()
              if getattr(source.config, k) != v]
    if differ:
        raise ValueError(f"--init {path}: the student has " + ", ".join(differ)
                         + "; pass the matching --student and --dim (kd_dim must equal the teacher's dimension)")
    again = sorted(set(config.drop_blocks) & set(source.config.drop_blocks))
    if again:
        _log(f"rdcd train: warning: --init {path} has no block(s) {', '.join(again)} already")
    if source.config.input_size != config.eval_size:
        _log(f"rdcd train: warning: --init {path} was made for {source.config.input_size} px; this run validates "
             f"and saves it for {config.eval_size} px (--eval-size)")
    shallow = bool(config.drop_blocks or source.config.drop_blocks)
    target = shallower(source, config.drop_blocks, input_size=config.eval_size, extra={},
                       name=f"rdcd-{config.student}{'-shallow' if shallow else ''}-{config.dim}")
    _log(f"rdcd train: starting from {path}" + (f" without block(s) {', '.join(config.drop_blocks)}"
                                               if config.drop_blocks else ""))
    return target


def config_record(config: TrainConfig) -> dict:
    """The config as plain data (for config.json and checkpoints); a teacher object is named."""
    record = dataclasses.asdict(config)
    if isinstance(config.teacher, DescriptorModel):
        record["teacher"] = f"<{type(config.teacher).__name__} {config.teacher.name}>"
    return record


def config_differences(saved: dict, new: dict) -> list[str]:
    """Settings (config records) that differ, except those a resumed run may change. Fields added
    after a checkpoint was written count as their defaults (those reproduce the older behaviour)."""
    saved = {**config_record(TrainConfig()), **saved}
    return [f"{k}: {saved.get(k)!r} in the checkpoint, {new.get(k)!r} now" for k in sorted(set(saved) | set(new))
            if k not in RUN_CONTROL_FIELDS and saved.get(k) != new.get(k)]


def write_skipped(output: Path, skipped: dict[str, str]) -> None:
    if not skipped:
        return
    with atomic_path(output / "skipped_files.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "reason"])
            w.writerows(sorted(skipped.items()))


# ================================================================================== the loop


@dataclass
class TrainResult:
    output: Path
    model_path: Path | None  # None when the run stopped early (stop_at)
    step: int
    total_steps: int
    summary: dict


def _autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"amp must be auto, bf16, fp16 or off, not {amp!r}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _machine() -> str:
    from .bench import machine_description

    return machine_description()


def _log(message: str) -> None:
    if du.is_main():
        print(message, flush=True)


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Train an RDCD student; writes config.json, log.csv, checkpoint.pt and model.pt under config.output.

    ``resume``: continue from ``output/checkpoint.pt`` exactly where it was written (the settings that
    define the run must match; see RUN_CONTROL_FIELDS for those that may change). Without a
    checkpoint the run starts from scratch.
    """
    # ---------------------------------------------------------------- processes, devices, threads
    du.init_distributed()
    device = du.default_device()
    rank, world = du.rank(), du.world_size()
    threads = config.threads or du.cpu_threads_per_process()
    torch.set_num_threads(threads)
    autocast_dtype = _autocast_dtype(config.amp, device)
    if not config.output:
        raise ValueError("no output folder given (--output RUN_DIR)")
    output = Path(config.output)
    check_config(config)
    if config.val_benchmark:
        check_benchmark(config.val_benchmark)
    checkpoint_path = output / "checkpoint.pt"
    if not resume and (checkpoint_path.exists() or (output / "log.csv").exists()):
        raise ValueError(f"{output} already holds a run; pass --resume to continue it or choose a new --output")
    checkpoint = load_checkpoint(checkpoint_path) if resume and checkpoint_path.exists() else None
    if checkpoint is not None:
        differences = config_differences(checkpoint["config"], config_record(config))
        if differences:
            raise ValueError(f"{checkpoint_path}: cannot resume with different settings:\n  " + "\n  ".join(differences))
    elif resume:
        _log(f"rdcd train: no checkpoint in {output}, starting from scratch")
    # every rank must take the same branch below (head fit, collectives): refuse if their files disagree
    steps_found = du.all_gather_objects(None if checkpoint is None else checkpoint["step"])
    if len(set(steps_found)) > 1:
        raise RuntimeError(f"{checkpoint_path}: the processes see different checkpoints (step per rank: {steps_found}); "
                           "the output folder must be on storage every process shares")

    # ---------------------------------------------------------------- data
    paths = list_images(config.data)
    schedule = resolve_schedule(config, len(paths), world)
    if checkpoint is not None and checkpoint["data_digest"] != paths_digest(paths):
        raise ValueError(f"{config.data}: the image list differs from the one the checkpoint was trained on")
    start_step = checkpoint["step"] if checkpoint is not None else 0
    stop_step = min(schedule.total_steps, config.stop_at or schedule.total_steps)

    # ---------------------------------------------------------------- networks
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    workers = config.workers if config.workers is not None else max(1, threads // 2)
    # the teacher-free baseline (L_rel off) never runs the teacher; kd_dim then keeps its default
    teacher_free = not config.loss.use_rel
    # an ONNX teacher runs on the CPU cores even beside a GPU: in the data workers it overlaps the student
    onnx_teacher = not str(config.teacher).startswith("student:") and not str(config.teacher).endswith((".pt", ".pth"))
    teacher_in_workers = (config.teacher_in_workers and workers > 0 and not teacher_free
                          and (device.type == "cpu" or onnx_teacher))
    teacher = None if teacher_free else FrozenTeacher(load_teacher(config.teacher, device, threads), autocast_dtype)
    teacher_dim = StudentConfig.kd_dim if teacher is None else teacher.dim
    if teacher_in_workers:
        if isinstance(config.teacher, DescriptorModel):
            raise ValueError("teacher_in_workers needs the teacher as a name or file, which each worker loads")
        teacher = None  # the workers load their own; free this one before they fork
    if config.bn == "frozen" and not (config.pretrained or config.init):
        _log("rdcd train: warning: --bn frozen without pretrained weights keeps batch norm at its initial "
             "statistics (mean 0, variance 1), i.e. no normalisation; it is meant for ImageNet-initialised students")
    if config.init and config.pretrained:
        raise ValueError("--init and --pretrained both set the starting weights: give one of them")
    if config.pretrained and config.student not in OFFLINE_PRETRAINED:
        raise ValueError(f"no offline ImageNet weights for {config.student!r} (available: {sorted(OFFLINE_PRETRAINED)}); "
                         "use --no-pretrained")
    if config.drop_blocks and not config.init:
        raise ValueError("--drop-blocks makes a shallower copy of a trained student: give it with --init MODEL")
    if checkpoint is not None and "student_config" in checkpoint:
        # resuming: the checkpoint holds the architecture and the weights (an --init file may be gone)
        student = StudentNet(StudentConfig.from_dict(checkpoint["student_config"]))
    elif config.init:
        student = student_from_init(config, teacher_dim)
        if config.head_init == "teacher":
            _log("rdcd train: --head-init teacher does not apply with --init: the heads come from the trained student")
    else:  # a new run, or a checkpoint written before checkpoints held the architecture
        student = build_student(config.student, dim=config.dim, kd_dim=teacher_dim, input_size=config.eval_size,
                                pretrained=config.pretrained, name=f"rdcd-{config.student}-{config.dim}",
                                feature_norm=config.feature_norm)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    student = student.to(device, memory_format=memory_format)
    if checkpoint is None and not config.init:  # init: its heads and standardisation are trained
        initialise_head(student, config, teacher, paths, device, threads, world)
    key_encoder = copy.deepcopy(student).requires_grad_(False)  # plain BN: shuffled across ranks instead
    if world > 1:
        student = sync_batchnorm(student, device)
    criterion = RDCDLoss(config.dim, teacher_dim, config.loss).to(device)
    normalize = Normalize(student.config.mean, student.config.std, device, config.channels_last)

    features = StudentFeatures(student)
    if world > 1:
        features = nn.parallel.DistributedDataParallel(
            features, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not (config.loss.use_con or config.loss.use_hn))  # L_rel alone skips the projector
    optimizer = torch.optim.SGD(parameter_groups(student, schedule.lr, config.head_lr), lr=schedule.lr,
                                momentum=config.momentum, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(schedule.warmup_steps, schedule.total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    skipped: dict[str, str] = {}

    if checkpoint is not None:
        student.load_state_dict(checkpoint["student"])
        key_encoder.load_state_dict(checkpoint["key_encoder"])
        criterion.load_state_dict(checkpoint["criterion"])
        optimizer.load_state_dict(upgrade_optimizer_state(checkpoint["optimizer"], optimizer))
        scheduler.load_state_dict(upgrade_scheduler_state(checkpoint["scheduler"], scheduler))
        scaler.load_state_dict(checkpoint["scaler"])
        skipped = dict(checkpoint["skipped"])
        rng_states = checkpoint["rng"]
        set_rng_state(rng_states[rank] if rank < len(rng_states) else rng_states[0])
        _log(f"rdcd train: resumed {output} at step {start_step} of {schedule.total_steps}")
    set_train_mode(student, config.bn)
    set_train_mode(key_encoder, config.bn)  # batch statistics for the keys too, as MoCo (bn="batch")

    resolved = {"world_size": world, "global_batch": schedule.global_batch, "lr": schedule.lr,
                "total_steps": schedule.total_steps, "warmup_steps": schedule.warmup_steps,
                "steps_per_epoch": schedule.steps_per_epoch, "n_images": schedule.n_images,
                "teacher_dim": teacher_dim, "device": str(device), "threads_per_rank": threads,
                "workers_per_rank": workers, "teacher_in_workers": teacher_in_workers,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"), "argv": sys.argv,
                "autocast": str(autocast_dtype).replace("torch.", "") if autocast_dtype else "off",
                "student_normalization": {"mean": list(student.config.mean), "std": list(student.config.std)},
                "versions": {"python": platform.python_version(), "torch": torch.__version__},
                "host": platform.node(), "cpu_count": os.cpu_count(), "machine": _machine()}
    if du.is_main():
        output.mkdir(parents=True, exist_ok=True)
        run_info = {"config": config_record(config), "resolved": resolved}
        if checkpoint is None:
            run_info["started"] = datetime.datetime.now().isoformat(timespec="seconds")
            with atomic_path(output / "config.json") as tmp:
                tmp.write_text(json.dumps(run_info, indent=2) + "\n")
        log = RunLog(output, start_step if checkpoint is not None else None, config.tensorboard)

    # ---------------------------------------------------------------- loader
    views = TwoViews(build_augmentation(config.augmentations, config.size, normalize=False))
    loader = DataLoader(
        TwoViewImages(paths, views, config.seed),
        batch_sampler=SeededBatches(len(paths), config.batch_size, config.seed, start_step, stop_step, rank, world),
        num_workers=workers,
        collate_fn=CollateViews(str(config.teacher) if teacher_in_workers else None),
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )

    def checkpoint_now(step: int) -> None:
        rng_states = du.gather_objects_to_main(rng_state())
        all_skipped = du.gather_objects_to_main(skipped)
        if du.is_main():
            merged = {path: reason for part in all_skipped for path, reason in part.items()}
            save_checkpoint(checkpoint_path, step=step, config=config_record(config),
                            data_digest=paths_digest(paths), student=student.state_dict(),
                            student_config=dataclasses.asdict(student.config),
                            key_encoder=key_encoder.state_dict(), criterion=criterion.state_dict(),
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            scaler=scaler.state_dict(), rng=rng_states, skipped=merged)
            write_skipped(output, merged)
        du.barrier()

    val_history = []

    def validate_now(step: int) -> None:
        metrics = validate(student, config.val_benchmark, config.eval_size, config.val_batch_size, device)
        if du.is_main():
            row = {"step": step, "epoch": step / schedule.steps_per_epoch,
                   **{f"val_{k}": metrics[k] for k in VAL_KEYS}}
            log.write(row)
            val_history.append(row)
            _log(f"step {step:>6}  validation on {config.val_benchmark}: uAP {metrics['uAP']:.4f}  "
                 f"acc@1 {metrics['acc_at_1']:.4f}  copy cos {metrics['pos_cos']:.3f}  hardest non-copy cos "
                 f"{metrics['hardest_neg_cos']:.3f}  L_hn {metrics['hn']:.3f}  ({metrics['n_gt']} true pairs, "
                 f"{metrics['seconds']:.0f} s)")

    _log(f"rdcd train: {schedule.n_images} images, {world} process(es) x batch {config.batch_size} = "
         f"{schedule.global_batch}, {schedule.total_steps} steps ({schedule.steps_per_epoch}/epoch, "
         f"{schedule.warmup_steps} warm-up), lr {schedule.lr:g}, teacher {config_record(config)['teacher']} "
         f"({teacher_dim}-d)"
         f"{' in the data workers' if teacher_in_workers else ''}, student {config.student} -> "
         f"{config.dim}-d, {config.size}px, {workers} data worker(s), {threads} thread(s), device {device}")
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1)
    if device.type == "cpu" and busy and "OMP_WAIT_POLICY" not in os.environ:
        _log("rdcd train: hint: the CPU is already busy; OMP_WAIT_POLICY=PASSIVE in the environment stops OpenMP "
             "threads busy-waiting for a core (2.6x faster steps on 2 overloaded cores, docs/training.md)")
    if config.val_benchmark and start_step == 0:
        validate_now(0)

    # ---------------------------------------------------------------- train
    clock = StopWatch(device)
    window = {k: 0.0 for k in TIME_KEYS + ("step",)}  # seconds since the last log row, per component
    window_steps = 0
    totals = {k: 0.0 for k in TIME_KEYS + ("step",)}  # for the summary, first step (start-up) left out
    totals_steps = 0
    last_row: dict = {}
    batches = iter(loader)
    step = start_step
    loop_start = time.perf_counter()
    autocast = torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)
    for step in range(start_step + 1, stop_step + 1):
        clock.lap()
        step_start = clock.last
        times = {}
        batch: ViewBatch = next(batches)  # ------------------------------ data
        for path, reason in batch.failures:
            if path not in skipped:
                print(f"rdcd train: skipped {path}: {reason}", file=sys.stderr, flush=True)
            skipped[path] = reason
        times["data"] = clock.lap()

        if teacher_free:  # ---------------------------------------------- teacher on view x
            h_t, times["teacher"] = None, 0.0
        elif teacher is not None:
            h_t = teacher(batch.view1).to(device).float()
            times["teacher"] = clock.lap()
        else:  # computed by the data worker, alongside loading
            h_t = batch.teacher_features.to(device).float()
            times["teacher"] = batch.teacher_seconds

        momentum_update(key_encoder, student, config.key_momentum)  # -- momentum student on view x'
        with autocast:
            shuffle = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            z_key, z_key_all = encode_keys(key_encoder, batch.view2, normalize, shuffle)
        times["key"] = clock.lap()

        with autocast:  # ---------------------------------------------- student on view x, loss, SGD
            h_s, z_s = features(normalize(batch.view1))
        image_ids = batch.indices.to(device)
        terms = criterion(z_s.float(), z_key, h_s.float(), h_t, image_ids)
        lr = optimizer.param_groups[0]["lr"]  # the backbone's (the head's is head_lr times it)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if not math.isfinite(terms["loss"].item()):
            raise RuntimeError(f"step {step}: the loss is {terms['loss'].item()} "
                                     f"({ {k: v.item() for k, v in terms.items()} }); lower --lr")
        log_now = step % config.log_every == 0 or step == stop_step
        if log_now:  # diagnostics against the queue this step's loss saw
            z_s_all = du.concat_all_gather(z_s.detach().float())
            diagnostics = descriptor_stats(z_s_all, z_key_all, criterion.key_queue.features())
            diagnostics["eff_rank"] = effective_rank(z_s_all)
            # distillation progress: how close h_S comes to its own teacher feature (same 512-d space)
            if h_t is not None:
                teacher_cos = F.cosine_similarity(h_s.detach().float(), h_t, dim=1)
                diagnostics["teacher_cos"] = du.concat_all_gather(teacher_cos).mean().item()
        # keys, teacher features and image ids of the global batch, in rank order (encode_keys' order)
        criterion.enqueue(z_key_all, None if h_t is None else du.concat_all_gather(h_t),
                          du.concat_all_gather(image_ids))
        times["student"] = clock.lap()
        times["step"] = clock.last - step_start  # wall time; validation and checkpoints not included

        for k in times:
            window[k] += times[k]
        window_steps += 1
        if step > start_step + 1:
            for k in times:
                totals[k] += times[k]
            totals_steps += 1

        if log_now:  # ------------------------------------------------ log
            names = [k for k in ("loss", "con", "hn", "rel") if k in terms]
            values = torch.stack([terms[k].detach().float() for k in names])
            if world > 1:
                torch.distributed.all_reduce(values)
                values /= world
            row = {"step": step, "epoch": step / schedule.steps_per_epoch, "lr": lr,
                   **{k: v for k, v in zip(names, values.tolist())}, **diagnostics,
                   "images_per_s": window_steps * schedule.global_batch / window["step"],
                   **{f"t_{k}": window[k] / window_steps for k in window}}
            last_row = row
            if du.is_main():
                log.write(row)
                _log(f"step {step:>6}/{schedule.total_steps}  ep {row['epoch']:.2f}  lr {lr:.4g}  "
                     + "  ".join(f"{k} {row[k]:.4f}" for k in names)
                     + f"  pos {row['pos_cos']:.3f}  hardest {row['hardest_neg_cos']:.3f}  rank {row['eff_rank']:.1f}"
                     + (f"  cos(h_S,h_T) {row['teacher_cos']:.3f}" if "teacher_cos" in row else "")
                     + f"  | {row['images_per_s']:.1f} img/s  "
                     + "  ".join(f"{k} {row[f't_{k}']:.2f}s" for k in TIME_KEYS))
            window = {k: 0.0 for k in window}
            window_steps = 0

        if config.val_benchmark and (step % config.val_every == 0 or step == schedule.total_steps):
            validate_now(step)
        out_of_time = log_now and config.max_seconds is not None and any(
            du.all_gather_objects(time.perf_counter() - loop_start > config.max_seconds))  # every rank stops together
        if step % config.checkpoint_every == 0 or step == stop_step or out_of_time:
            checkpoint_now(step)
        if out_of_time:
            _log(f"rdcd train: {config.max_seconds:g} s of training used (max_seconds); stopping at step {step}")
            break
    del batches

    # ---------------------------------------------------------------- finish
    digests = du.gather_objects_to_main(replica_digest(student, key_encoder))
    model_path = None
    summary = {}
    if du.is_main():
        if step == schedule.total_steps:
            net = copy.deepcopy(student).cpu().float()
            net.config.extra = {"teacher": config_record(config)["teacher"], "steps": schedule.total_steps,
                                "train_size": config.size, "run": str(output)}
            model_path = save_student(net, output / "model.pt")
        summary = {
            "step": step, "total_steps": schedule.total_steps, "finished": step == schedule.total_steps,
            "world_size": world, "global_batch": schedule.global_batch,
            "seconds_per_step": {k: totals[k] / totals_steps for k in totals} if totals_steps else {},
            "images_per_s": totals_steps * schedule.global_batch / totals["step"] if totals_steps else None,
            "teacher_in_workers": teacher_in_workers,
            "last_log": last_row, "validation": val_history,
            "skipped_files": len(skipped), "replica_digests": digests,
            "replicas_identical": len(set(digests)) == 1,
        }
        with atomic_path(output / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
        log.close()
        if not summary["replicas_identical"]:
            print("rdcd train: WARNING: the processes ended with different weights", file=sys.stderr)
        _log(f"rdcd train: {'finished' if model_path else 'stopped'} at step {step}"
             + (f", model -> {model_path}" if model_path else "; continue with --resume"))
    du.barrier()
    return TrainResult(output, model_path, step, schedule.total_steps, summary)

"""The networks of one RDCD step and the class that holds them, as MoCo's builder does.

    h_T      = teacher(x)              frozen, eval, no grad
    z_S'     = momentum_student(x')    EMA of the student, updated first, no grad (the key encoder)
    h_S, z_S = student(x)
    L        = RDCDLoss(z_S, z_S', h_S, h_T), then enqueue(all_gather(z_S'), all_gather(h_T))
"""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as du
from ..losses import RDCDLoss, descriptor_stats, effective_rank
from ..models import DescriptorModel, load_model
from ..models.student import (
    StudentConfig,
    StudentNet,
    TorchImageModel,
    build_student,
    load_student,
    shallower,
)
from .config import TrainConfig
from .distributed_bn import sync_batchnorm
from .log import say


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


def frozen_stem_and_stages(net: StudentNet, stages: int) -> list[nn.Module]:
    """The modules ``freeze_stages`` keeps fixed: the backbone's stem (``conv_stem``, ``bn1``) and its
    first ``stages`` stages of blocks (timm's EfficientNet / MobileNet layout)."""
    if not stages:
        return []
    backbone = net.backbone
    blocks = getattr(backbone, "blocks", None)
    if blocks is None or not hasattr(backbone, "conv_stem"):
        raise ValueError(f"--freeze-stages: {net.config.backbone} has no conv_stem and blocks (timm's "
                         "EfficientNet/MobileNet layout)")
    if stages > len(blocks):
        raise ValueError(f"--freeze-stages {stages}: {net.config.backbone} has {len(blocks)} stages")
    return [backbone.conv_stem, backbone.bn1, *blocks[:stages]]


def freeze(modules: list[nn.Module]) -> None:
    """No gradient for these modules' parameters, and their batch norms in eval mode for good."""
    for module in modules:
        module.requires_grad_(False)
        module.eval()


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


def teacher_for_run(config: TrainConfig, device: torch.device, threads: int, workers: int,
                    autocast_dtype: torch.dtype | None) -> tuple[FrozenTeacher | None, int, bool]:
    """(the teacher this process runs, its dimension, whether the data workers run it instead).

    The teacher-free baseline (L_rel off) never runs the teacher; kd_dim then keeps its default. An
    ONNX teacher runs on the CPU cores even beside a GPU: in the data workers it overlaps the student.
    """
    teacher_free = not config.loss.use_rel
    onnx_teacher = not str(config.teacher).startswith("student:") and not str(config.teacher).endswith((".pt", ".pth"))
    in_workers = (config.teacher_in_workers and workers > 0 and not teacher_free
                  and (device.type == "cpu" or onnx_teacher))
    teacher = None if teacher_free else FrozenTeacher(load_teacher(config.teacher, device, threads), autocast_dtype)
    dim = StudentConfig.kd_dim if teacher is None else teacher.dim
    if in_workers:
        teacher = None  # the workers load their own; free this one before they fork
    return teacher, dim, in_workers


def student_for_run(config: TrainConfig, teacher_dim: int, checkpoint: dict | None) -> StudentNet:
    """The student a run starts from: the checkpoint's architecture, a trained student (``init``), or a new one."""
    if checkpoint is not None and "student_config" in checkpoint:
        # resuming: the checkpoint holds the architecture and the weights (an --init file may be gone)
        return StudentNet(StudentConfig.from_dict(checkpoint["student_config"]))
    if config.init:
        student = student_from_init(config, teacher_dim)
        if config.head_init == "teacher":
            say("rdcd train: --head-init teacher does not apply with --init: the heads come from the trained student")
        return student
    # a new run, or a checkpoint written before checkpoints held the architecture
    return build_student(config.student, dim=config.dim, kd_dim=teacher_dim, input_size=config.eval_size,
                         pretrained=config.pretrained, name=f"rdcd-{config.student}-{config.dim}",
                         feature_norm=config.feature_norm)


def student_from_init(config: TrainConfig, teacher_dim: int) -> StudentNet:
    """The student ``config.init`` (a shipped model name or a student file) with ``config.drop_blocks``
    removed as well, its weights carried over; it must match ``--student``, ``--dim`` and the teacher."""
    from ..models import model_file

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
        say(f"rdcd train: warning: --init {path} has no block(s) {', '.join(again)} already")
    if source.config.input_size != config.eval_size:
        say(f"rdcd train: warning: --init {path} was made for {source.config.input_size} px; this run validates "
             f"and saves it for {config.eval_size} px (--eval-size)")
    shallow = bool(config.drop_blocks or source.config.drop_blocks)
    target = shallower(source, config.drop_blocks, input_size=config.eval_size, extra={},
                       name=f"rdcd-{config.student}{'-shallow' if shallow else ''}-{config.dim}")
    say(f"rdcd train: starting from {path}" + (f" without block(s) {', '.join(config.drop_blocks)}"
                                               if config.drop_blocks else ""))
    return target




class Forward(NamedTuple):
    terms: dict  # the loss and its terms (rdcd.losses.RDCDLoss)
    h_t: torch.Tensor | None  # (B, D_T) teacher features of view x; None for the teacher-free baseline
    h_s: torch.Tensor  # (B, D_T) student features of view x
    z_s: torch.Tensor  # (B, d) student descriptors of view x
    z_key_all: torch.Tensor  # (world x B, d) momentum-student keys of view x', all ranks in rank order
    image_ids: torch.Tensor  # (B,)
    times: dict  # seconds of the teacher and key parts (StopWatch laps)


class RDCD:
    """Student, momentum student (key encoder), frozen teacher and the loss with its queues.

    ``teacher`` is None for the teacher-free baseline and when the data workers compute h_T.
    Under DDP the student's batch norm becomes global (``sync_batchnorm``) and its forward runs in
    DistributedDataParallel; the momentum student keeps plain batch norm and sees a batch shuffled
    across ranks instead (``encode_keys``).
    """

    def __init__(self, student: StudentNet, teacher: FrozenTeacher | None, teacher_dim: int, config: TrainConfig,
                 device: torch.device, autocast_dtype: torch.dtype | None):
        self.teacher, self.teacher_free = teacher, not config.loss.use_rel
        self.key_encoder = copy.deepcopy(student).requires_grad_(False)
        self.student = sync_batchnorm(student, device) if du.world_size() > 1 else student
        # frozen layers: neither gradients nor batch statistics, in the network that trains (after the
        # batch-norm conversion, which makes new modules and parameters) and in the key encoder
        self.frozen = frozen_stem_and_stages(self.student, config.freeze_stages)
        freeze(self.frozen)
        self.frozen += frozen_stem_and_stages(self.key_encoder, config.freeze_stages)
        self.criterion = RDCDLoss(config.dim, teacher_dim, config.loss).to(device)
        self.normalize = Normalize(student.config.mean, student.config.std, device, config.channels_last)
        self.features = StudentFeatures(self.student)
        if du.world_size() > 1:  # L_rel alone leaves the projector unused
            self.features = nn.parallel.DistributedDataParallel(
                self.features, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=not (config.loss.use_con or config.loss.use_hn))
        self.key_momentum, self.seed, self.device = config.key_momentum, config.seed, device
        # L2-SP: the backbone's starting weights (a resumed run loads the ones it started from)
        self.l2sp = config.l2sp
        self.anchor = {name: p.detach().clone() for name, p in self.student.named_parameters()
                       if name.startswith("backbone.")} if self.l2sp else {}
        self.autocast = torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                       enabled=autocast_dtype is not None)

    def __call__(self, batch, step: int, clock) -> Forward:
        """Global step ``step`` on a ViewBatch: the losses, before backward; ``clock`` times the parts."""
        h_t, times = self.encode_teacher(batch, clock)  # teacher on view x
        momentum_update(self.key_encoder, self.student, self.key_momentum)  # momentum student on view x'
        with self.autocast:
            shuffle = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            z_key, z_key_all = encode_keys(self.key_encoder, batch.view2, self.normalize, shuffle)
        times["key"] = clock.lap()
        with self.autocast:  # student on view x
            h_s, z_s = self.features(self.normalize(batch.view1))
        image_ids = batch.indices.to(self.device)
        terms = self.criterion(z_s.float(), z_key, h_s.float(), h_t, image_ids)
        if self.l2sp:
            drift = sum(((p - self.anchor[n]) ** 2).sum() for n, p in self.student.named_parameters() if n in self.anchor)
            terms["loss"] = terms["loss"] + self.l2sp * drift
        return Forward(terms, h_t, h_s, z_s, z_key_all, image_ids, times)

    def encode_teacher(self, batch, clock) -> tuple[torch.Tensor | None, dict]:
        if self.teacher_free:
            return None, {"teacher": 0.0}
        if self.teacher is not None:
            h_t = self.teacher(batch.view1).to(self.device).float()
            return h_t, {"teacher": clock.lap()}
        # computed by the data worker, alongside loading
        return batch.teacher_features.to(self.device).float(), {"teacher": batch.teacher_seconds}

    def enqueue(self, out: Forward) -> None:
        """Keys, teacher features and image ids of the global batch, in rank order (encode_keys' order)."""
        self.criterion.enqueue(out.z_key_all, None if out.h_t is None else du.concat_all_gather(out.h_t),
                               du.concat_all_gather(out.image_ids))

    def diagnostics(self, out: Forward) -> dict:
        """Descriptor statistics against the queue this step's loss saw (call before ``enqueue``)."""
        z_s_all = du.concat_all_gather(out.z_s.detach().float())
        stats = descriptor_stats(z_s_all, out.z_key_all, self.criterion.key_queue.features())
        stats["eff_rank"] = effective_rank(z_s_all)
        # distillation progress: how close h_S comes to its own teacher feature (same 512-d space)
        if out.h_t is not None:
            teacher_cos = F.cosine_similarity(out.h_s.detach().float(), out.h_t, dim=1)
            stats["teacher_cos"] = du.concat_all_gather(teacher_cos).mean().item()
        return stats

    def train_mode(self, bn: str) -> None:
        set_train_mode(self.student, bn)
        set_train_mode(self.key_encoder, bn)  # batch statistics for the keys too, as MoCo (bn="batch")
        for module in self.frozen:
            module.eval()

    def state_dict(self) -> dict:
        state = {"student": self.student.state_dict(), "student_config": dataclasses.asdict(self.student.config),
                 "key_encoder": self.key_encoder.state_dict(), "criterion": self.criterion.state_dict()}
        if self.l2sp:
            state["anchor"] = self.anchor
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.l2sp:
            self.anchor = {name: tensor.to(self.device) for name, tensor in state["anchor"].items()}
        self.student.load_state_dict(state["student"])
        self.key_encoder.load_state_dict(state["key_encoder"])
        self.criterion.load_state_dict(state["criterion"])

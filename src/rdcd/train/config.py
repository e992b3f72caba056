"""What defines a training run: the config, its checks, and the budget resolved into a schedule."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..losses import LossConfig
from ..models import DescriptorModel
from ..models.student import OFFLINE_PRETRAINED


@dataclass
class TrainConfig:
    """Everything that defines a training run; defaults are the paper's setting (docs/method.md)."""

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
    l2sp: float = 0.0  # weight of sum ||w - w_start||^2 over the backbone (L2-SP: stay near the starting weights)
    freeze_stages: int = 0  # the stem and the first N stages of backbone blocks keep their weights (no backward)
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
    def from_dict(cls, d: dict) -> TrainConfig:
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
HEAD_INITS = ("random", "teacher", "pcaw")
BN_MODES = ("batch", "frozen")
AMP_MODES = ("auto", "bf16", "fp16", "off")


def check_config(config: TrainConfig) -> None:
    """Missing or contradicting settings, refused before anything is loaded."""
    if config.amp not in AMP_MODES:
        raise ValueError(f"amp must be auto, bf16, fp16 or off, not {config.amp!r}")
    if not config.output:
        raise ValueError("no output folder given (--output RUN_DIR)")
    if config.head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {', '.join(HEAD_INITS)}, not {config.head_init!r}")
    if not config.loss.use_rel and config.head_init == "teacher":
        raise ValueError("--no-rel trains the teacher-free baseline, but --head-init teacher fits the head to the "
                         "teacher: use --head-init random or pcaw")
    if config.init and config.feature_norm:
        raise ValueError("--feature-norm builds a new student's head; with --init the trained student keeps its own")
    if config.l2sp < 0:
        raise ValueError(f"--l2sp must be >= 0, not {config.l2sp}")
    if config.freeze_stages < 0:
        raise ValueError(f"--freeze-stages must be >= 0, not {config.freeze_stages}")
    if config.bn not in BN_MODES:
        raise ValueError(f"bn must be 'batch' or 'frozen', not {config.bn!r}")
    if config.init and config.pretrained:
        raise ValueError("--init and --pretrained both set the starting weights: give one of them")
    if config.pretrained and config.student not in OFFLINE_PRETRAINED:
        raise ValueError(f"no offline ImageNet weights for {config.student!r} "
                         f"(available: {sorted(OFFLINE_PRETRAINED)}); use --no-pretrained")
    if config.drop_blocks and not config.init:
        raise ValueError("--drop-blocks makes a shallower copy of a trained student: give it with --init MODEL")
    if (config.teacher_in_workers and config.workers != 0 and config.loss.use_rel
            and isinstance(config.teacher, DescriptorModel)):
        raise ValueError("teacher_in_workers needs the teacher as a name or file, which each worker loads")


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

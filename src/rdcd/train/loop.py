"""The training loop: ``train`` is plain Python you can step through (DINO style); one step of the
method is ``train_step``, the networks it runs are ``rdcd.train.model.RDCD``.

The same code runs in one process (no process group) and under
``torchrun --nproc_per_node N -m rdcd train ...`` (DDP: gloo on CPU, NCCL on GPU).
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import distributed as du
from ..augment import TwoViews, build_augmentation
from ..descriptors import atomic_path
from ..images import list_images
from ..models.student import StudentNet, save_student
from .checkpoint import (
    open_checkpoint,
    replica_digest,
    restore,
    upgrade_optimizer_state,
    upgrade_scheduler_state,
    write_checkpoint,
)
from .config import (
    Schedule,
    TrainConfig,
    WarmupCosine,
    check_config,
    config_record,
    resolve_schedule,
)
from .data import CollateViews, SeededBatches, TwoViewImages, ViewBatch, paths_digest
from .head_init import initialise_head
from .log import TIME_KEYS, RunLog, StepTimes, StopWatch, say
from .model import RDCD, student_for_run, teacher_for_run
from .validation import check_benchmark, validate_and_log


@dataclass
class TrainResult:
    output: Path
    model_path: Path | None  # None when the run stopped early (stop_at)
    step: int
    total_steps: int
    summary: dict


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Train an RDCD student; writes config.json, log.csv, checkpoint.pt and model.pt under config.output.

    ``resume``: continue from ``output/checkpoint.pt`` exactly where it was written (the settings that
    define the run must match; see RUN_CONTROL_FIELDS for those that may change). Without a
    checkpoint the run starts from scratch.
    """
    check_config(config)  # ------------------------------------------ settings, before anything is loaded
    if config.val_benchmark:
        check_benchmark(config.val_benchmark)
    du.init_distributed()  # ------------------------------------------ processes, devices, threads
    device, rank, world = du.default_device(), du.rank(), du.world_size()
    threads = config.threads or du.cpu_threads_per_process()
    torch.set_num_threads(threads)
    autocast_dtype = _autocast_dtype(config.amp, device)
    output = Path(config.output)
    checkpoint = open_checkpoint(config, resume)

    paths = list_images(config.data)  # ------------------------------ data
    schedule = resolve_schedule(config, len(paths), world)
    if checkpoint is not None and checkpoint["data_digest"] != paths_digest(paths):
        raise ValueError(f"{config.data}: the image list differs from the one the checkpoint was trained on")
    start_step = checkpoint["step"] if checkpoint is not None else 0
    stop_step = min(schedule.total_steps, config.stop_at or schedule.total_steps)

    random.seed(config.seed)  # ----------------------------------------- networks
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    workers = config.workers if config.workers is not None else max(1, threads // 2)
    teacher, teacher_dim, teacher_in_workers = teacher_for_run(config, device, threads, workers, autocast_dtype)
    if config.bn == "frozen" and not (config.pretrained or config.init):
        say("rdcd train: warning: --bn frozen without pretrained weights keeps batch norm at its initial "
            "statistics (mean 0, variance 1), i.e. no normalisation; it is meant for ImageNet-initialised students")
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    student = student_for_run(config, teacher_dim, checkpoint).to(device, memory_format=memory_format)
    if checkpoint is None and not config.init:  # init: its heads and standardisation are trained
        initialise_head(student, config, teacher, paths, device, threads, world)
    model = RDCD(student, teacher, teacher_dim, config, device, autocast_dtype)
    optimiser = Optimiser(model.student, schedule, config, device, autocast_dtype)
    skipped: dict[str, str] = {}
    if checkpoint is not None:
        skipped = restore(checkpoint, model, optimiser, rank)
        say(f"rdcd train: resumed {output} at step {start_step} of {schedule.total_steps}")
    model.train_mode(config.bn)

    resolved = _resolved(config, schedule, device, threads, workers, teacher_dim, teacher_in_workers,
                         autocast_dtype, model.student)
    log = _open_run_files(config, resolved, None if checkpoint is None else start_step)
    loader = _loader(config, paths, start_step, stop_step, workers, teacher_in_workers, device)
    _announce(config, schedule, resolved)
    validation = []
    if config.val_benchmark and start_step == 0:
        validation.append(_validate(model, config, 0, schedule, log))

    clock, times, last_row = StopWatch(device), StepTimes(), {}  # ------ train
    batches = iter(loader)
    step = start_step
    loop_start = time.perf_counter()
    for step in range(start_step + 1, stop_step + 1):
        clock.lap()
        step_start = clock.last
        batch: ViewBatch = next(batches)
        _note_skipped(batch.failures, skipped)
        data_seconds = clock.lap()
        log_now = step % config.log_every == 0 or step == stop_step
        terms, lr, diagnostics, step_times = train_step(model, optimiser, batch, step, clock, log_now)
        times.add({"data": data_seconds, **step_times, "step": clock.last - step_start}, first=step == start_step + 1)
        if log_now:
            last_row = _log_step(step, terms, lr, diagnostics, times, schedule, log)
        if config.val_benchmark and (step % config.val_every == 0 or step == schedule.total_steps):
            validation.append(_validate(model, config, step, schedule, log))
        out_of_time = log_now and config.max_seconds is not None and any(
            du.all_gather_objects(time.perf_counter() - loop_start > config.max_seconds))  # every rank stops together
        if step % config.checkpoint_every == 0 or step == stop_step or out_of_time:
            write_checkpoint(output / "checkpoint.pt", step, config, paths, model, optimiser, skipped)
        if out_of_time:
            say(f"rdcd train: {config.max_seconds:g} s of training used (max_seconds); stopping at step {step}")
            break
    del batches
    return _finish(config, model, schedule, step, times, last_row, validation, skipped, resolved, log)


def train_step(model: RDCD, optimiser: Optimiser, batch: ViewBatch, step: int, clock: StopWatch, log_now: bool
               ) -> tuple[dict, float, dict, dict]:
    """One step of the method: the losses on the two views, an SGD step, then the keys and teacher
    features join the queues. Returns the loss terms, the learning rate used, the descriptor
    diagnostics (when ``log_now``) and the seconds of the step's parts."""
    out = model(batch, step, clock)
    lr = optimiser.lr  # the backbone's (the head's is head_lr times it)
    optimiser.step(out.terms["loss"])
    if not math.isfinite(out.terms["loss"].item()):
        raise RuntimeError(f"step {step}: the loss is {out.terms['loss'].item()} "
                           f"({ {k: v.item() for k, v in out.terms.items()} }); lower --lr")
    diagnostics = model.diagnostics(out) if log_now else {}  # against the queue this step's loss saw
    model.enqueue(out)
    out.times["student"] = clock.lap()
    return out.terms, lr, diagnostics, out.times


class Optimiser:
    """SGD with momentum under the warm-up/cosine schedule, and the fp16 loss scaler."""

    def __init__(self, student: nn.Module, schedule: Schedule, config: TrainConfig, device: torch.device,
                 autocast_dtype: torch.dtype | None):
        self.optimizer = torch.optim.SGD(parameter_groups(student, schedule.lr, config.head_lr), lr=schedule.lr,
                                         momentum=config.momentum, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(schedule.warmup_steps, schedule.total_steps))
        self.scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(upgrade_optimizer_state(state["optimizer"], self.optimizer))
        self.scheduler.load_state_dict(upgrade_scheduler_state(state["scheduler"], self.scheduler))
        self.scaler.load_state_dict(state["scaler"])


def parameter_groups(student: nn.Module, lr: float, head_lr: float) -> list[dict]:
    """SGD groups: the backbone at ``lr``, the new layers (fc, projector, a learnable GeM p) at
    ``lr * head_lr``. LambdaLR scales every group by the same warm-up/cosine factor."""
    head = [p for n, p in student.named_parameters() if not n.startswith("backbone.")]
    body = [p for n, p in student.named_parameters() if n.startswith("backbone.")]
    return [{"params": body, "lr": lr}, {"params": head, "lr": lr * head_lr}]


def _autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _resolved(config: TrainConfig, schedule: Schedule, device: torch.device, threads: int, workers: int,
              teacher_dim: int, teacher_in_workers: bool, autocast_dtype: torch.dtype | None, student: StudentNet
              ) -> dict:
    """What the run resolved its settings to, for config.json."""
    from ..bench import machine_description

    return {"world_size": schedule.world_size, "global_batch": schedule.global_batch, "lr": schedule.lr,
            "total_steps": schedule.total_steps, "warmup_steps": schedule.warmup_steps,
            "steps_per_epoch": schedule.steps_per_epoch, "n_images": schedule.n_images,
            "teacher_dim": teacher_dim, "device": str(device), "threads_per_rank": threads,
            "workers_per_rank": workers, "teacher_in_workers": teacher_in_workers,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"), "argv": sys.argv,
            "autocast": str(autocast_dtype).replace("torch.", "") if autocast_dtype else "off",
            "student_normalization": {"mean": list(student.config.mean), "std": list(student.config.std)},
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
            "host": platform.node(), "cpu_count": os.cpu_count(), "machine": machine_description()}


def _open_run_files(config: TrainConfig, resolved: dict, resume_step: int | None) -> RunLog | None:
    """On rank 0: config.json (a new run) and the log; None elsewhere."""
    if not du.is_main():
        return None
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    run_info = {"config": config_record(config), "resolved": resolved}
    if resume_step is None:
        run_info["started"] = datetime.datetime.now().isoformat(timespec="seconds")
        with atomic_path(output / "config.json") as tmp:
            tmp.write_text(json.dumps(run_info, indent=2) + "\n")
    return RunLog(output, resume_step, config.tensorboard)


def _loader(config: TrainConfig, paths: Sequence[Path], start_step: int, stop_step: int, workers: int,
            teacher_in_workers: bool, device: torch.device) -> DataLoader:
    """This rank's batches of steps start_step + 1 .. stop_step (see rdcd.train.data)."""
    views = TwoViews(build_augmentation(config.augmentations, config.size, normalize=False))
    return DataLoader(
        TwoViewImages(paths, views, config.seed),
        batch_sampler=SeededBatches(len(paths), config.batch_size, config.seed, start_step, stop_step,
                                    du.rank(), du.world_size()),
        num_workers=workers,
        collate_fn=CollateViews(str(config.teacher) if teacher_in_workers else None),
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def _announce(config: TrainConfig, schedule: Schedule, resolved: dict) -> None:
    say(f"rdcd train: {schedule.n_images} images, {schedule.world_size} process(es) x batch {config.batch_size} = "
        f"{schedule.global_batch}, {schedule.total_steps} steps ({schedule.steps_per_epoch}/epoch, "
        f"{schedule.warmup_steps} warm-up), lr {schedule.lr:g}, teacher {config_record(config)['teacher']} "
        f"({resolved['teacher_dim']}-d)"
        f"{' in the data workers' if resolved['teacher_in_workers'] else ''}, student {config.student} -> "
        f"{config.dim}-d, {config.size}px, {resolved['workers_per_rank']} data worker(s), "
        f"{resolved['threads_per_rank']} thread(s), device {resolved['device']}")
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1)
    if resolved["device"] == "cpu" and busy and "OMP_WAIT_POLICY" not in os.environ:
        say("rdcd train: hint: the CPU is already busy; OMP_WAIT_POLICY=PASSIVE in the environment stops OpenMP "
            "threads busy-waiting for a core (2.6x faster steps on 2 overloaded cores, docs/training.md)")


def _note_skipped(failures: list, skipped: dict[str, str]) -> None:
    for path, reason in failures:
        if path not in skipped:
            print(f"rdcd train: skipped {path}: {reason}", file=sys.stderr, flush=True)
        skipped[path] = reason


def _validate(model: RDCD, config: TrainConfig, step: int, schedule: Schedule, log: RunLog | None) -> dict | None:
    return validate_and_log(model.student, config.val_benchmark, config.eval_size, config.val_batch_size,
                            model.device, step, schedule.steps_per_epoch, log)


def _log_step(step: int, terms: dict, lr: float, diagnostics: dict, times: StepTimes, schedule: Schedule,
              log: RunLog | None) -> dict:
    """The log row of ``step`` (losses averaged over the processes), written and printed on rank 0."""
    names = [k for k in ("loss", "con", "hn", "rel") if k in terms]
    values = torch.stack([terms[k].detach().float() for k in names])
    if schedule.world_size > 1:
        torch.distributed.all_reduce(values)
        values /= schedule.world_size
    row = {"step": step, "epoch": step / schedule.steps_per_epoch, "lr": lr,
           **{k: v for k, v in zip(names, values.tolist())}, **diagnostics, **times.take_window(schedule.global_batch)}
    if du.is_main():
        log.write(row)
        say(f"step {step:>6}/{schedule.total_steps}  ep {row['epoch']:.2f}  lr {lr:.4g}  "
            + "  ".join(f"{k} {row[k]:.4f}" for k in names)
            + f"  pos {row['pos_cos']:.3f}  hardest {row['hardest_neg_cos']:.3f}  rank {row['eff_rank']:.1f}"
            + (f"  cos(h_S,h_T) {row['teacher_cos']:.3f}" if "teacher_cos" in row else "")
            + f"  | {row['images_per_s']:.1f} img/s  "
            + "  ".join(f"{k} {row[f't_{k}']:.2f}s" for k in TIME_KEYS))
    return row


def _finish(config: TrainConfig, model: RDCD, schedule: Schedule, step: int, times: StepTimes, last_row: dict,
            validation: list, skipped: dict, resolved: dict, log: RunLog | None) -> TrainResult:
    """model.pt when the schedule is complete, summary.json, and the check that every replica agrees."""
    output = Path(config.output)
    digests = du.gather_objects_to_main(replica_digest(model.student, model.key_encoder))
    model_path = None
    summary = {}
    if du.is_main():
        if step == schedule.total_steps:
            net = copy.deepcopy(model.student).cpu().float()
            net.config.extra = {"teacher": config_record(config)["teacher"], "steps": schedule.total_steps,
                                "train_size": config.size, "run": str(output)}
            model_path = save_student(net, output / "model.pt")
        summary = {
            "step": step, "total_steps": schedule.total_steps, "finished": step == schedule.total_steps,
            "world_size": schedule.world_size, "global_batch": schedule.global_batch,
            **times.summary(schedule.global_batch),
            "teacher_in_workers": resolved["teacher_in_workers"],
            "last_log": last_row, "validation": validation,
            "skipped_files": len(skipped), "replica_digests": digests,
            "replicas_identical": len(set(digests)) == 1,
        }
        with atomic_path(output / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
        log.close()
        if not summary["replicas_identical"]:
            print("rdcd train: WARNING: the processes ended with different weights", file=sys.stderr)
        say(f"rdcd train: {'finished' if model_path else 'stopped'} at step {step}"
            + (f", model -> {model_path}" if model_path else "; continue with --resume"))
    du.barrier()
    return TrainResult(output, model_path, step, schedule.total_steps, summary)

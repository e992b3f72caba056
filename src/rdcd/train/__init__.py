"""RDCD training: distil a frozen teacher into a small student with a compact descriptor.

One step (docs/method.md), per batch of B images:

    x, x'  = two augmented views (uint8)                      data.py
    h_T    = teacher(x)              frozen, eval, no grad    model.py (RDCD)
    z_S'   = momentum_student(x')    EMA update first, no grad
    h_S, z_S = student(x)
    L = lambda_con * (L_con + lambda_hn * L_hn) + lambda_rel * L_rel       rdcd.losses.RDCDLoss
    SGD step, then enqueue(all_gather(z_S'), all_gather(h_T))             loop.py (train_step)

The package, in the order a run uses it: ``config`` (TrainConfig, checks, schedule), ``data``
(seeded batches of two views), ``model`` (teacher, student, momentum student: the RDCD class),
``head_init`` (optional fit of the head before step 1), ``distributed_bn``, ``loop`` (``train``),
``checkpoint`` (exact resume), ``log`` and ``validation``.
"""
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    load_checkpoint,
    replica_digest,
    rng_state,
    save_checkpoint,
    set_rng_state,
    upgrade_optimizer_state,
    upgrade_scheduler_state,
    write_skipped,
)
from .config import (
    HEAD_INITS,
    RUN_CONTROL_FIELDS,
    Schedule,
    TrainConfig,
    WarmupCosine,
    check_config,
    config_differences,
    config_record,
    resolve_schedule,
)
from .data import (
    CollateViews,
    SeededBatches,
    TwoViewImages,
    ViewBatch,
    epoch_order,
    paths_digest,
)
from .distributed_bn import GlobalBatchNorm2d, sync_batchnorm
from .head_init import (
    fit_feature_norm,
    fit_head_pcaw,
    fit_head_to_teacher,
    head_fit_views,
    initialise_head,
)
from .log import LOG_COLUMNS, TIME_KEYS, VAL_KEYS, RunLog, StopWatch, read_log
from .loop import Optimiser, TrainResult, parameter_groups, train, train_step
from .model import (
    RDCD,
    FrozenTeacher,
    Normalize,
    StudentFeatures,
    encode_keys,
    load_teacher,
    momentum_update,
    set_train_mode,
    student_from_init,
)
from .validation import check_benchmark, validate

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "HEAD_INITS", "LOG_COLUMNS", "RDCD", "RUN_CONTROL_FIELDS",
    "TIME_KEYS", "VAL_KEYS", "CollateViews", "FrozenTeacher", "GlobalBatchNorm2d", "Normalize", "Optimiser",
    "RunLog", "Schedule", "SeededBatches", "StopWatch", "StudentFeatures", "TrainConfig", "TrainResult",
    "TwoViewImages", "ViewBatch", "WarmupCosine", "check_benchmark", "check_config", "config_differences",
    "config_record", "encode_keys", "epoch_order", "fit_feature_norm", "fit_head_pcaw", "fit_head_to_teacher",
    "head_fit_views", "initialise_head", "load_checkpoint", "load_teacher", "momentum_update", "parameter_groups",
    "paths_digest", "read_log", "replica_digest", "resolve_schedule", "rng_state", "save_checkpoint",
    "set_rng_state", "set_train_mode", "student_from_init", "sync_batchnorm", "train", "train_step",
    "upgrade_optimizer_state", "upgrade_scheduler_state", "validate", "write_skipped",
]

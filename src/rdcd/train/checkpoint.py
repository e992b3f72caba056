"""The whole training state in one file, written atomically, so a resumed run reproduces an
uninterrupted one exactly; older checkpoints are upgraded on reading."""
from __future__ import annotations

import csv
import hashlib
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import distributed as du
from ..descriptors import atomic_path
from .config import TrainConfig, config_differences, config_record
from .data import paths_digest
from .log import say

CHECKPOINT_FORMAT = "rdcd-train-checkpoint"
CHECKPOINT_VERSION = 1


def open_checkpoint(config: TrainConfig, resume: bool) -> dict | None:
    """The checkpoint to resume from (None: a new run), refused when its run cannot continue with ``config``."""
    output = Path(config.output)
    path = output / "checkpoint.pt"
    if not resume and (path.exists() or (output / "log.csv").exists()):
        raise ValueError(f"{output} already holds a run; pass --resume to continue it or choose a new --output")
    checkpoint = load_checkpoint(path) if resume and path.exists() else None
    if checkpoint is not None:
        differences = config_differences(checkpoint["config"], config_record(config))
        if differences:
            raise ValueError(f"{path}: cannot resume with different settings:\n  " + "\n  ".join(differences))
    elif resume:
        say(f"rdcd train: no checkpoint in {output}, starting from scratch")
    # every rank must take the same branch below (head fit, collectives): refuse if their files disagree
    steps_found = du.all_gather_objects(None if checkpoint is None else checkpoint["step"])
    if len(set(steps_found)) > 1:
        raise RuntimeError(f"{path}: the processes see different checkpoints (step per rank: {steps_found}); "
                           "the output folder must be on storage every process shares")
    return checkpoint


def restore(checkpoint: dict, model, optimiser, rank: int) -> dict[str, str]:
    """Load the state of an RDCD ``model`` and its ``optimiser`` and this rank's random state;
    returns the files skipped so far."""
    model.load_state_dict(checkpoint)
    optimiser.load_state_dict(checkpoint)
    skipped = dict(checkpoint["skipped"])
    rng_states = checkpoint["rng"]
    set_rng_state(rng_states[rank] if rank < len(rng_states) else rng_states[0])
    return skipped


def write_checkpoint(path: Path, step: int, config: TrainConfig, paths: Sequence[Path], model, optimiser,
                     skipped: dict[str, str]) -> None:
    """Collective: every rank's random state and skipped files, saved by rank 0 with the model and optimiser."""
    rng_states = du.gather_objects_to_main(rng_state())
    all_skipped = du.gather_objects_to_main(skipped)
    if du.is_main():
        merged = {file: reason for part in all_skipped for file, reason in part.items()}
        save_checkpoint(path, step=step, config=config_record(config), data_digest=paths_digest(paths),
                        **model.state_dict(), **optimiser.state_dict(), rng=rng_states, skipped=merged)
        write_skipped(path.parent, merged)
    du.barrier()


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


def write_skipped(output: Path, skipped: dict[str, str]) -> None:
    if not skipped:
        return
    with atomic_path(output / "skipped_files.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "reason"])
        w.writerows(sorted(skipped.items()))

"""The data of a run: a seeded order of the images, cut into batches of two augmented views.

The data order is a permutation seeded by (seed, epoch), cut into global batches and then per-rank
slices; the views of image i in epoch e are drawn from ``view_seed(seed, e, i)``. A batch is
therefore a pure function of (seed, step), whichever worker loads it, so a run resumed from a
checkpoint reproduces the batches, and with them the losses, of an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..augment import TwoViews, view_seed
from ..images import ImageLoadError, open_image
from .model import FrozenTeacher, load_teacher


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
    """Item (epoch, index) -> (image id, view x, view x', failures): two uint8 views of one image.

    The image id is the index of the file's first entry in the list: a file listed several times
    (to oversample a kind of image) gets new views at each entry but one id, so the same-image mask
    of the losses treats every entry's keys as copies of it, never as negatives.

    A file that cannot be decoded is skipped: the next file in the list that decodes takes its
    place (views still drawn from the seed of the original index, so the batch stays a function of
    the step and keeps its size, which the cross-process batch shuffle needs). The skipped files
    travel with the batch so the loop can report them.
    """

    def __init__(self, paths: Sequence[Path], views: TwoViews, seed: int):
        self.paths, self.views, self.seed = list(paths), views, seed
        first: dict[Path, int] = {}
        self.image_ids = [first.setdefault(Path(p).resolve(), i) for i, p in enumerate(self.paths)]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        failures = []
        for offset in range(len(self.paths)):
            position = (index + offset) % len(self.paths)
            path = self.paths[position]
            try:
                image = open_image(path)
            except ImageLoadError as e:
                failures.append((str(path), e.reason))
                continue
            view1, view2 = self.views(image, view_seed(self.seed, epoch, index))
            return self.image_ids[position], view1, view2, failures  # the id of the image that stands in
        raise RuntimeError(f"none of the {len(self.paths)} training images could be decoded")


class ViewBatch(NamedTuple):
    indices: torch.Tensor  # (B,) image ids (TwoViewImages: a file's first index in the list)
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

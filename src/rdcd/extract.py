"""Image files -> descriptors, resumable and shardable.

The file list is cut into chunks. Each finished chunk is saved at once in ``OUTPUT.partial/``
(atomic writes) with the settings that made it (``rdcd.resume``), so a killed run loses at most the
chunk in flight and a new run with the same settings skips every finished chunk. Under ``torchrun``
each rank embeds the work units ``j % world_size == rank``; rank 0 gathers them (no shared
filesystem needed), writes the final file atomically and removes the partial folder. Files that
cannot be decoded are skipped, named on stderr and in ``OUTPUT.failures.csv``.
"""
from __future__ import annotations

import contextlib
import csv
import os
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import distributed as du
from .descriptors import atomic_path, check_descriptor_suffix, unstorable_id, write_descriptors
from .images import DEFAULT_MAX_PIXELS, ImageLoadError, check_unique_ids, list_images, load_image_array
from .models import DescriptorModel
from .models.runtime import ModelRuntime, resolve_runtime
from .resume import Chunk, OutputLock, plan_units, reusable_chunks, run_settings, save_chunk


@dataclass
class ExtractResult:
    ids: list[str]
    vectors: np.ndarray
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    output: Path | None = None
    seconds: float = 0.0
    model: str = ""

    @property
    def images_per_second(self) -> float:
        return (len(self.ids) + len(self.failures)) / self.seconds if self.seconds > 0 else float("nan")


class ImageFiles:
    """Decoded, resized images; a bad file yields its error instead of raising, and the files of
    ``refused`` ({index: reason}) yield that reason without being read (a map-style dataset for
    torch's DataLoader, which needs no base class)."""

    def __init__(self, paths: Sequence[Path], size: int, max_pixels: int = DEFAULT_MAX_PIXELS, draft: bool = False,
                 refused: dict[int, str] | None = None):
        self.paths, self.size, self.max_pixels, self.draft = list(paths), size, max_pixels, draft
        self.refused = refused or {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        if i in self.refused:
            return i, None, self.refused[i]
        try:
            return i, load_image_array(self.paths[i], self.size, self.max_pixels, self.draft), None
        except ImageLoadError as e:
            return i, None, e.reason


def _collate(items):
    good = [(i, a) for i, a, _ in items if a is not None]
    bad = [(i, r) for i, a, r in items if a is None]
    idx = [i for i, _ in good]
    arr = np.stack([a for _, a in good]) if good else None
    return idx, arr, bad


#: ``chunk_size=None``: a chunk is saved once it holds this many seconds of work, so a kill loses about that much
AUTO_CHUNK_SECONDS = 30.0
#: ``chunk_size=None``: the most images in one chunk, and the share of work a torchrun rank takes at a time
AUTO_UNIT = 1024


def extract(model: str | os.PathLike | DescriptorModel | ModelRuntime, images, output: str | os.PathLike | None = None,
            size: int | None = None, batch_size: int = 32, workers: int | None = None, strict: bool = False,
            chunk_size: int | None = None, progress: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
            draft: bool = True, resume: bool = True, runtime: str = "auto",
            prefetch: bool = True, precision: str = "auto", chunk_seconds: float = AUTO_CHUNK_SECONDS,
            background=None) -> ExtractResult:
    """Embed every image of a folder / file list / list of paths with ``model``.

    Writes ``output`` (``.h5`` DISC2021 layout or ``.npy`` + ids) when given, and the failures CSV
    beside it. Returns the ids (file stems, in input order, bad files left out), the vectors and
    the failures. Raises ``RuntimeError`` if nothing could be embedded, or if ``strict`` and any
    file failed (the good descriptors are written first, so no work is lost).

    Before the first image is embedded: the inputs are listed (a missing or empty folder raises),
    ids are checked unique, the output format is checked, the model is loaded, and files whose id
    the output cannot store (non-ASCII names in DISC2021 HDF5, whose readers decode ids as ASCII)
    are listed as failures up front; the rest are embedded.

    Finished chunks are saved in ``OUTPUT.partial/`` with the settings that made them
    (``rdcd.resume``); a new run reuses those made with its own settings (any chunk size) unless
    ``resume`` is off, and discards the others, saying so. ``OUTPUT.lock`` keeps a second run off
    the same output. ``chunk_size``: images per chunk; ``None`` (default) saves a chunk whenever it
    holds ``chunk_seconds`` of work (at most ``AUTO_UNIT`` images), so a kill loses about that much.

    ``model``: a name, file or loaded model, resolved here (``rdcd.models.runtime.resolve_runtime``),
    or a ``ModelRuntime`` resolved once by a caller that embeds several sets. ``runtime``: ``auto`` runs a PyTorch model file on the CPU through ONNX Runtime (same
    descriptors to fp32 rounding, faster; see ``rdcd.export.choose_runtime``), ``torch`` keeps
    PyTorch, ``onnxruntime`` converts any PyTorch model. ``precision``: ``auto`` runs a shipped
    model's int8 file on a CPU, ``fp32`` its fp32 weights, ``int8`` insists (see ``rdcd.models.runtime.resolve_runtime``).

    ``draft`` (default on): the JPEG decoder downscales by 1/2, 1/4 or 1/8 while decoding where the
    image keeps both sides >= ``size`` (``open_image``); 3x faster decoding of camera-sized JPEGs,
    same devbench uAP (docs/bench_inference.md); ``False`` decodes every pixel first.

    ``background``: for a projection spec (``BASE+pcawDIM``, ``rdcd.models.projected``), the images
    its PCA (whitening) is fitted on; the fitted projection is cached and reused.

    ``workers``: decoding processes (default: none on <= 2 cores, where a process competes with the
    model's threads). Without workers, ``prefetch`` decodes the next batch in a thread while the model
    embeds this one (Pillow and the runtimes release the GIL).
    """
    du.init_distributed()
    paths = list_images(images)
    ids_all = check_unique_ids(paths)
    output = Path(output) if output else None
    if output is not None:
        check_descriptor_suffix(output)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk size must be at least 1, not {chunk_size}")
    if isinstance(model, ModelRuntime):  # resolved by the caller, once for several sets
        resolved = model
    else:
        from .models.projected import resolve_projection

        # BASE+pcawDIM: the projection fitted on ``background`` images (or reused from the cache) first
        model = resolve_projection(model, background, precision=precision, draft=draft, batch_size=batch_size,
                                   progress=progress)
        resolved = resolve_runtime(model, precision, runtime)
    model, how = resolved.model, resolved.how
    if "torch" in sys.modules:  # a PyTorch model (or one converted from it): this process's share of cores
        sys.modules["torch"].set_num_threads(du.cpu_threads_per_process())
    if progress and du.is_main():
        print(f"rdcd: {how}", file=sys.stderr)
    size = int(size or model.input_size)
    refused = {} if output is None else {
        i: why for i, why in enumerate(unstorable_id(image_id, output) for image_id in ids_all) if why}
    if refused and du.is_main():
        shown = "; ".join(f"{paths[i]}: {why}" for i, why in list(refused.items())[:5])
        print(f"rdcd: {len(refused)} file(s) skipped before embedding, their ids cannot be stored in {output}: "
              f"{shown}{'; ...' if len(refused) > 5 else ''}", file=sys.stderr)
    if workers is None:
        workers = 0 if du.cpu_threads_per_process() <= 2 else min(4, du.cpu_threads_per_process() // 2)
    settings = run_settings(model, size, draft, max_pixels, paths)
    dataset = ImageFiles(paths, size, max_pixels, draft, refused)
    run = dict(batch_size=batch_size, workers=workers, prefetch=prefetch, draft=draft, fixed=chunk_size is not None,
               chunk_seconds=chunk_seconds)
    with OutputLock(output) if output is not None and du.is_main() else contextlib.nullcontext():
        return _extract_locked(model, paths, ids_all, output, settings, dataset, run, chunk_size or AUTO_UNIT,
                               resume, progress, strict)


def _extract_locked(model, paths, ids_all, output, settings, dataset, run, unit, resume, progress, strict):
    partial = output.with_name(output.name + ".partial") if output else None
    kept, units = [], None
    if du.is_main():
        if partial is not None:
            kept = reusable_chunks(partial, settings, resume)
            partial.mkdir(parents=True, exist_ok=True)
        units = plan_units(len(paths), kept, unit)
    units = du.broadcast_object(units)
    du.barrier()
    mine = [u for j, u in enumerate(units) if j % du.world_size() == du.rank()]

    start = time.perf_counter()
    n_todo = sum(e - s for s, e in mine)
    bar = _progress(n_todo, progress and du.is_main(), model, du.world_size(), len(paths) - n_todo)
    save = (lambda chunk: save_chunk(partial, chunk, settings)) if partial is not None else (lambda chunk: None)
    done = _embed_units(model, dataset, mine, run, save, bar, progress)
    bar.close()
    seconds = time.perf_counter() - start

    gathered = du.gather_objects_to_main(done)
    result = ExtractResult([], np.zeros((0, model.dim), np.float32), [], output, seconds, model.name)
    if du.is_main():
        merged = sorted(kept + [c for rank_chunks in gathered for c in rank_chunks], key=lambda c: c.start)
        if merged:
            result.vectors = np.concatenate([c.vectors for c in merged])
        result.ids = [ids_all[i] for c in merged for i in c.idx]
        result.failures = [(str(paths[i]), r) for c in merged for i, r in c.failed]
        if output is not None:
            if result.ids:
                write_descriptors(output, result.ids, result.vectors,
                                  info=descriptor_info_of(model, settings["input_size"], run["draft"]))
            _write_failures(output, result.failures)
            shutil.rmtree(partial, ignore_errors=True)
        if result.failures:
            print(f"rdcd: {len(result.failures)} file(s) skipped"
                  + (f", listed in {failures_path(output)}" if output else ""), file=sys.stderr)
    n_ok, n_bad = du.broadcast_object((len(result.ids), len(result.failures)))
    if n_ok == 0:
        raise RuntimeError(f"no image could be embedded ({n_bad} failed); see the messages above")
    if strict and n_bad:
        raise RuntimeError(f"{n_bad} file(s) could not be embedded and strict mode is on "
                           f"(the {n_ok} good descriptors were written)")
    return result


def _embed_units(model, dataset, units, run, save, bar, progress) -> list[Chunk]:
    """Embed the images of ``units`` (ranges of the input list) batch by batch, in order; a chunk is
    saved at the end of each unit and, without a fixed chunk size, whenever it holds
    ``chunk_seconds`` of work."""
    batches = [(b, min(b + run["batch_size"], e)) for s, e in units for b in range(s, e, run["batch_size"])]
    unit_ends = {e for _, e in units}
    workers = run["workers"]
    if workers:
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset, batch_sampler=[list(range(s, e)) for s, e in batches], num_workers=workers,
                            collate_fn=_collate, persistent_workers=False)
    else:  # what DataLoader does without workers, without importing torch for an ONNX model
        loader = (_collate([dataset[i] for i in range(s, e)]) for s, e in batches)
    prefetch = run["prefetch"] and workers == 0  # worker processes decode ahead already
    if progress and du.is_main() and batches:
        how = (f"in {workers} worker process(es)" if workers else "in this process"
               + (", the next batch in a thread while this one is embedded" if prefetch else ""))
        how += ("; JPEG draft mode (the decoder downscales large JPEGs; --exact-decode to decode every pixel)"
                if run["draft"] else "; every pixel decoded (--exact-decode)")
        print(f"rdcd: decoding {how}", file=sys.stderr)
    done: list[Chunk] = []
    pending = None  # the chunk being filled: start, embedded indices, vectors, failures, time started
    for (first, last), (idx, arr, bad) in zip(batches, prefetched(loader) if prefetch else loader):
        if pending is None:
            pending = (first, [], [], [], time.perf_counter())
        vecs = model.embed(arr) if arr is not None else np.zeros((0, model.dim), np.float32)
        pending[1].extend(idx)
        pending[2].extend(vecs)
        pending[3].extend(bad)
        for i, reason in bad:
            bar.write(f"rdcd: skipped {dataset.paths[i]}: {reason}", file=sys.stderr)
        bar.update(len(idx) + len(bad))
        if last in unit_ends or (not run["fixed"] and time.perf_counter() - pending[4] >= run["chunk_seconds"]):
            vectors = np.stack(pending[2]).astype(np.float32) if pending[2] else np.zeros((0, model.dim), np.float32)
            chunk = Chunk(pending[0], last, pending[1], vectors, pending[3])
            save(chunk)
            done.append(chunk)
            pending = None
    return done


def descriptor_info_of(model: DescriptorModel, size: int, draft: bool) -> dict[str, str]:
    """What a descriptor file records about how it was made (``rdcd.descriptors.descriptor_info``);
    ``rdcd match`` warns when the sets it compares differ in any of these."""
    return {"rdcd.model": model.name, "rdcd.input_size": str(size), "rdcd.decode": "draft" if draft else "exact"}


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def prefetched(iterable, depth: int = 1):
    """Iterate ``iterable`` in a background thread, up to ``depth`` items ahead; its exceptions are
    raised here. If the consumer stops early, the thread stops after the item it is on and is joined."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterable:
                if not offer(item):
                    return
            offer(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            offer(_Failed(e))

    thread = threading.Thread(target=produce, name="rdcd-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()  # returns within one item: the producer checks ``stop`` every 0.1 s while blocked


def failures_path(output: Path) -> Path:
    return output.with_name(output.stem + ".failures.csv")


def _write_failures(output: Path, failures: list[tuple[str, str]]) -> None:
    path = failures_path(output)
    if not failures:
        if path.exists():
            path.unlink()
        return
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "reason"])
            w.writerows(failures)


def _progress(total: int, enabled: bool, model: DescriptorModel, world: int, done: int):
    from tqdm.auto import tqdm

    desc = f"extract {model.name}" + (f" (rank 0 of {world})" if world > 1 else "")
    return tqdm(total=total, disable=not enabled, unit="img", desc=desc, dynamic_ncols=True,
                postfix={"resumed": done} if done else None, file=sys.stderr)

"""Image files -> descriptors, resumable and shardable.

The file list is cut into chunks (``chunk_size`` images). Each finished chunk is saved at once in
``OUTPUT.partial/`` (atomic writes), so a killed run loses at most the chunk in flight and a new
run with the same arguments skips every finished chunk. Under ``torchrun`` each rank embeds the
chunks ``i % world_size == rank``; rank 0 gathers them (no shared filesystem needed), writes
the final file atomically and removes the partial folder. Files that cannot be decoded are
skipped, named on stderr and in ``OUTPUT.failures.csv``.
"""
from __future__ import annotations

import csv
import hashlib
import json
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
from .descriptors import atomic_path, write_descriptors
from .images import DEFAULT_MAX_PIXELS, ImageLoadError, check_unique_ids, list_images, load_image_array
from .models import DescriptorModel, load_model


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
    """Decoded, resized images; a bad file yields its error instead of raising (a map-style dataset
    for torch's DataLoader, which needs no base class)."""

    def __init__(self, paths: Sequence[Path], size: int, max_pixels: int = DEFAULT_MAX_PIXELS, draft: bool = False):
        self.paths, self.size, self.max_pixels, self.draft = list(paths), size, max_pixels, draft

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
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


def _chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def _run_key(model: DescriptorModel, size: int, paths: Sequence[Path], chunk_size: int, draft: bool = True) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([type(model).__name__, model.name, model.dim, size, chunk_size,
                         "draft-decode" if draft else "exact-decode"]).encode())
    for p in paths:
        h.update(str(p).encode() + b"\0")
    return h.hexdigest()[:16]


def extract(model: str | os.PathLike | DescriptorModel, images, output: str | os.PathLike | None = None,
            size: int | None = None, batch_size: int = 32, workers: int | None = None, strict: bool = False,
            chunk_size: int = 1024, progress: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
            draft: bool = True, resume: bool = True, runtime: str = "auto",
            prefetch: bool = True, precision: str = "auto", background=None) -> ExtractResult:
    """Embed every image of a folder / file list / list of paths with ``model``.

    Writes ``output`` (``.h5`` DISC2021 layout or ``.npy`` + ids) when given, and the failures CSV
    beside it. Returns the ids (file stems, in input order, bad files left out), the vectors and
    the failures. Raises ``RuntimeError`` if nothing could be embedded, or if ``strict`` and any
    file failed (the good descriptors are written first, so no work is lost).

    ``runtime``: ``auto`` runs a PyTorch model file on the CPU through ONNX Runtime (same
    descriptors to fp32 rounding, faster; see ``rdcd.export.choose_runtime``), ``torch`` keeps
    PyTorch, ``onnxruntime`` converts any PyTorch model. ``precision``: ``auto`` runs a shipped
    model's int8 file on a CPU, ``fp32`` its fp32 weights, ``int8`` insists (see ``prepare_model``).

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
    from .models.projected import resolve_projection

    # BASE+pcawDIM: the projection fitted on ``background`` images (or reused from the cache) first
    model = resolve_projection(model, background, precision=precision, draft=draft, batch_size=batch_size,
                               progress=progress)
    model, how = prepare_model(model, runtime, precision)
    if "torch" in sys.modules:  # a PyTorch model (or one converted from it): this process's share of cores
        sys.modules["torch"].set_num_threads(du.cpu_threads_per_process())
    if progress and du.is_main():
        print(f"rdcd: {how}", file=sys.stderr)
    size = int(size or model.input_size)
    paths = list_images(images)
    ids_all = check_unique_ids(paths)
    if workers is None:
        workers = 0 if du.cpu_threads_per_process() <= 2 else min(4, du.cpu_threads_per_process() // 2)

    output = Path(output) if output else None
    partial = output.with_name(output.name + ".partial") if output else None
    key = _run_key(model, size, paths, chunk_size, draft)
    if partial is not None and du.is_main():
        _prepare_partial(partial, key, resume)
    du.barrier()

    chunks = _chunk_bounds(len(paths), chunk_size)
    mine = [c for c in range(len(chunks)) if c % du.world_size() == du.rank()]
    results: dict[int, tuple[list[int], np.ndarray, list[tuple[int, str]]]] = {}
    todo = []
    for c in mine:
        saved = _load_chunk(partial, c) if partial is not None else None
        if saved is not None:
            results[c] = saved
        else:
            todo.append(c)

    start = time.perf_counter()
    n_todo = sum(chunks[c][1] - chunks[c][0] for c in todo)
    bar = _progress(n_todo, progress and du.is_main(), model, du.world_size(), len(paths) - n_todo)
    dataset = ImageFiles(paths, size, max_pixels, draft)
    batches = [list(range(s, e))[b:b + batch_size] for c in todo for s, e in [chunks[c]]
               for b in range(0, e - s, batch_size)]
    if workers:
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                            persistent_workers=False)
    else:  # what DataLoader does without workers, without importing torch for an ONNX model
        loader = (_collate([dataset[i] for i in batch]) for batch in batches)
    prefetch = prefetch and workers == 0  # worker processes decode ahead already
    if progress and du.is_main() and batches:
        how = (f"in {workers} worker process(es)" if workers else "in this process"
               + (", the next batch in a thread while this one is embedded" if prefetch else ""))
        how += ("; JPEG draft mode (the decoder downscales large JPEGs; --exact-decode to decode every pixel)"
                if draft else "; every pixel decoded (--exact-decode)")
        print(f"rdcd: decoding {how}", file=sys.stderr)
    pending: dict[int, list] = {c: [[], [], []] for c in todo}
    chunk_of = {i: c for c in todo for i in range(*chunks[c])}
    remaining = {c: chunks[c][1] - chunks[c][0] for c in todo}
    for idx, arr, bad in (prefetched(loader) if prefetch else loader):
        vecs = model.embed(arr) if arr is not None else np.zeros((0, model.dim), np.float32)
        for i, v in zip(idx, vecs):
            c = chunk_of[i]
            pending[c][0].append(i)
            pending[c][1].append(v)
            remaining[c] -= 1
        for i, reason in bad:
            c = chunk_of[i]
            pending[c][2].append((i, reason))
            remaining[c] -= 1
            bar.write(f"rdcd: skipped {paths[i]}: {reason}", file=sys.stderr)
        bar.update(len(idx) + len(bad))
        for c in [c for c in list(pending) if remaining[c] == 0]:
            got_idx, got_vecs, got_bad = pending.pop(c)
            vec = np.stack(got_vecs).astype(np.float32) if got_vecs else np.zeros((0, model.dim), np.float32)
            results[c] = (got_idx, vec, got_bad)
            if partial is not None:
                _save_chunk(partial, c, *results[c])
    bar.close()
    seconds = time.perf_counter() - start

    gathered = du.gather_objects_to_main(results)
    result = ExtractResult([], np.zeros((0, model.dim), np.float32), [], output, seconds, model.name)
    if du.is_main():
        merged = {c: part for ranks_results in gathered for c, part in ranks_results.items()}
        order = sorted(merged)
        idx = [i for c in order for i in merged[c][0]]
        if order:
            result.vectors = np.concatenate([merged[c][1] for c in order])
        result.ids = [ids_all[i] for i in idx]
        result.failures = [(str(paths[i]), r) for c in order for i, r in merged[c][2]]
        if output is not None:
            if result.ids:
                write_descriptors(output, result.ids, result.vectors, info=descriptor_info_of(model, size, draft))
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


PRECISIONS = ("auto", "fp32", "int8")


def shipped_int8(model, runtime: str = "auto", precision: str = "auto", warn: bool = False) -> Path | None:
    """The shipped int8 file ``prepare_model`` runs for ``model`` with these settings, else None
    (not a shipped model, no valid int8 file, ``precision`` fp32, ``runtime`` torch, or a GPU with
    ``precision`` auto). ``precision`` chooses between a shipped student's fp32 weights and its int8
    file; any other model runs as it is (with ``warn``, a note says so when ``precision`` is not
    auto). Raises for ``precision="int8"`` on a shipped model without a valid int8 file."""
    from .models.shipped import card_for, int8_file

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    card = None if isinstance(model, DescriptorModel) else card_for(model)
    if card is None:
        if warn and precision != "auto":
            name = getattr(model, "name", model)
            print(f"rdcd: note: --precision {precision} chooses between a shipped student's fp32 weights and its "
                  f"int8 file; {name} is not one and runs as it is (int8 of another model: rdcd export "
                  "--precision int8, then --model FILE)", file=sys.stderr)
        return None
    if precision == "fp32":
        return None
    path, why_not = int8_file(card)
    if precision == "int8" and path is None:
        raise ValueError(f"{model}: --precision int8, but {why_not}")
    if precision == "int8" and runtime == "torch":
        raise ValueError("precision int8 runs in ONNX Runtime only; drop --runtime torch")
    if path is None:
        if warn and card.get("int8"):
            print(f"rdcd: warning: {card['name']}: {why_not}; using fp32", file=sys.stderr)
        return None
    if runtime == "torch" or (precision == "auto" and du.gpu_available()):
        return None
    return path


def prepare_model(model: str | os.PathLike | DescriptorModel, runtime: str = "auto",
                  precision: str = "auto") -> tuple[DescriptorModel, str]:
    """Load ``model`` once and pick how it runs; returns it and a line saying how. Callers embedding
    several sets (``rdcd.match``) call this once and pass the result.

    A shipped model (name or weights path) with an int8 file runs that file in ONNX Runtime when
    ``precision`` is ``auto`` (or ``int8``), ``runtime`` allows ONNX Runtime and no GPU would run
    PyTorch: the fastest path measured on CPU (docs/bench_inference.md), descriptors within cosine
    ~0.99 of fp32 and devbench uAP within a point (model cards). Otherwise
    ``rdcd.export.choose_runtime`` (fp32: ONNX Runtime for PyTorch files on a CPU)."""
    from .models import model_file
    from .models.shipped import card_for

    int8 = shipped_int8(model, runtime, precision, warn=True)
    if int8 is not None:
        from .models.onnx import OnnxModel

        card = card_for(model)
        # on the CPU whatever else is installed: an int8 QDQ graph is a CPU format here
        fast = OnnxModel(int8, input_size=card.get("input_size"), threads=du.cpu_threads_per_process(),
                         providers=["CPUExecutionProvider"])
        return fast, (f"{card['name']} runs with ONNX Runtime int8 on the CPU (shipped file {int8.name}; "
                      "--precision fp32 for the fp32 weights)")
    shipped = None if isinstance(model, DescriptorModel) else model_file(model)
    if shipped is not None and shipped.suffix != ".npz":
        model = shipped  # a shipped student: its file, which may run in ONNX Runtime
    from_file = not isinstance(model, DescriptorModel) and Path(model).is_file()
    loaded = resolve_model(model)
    if not loaded.runs_torch and runtime != "onnxruntime":  # ONNX files, hashes, projections of them
        from .models import runtime_line

        return loaded, runtime_line(loaded)
    from .export import choose_runtime  # imports torch, which the models above run without

    return choose_runtime(loaded, runtime, from_file, du.cpu_threads_per_process())


def resolve_model(model: str | os.PathLike | DescriptorModel) -> DescriptorModel:
    """The model ``extract`` embeds with: a DescriptorModel as is, else loaded (PyTorch ones on this rank's GPU, if any).

    Load once and pass the result when embedding several sets: an untrained ``student:`` spec
    gets new random weights at every load.
    """
    if isinstance(model, DescriptorModel):
        return model
    return load_model(model, **({"device": du.default_device()} if _is_torch_spec(model) else {}))


def _is_torch_spec(model) -> bool:
    s = str(model)
    return s.startswith("student:") or s.endswith((".pt", ".pth"))


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


def _prepare_partial(partial: Path, key: str, resume: bool) -> None:
    marker = partial / "run.json"
    if partial.exists():
        same = marker.exists() and json.loads(marker.read_text()).get("key") == key
        if resume and same:
            n = len(list(partial.glob("chunk_*.npz")))
            print(f"rdcd: resuming, {n} finished chunk(s) found in {partial}", file=sys.stderr)
            return
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    marker.write_text(json.dumps({"key": key}))


def _chunk_file(partial: Path, c: int) -> Path:
    return partial / f"chunk_{c:06d}.npz"


def _save_chunk(partial: Path, c: int, idx, vec, bad) -> None:
    with atomic_path(_chunk_file(partial, c), ".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, idx=np.asarray(idx, np.int64), vec=vec,
                     bad_idx=np.asarray([i for i, _ in bad], np.int64),
                     bad_reason=np.asarray([r for _, r in bad], dtype=str))


def _load_chunk(partial: Path, c: int):
    f = _chunk_file(partial, c)
    if not f.exists():
        return None
    with np.load(f) as z:
        return list(z["idx"].tolist()), z["vec"], list(zip(z["bad_idx"].tolist(), z["bad_reason"].tolist()))


def _progress(total: int, enabled: bool, model: DescriptorModel, world: int, done: int):
    from tqdm.auto import tqdm

    desc = f"extract {model.name}" + (f" (rank 0 of {world})" if world > 1 else "")
    return tqdm(total=total, disable=not enabled, unit="img", desc=desc, dynamic_ncols=True,
                postfix={"resumed": done} if done else None, file=sys.stderr)

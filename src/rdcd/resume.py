"""The saved state of an extraction: chunk files that record how they were made, and a lock.

Every finished chunk is saved as ``OUTPUT.partial/chunk_START-END.npz`` (images START..END-1 of
the input list) together with the settings that made it: a fingerprint of the model as it runs
(weights file hash, runtime), input size, decoding, pixel limit and a hash of the ordered input
list. A new run reuses exactly the chunks whose settings equal its own, whatever chunk size it
uses, and says on stderr what it discarded and why. ``OutputLock`` keeps a second run off the
same output while one is writing it.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .descriptors import atomic_path
from .models import DescriptorModel


def model_fingerprint(model: DescriptorModel) -> str:
    """What identifies the descriptors ``model`` makes: the hash of the file it runs (an ONNX file:
    the int8 or fp32 export, so precision and runtime are in it), else of its PyTorch weights (a
    projection model: its base's fingerprint and the fitted projection), else (hashes) its class,
    name and dimension."""
    from .models.projected import ProjectedModel
    from .models.shipped import file_sha256

    if isinstance(model, ProjectedModel):  # the base's fingerprint and the fitted projection's numbers
        h = hashlib.sha256(model_fingerprint(model.base).encode())
        for array in (model.projection.mean_, model.projection.projection_):
            h.update(np.ascontiguousarray(array).tobytes())
        return f"{type(model).__name__}:{h.hexdigest()}"
    path = getattr(model, "path", None)
    if path is not None and Path(path).is_file():
        return f"{type(model).__name__}:{file_sha256(path)}"
    module = getattr(model, "module", None)
    if module is not None and hasattr(module, "state_dict"):
        h = hashlib.sha256()
        for key, tensor in module.state_dict().items():
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return f"{type(model).__name__}:{h.hexdigest()}"
    return json.dumps([type(model).__name__, model.name, model.dim])


def input_list_hash(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def run_settings(model: DescriptorModel, size: int, draft: bool, max_pixels: int, paths: Sequence[Path]) -> dict:
    """Everything a saved chunk's descriptors depend on; chunks are reused only under equal settings."""
    return {"model": model.name, "model_fingerprint": model_fingerprint(model), "dim": int(model.dim),
            "input_size": int(size), "decode": "draft" if draft else "exact", "max_pixels": int(max_pixels),
            "n_images": len(paths), "input_list": input_list_hash(paths)}


@dataclass
class Chunk:
    """Images ``start..end-1``: the embedded ones (``idx``, ``vectors``) and the failed ones (``failed``)."""

    start: int
    end: int
    idx: list[int]
    vectors: np.ndarray
    failed: list[tuple[int, str]]


def chunk_file(partial: Path, start: int, end: int) -> Path:
    return partial / f"chunk_{start:09d}-{end:09d}.npz"


def save_chunk(partial: Path, chunk: Chunk, settings: dict) -> None:
    with atomic_path(chunk_file(partial, chunk.start, chunk.end), ".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, start=chunk.start, end=chunk.end, idx=np.asarray(chunk.idx, np.int64), vec=chunk.vectors,
                     bad_idx=np.asarray([i for i, _ in chunk.failed], np.int64),
                     bad_reason=np.asarray([r for _, r in chunk.failed], dtype=str),
                     settings=np.asarray(json.dumps(settings, sort_keys=True)))


def _read_chunk(path: Path, dim: int) -> tuple[Chunk, dict]:
    """A saved chunk and its settings; ValueError if the file is not a complete, consistent chunk."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "settings" not in z.files:
                raise ValueError("made by an older rdcd that did not record its settings")
            settings = json.loads(str(z["settings"]))
            chunk = Chunk(int(z["start"]), int(z["end"]), z["idx"].tolist(), z["vec"],
                          list(zip(z["bad_idx"].tolist(), z["bad_reason"].tolist())))
    except ValueError as e:
        if "older rdcd" in str(e):
            raise
        raise ValueError(f"unreadable ({type(e).__name__}: {e})") from None
    except Exception as e:  # a damaged file: zipfile.BadZipFile, OSError, KeyError, EOFError, ...
        raise ValueError(f"unreadable ({type(e).__name__}: {e})") from None
    covered = sorted(chunk.idx + [i for i, _ in chunk.failed])
    if (covered != list(range(chunk.start, chunk.end)) or chunk.vectors.ndim != 2
            or chunk.vectors.shape != (len(chunk.idx), dim)):
        raise ValueError("inconsistent contents")
    return chunk, settings


def _differences(saved: dict, wanted: dict) -> str:
    keys = [k for k in wanted if saved.get(k) != wanted[k]]
    if "model_fingerprint" in keys and "model" in keys:
        keys.remove("model_fingerprint")
    return ", ".join("another input list" if k == "input_list" else
                     "other model weights or runtime" if k == "model_fingerprint" else
                     f"{k} {saved.get(k)} (now {wanted[k]})" for k in keys)


def reusable_chunks(partial: Path, settings: dict, resume: bool = True) -> list[Chunk]:
    """Load the chunks of ``partial`` made with ``settings`` and delete every other chunk file,
    saying on stderr what was reused and what was discarded (and why). ``resume=False``: discard all."""
    kept: list[Chunk] = []
    discarded: dict[str, int] = {}
    files = sorted(partial.glob("chunk_*.npz")) if partial.is_dir() else []
    for path in files:
        try:
            chunk, saved = _read_chunk(path, settings["dim"])
            why = "--no-resume" if not resume else _differences(saved, settings)
            if not why and kept and chunk.start < kept[-1].end:
                why = "overlaps another saved chunk"
        except ValueError as e:
            why = str(e)
        if why:
            discarded[why] = discarded.get(why, 0) + 1
            path.unlink()
        else:
            kept.append(chunk)
    for why, n in discarded.items():
        print(f"rdcd: discarded {n} saved chunk(s) in {partial}: {why}", file=sys.stderr)
    if kept:
        n = sum(c.end - c.start for c in kept)
        print(f"rdcd: resuming, {len(kept)} finished chunk(s) ({n} images) reused from {partial}", file=sys.stderr)
    return kept


def plan_units(n: int, kept: Sequence[Chunk], unit: int) -> list[tuple[int, int]]:
    """The images ``0..n-1`` not in ``kept`` chunks, as ranges of at most ``unit`` images."""
    units, at = [], 0
    for start, end in [(c.start, c.end) for c in sorted(kept, key=lambda c: c.start)] + [(n, n)]:
        units += [(s, min(s + unit, start)) for s in range(at, start, unit)]
        at = max(at, end)
    return units


class OutputLock:
    """An exclusive lock on one output (``OUTPUT.lock``, holding the owner's pid, host and start time).

    ``flock`` makes it exclusive, and the kernel releases it when its process dies however it dies;
    a lock file left by a dead process is then taken over with a message. A second run while the
    first is alive gets a RuntimeError naming the holder."""

    def __init__(self, output: str | os.PathLike):
        self.output = Path(output)
        self.path = self.output.with_name(self.output.name + ".lock")
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise RuntimeError(f"{self.path}: cannot lock ({e.strerror}); is the filesystem read-only "
                                       "or without lock support?") from None
                raise RuntimeError(f"{self.output} is being written by another rdcd run ({_describe(holder)}); "
                                   f"wait for it to finish or write another output (lock file {self.path})") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:  # its holder finished and removed it between our open and flock
                same = False
            if same:
                break
            os.close(fd)
        stale = _read_holder(fd)
        if stale:
            print(f"rdcd: taking over the lock {self.path} of an earlier run that is gone ({_describe(stale)})",
                  file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "command": " ".join(sys.argv)}).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiting run then locks a fresh file
            os.close(self.fd)
            self.fd = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            + (f": {holder['command']}" if holder.get("command") else ""))

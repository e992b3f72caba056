"""Extraction state that cannot mix: per-chunk settings, the output lock, adaptive chunks, early id checks."""
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import picture
from rdcd.descriptors import read_descriptors
from rdcd.extract import extract
from rdcd.models import DescriptorModel, load_model


class Wrapped(DescriptorModel):
    """A real model that counts embedded images and runs ``hooks[n]`` before its n-th batch
    (a hook may raise to simulate a kill)."""

    def __init__(self, inner, hooks=None, sleep=0.0):
        self.inner, self.name, self.dim, self.input_size = inner, inner.name, inner.dim, inner.input_size
        self.hooks, self.sleep, self.batches, self.images = hooks or {}, sleep, 0, 0

    def embed(self, images):
        hook = self.hooks.get(self.batches)
        if hook is not None:
            hook()
        self.batches += 1
        self.images += len(images)
        time.sleep(self.sleep)
        return self.inner.embed(images)


def kill():
    raise KeyboardInterrupt("simulated kill")


@pytest.fixture(scope="module")
def tiny_model(tiny_student_file):
    return load_model(tiny_student_file)


def test_interleaved_runs_with_other_settings_never_mix(image_folder, tmp_path, tiny_model):
    """The issue's case: a 64 px run and a 48 px run (another chunk size) on one output, both killed,
    then the 48 px run again. The second run is refused while the first holds the output, and the
    final file equals an uninterrupted 48 px run (no 64 px rows resumed into it)."""
    out = tmp_path / "o.h5"
    clean = extract(tiny_model, image_folder, size=48, progress=False)
    refused = []

    def second_run():
        try:  # killed after its first batch, if it is allowed to start at all
            extract(Wrapped(tiny_model, {1: kill}), image_folder, output=out, size=48, chunk_size=2, batch_size=2,
                    progress=False)
        except RuntimeError as e:
            refused.append(str(e))
        except KeyboardInterrupt:
            pass

    with pytest.raises(KeyboardInterrupt):
        extract(Wrapped(tiny_model, {1: second_run, 4: kill}), image_folder, output=out, size=64, chunk_size=2,
                batch_size=2, progress=False)
    result = extract(Wrapped(tiny_model), image_folder, output=out, size=48, chunk_size=2, progress=False)
    ids, vectors = read_descriptors(out)
    assert ids == clean.ids == result.ids
    np.testing.assert_allclose(vectors, clean.vectors, atol=1e-6)
    assert refused and "being written by another rdcd run" in refused[0]
    assert f"pid {os.getpid()}" in refused[0]


def test_chunks_made_with_other_settings_are_discarded_and_named(image_folder, tmp_path, tiny_model, capsys):
    out = tmp_path / "d.h5"
    with pytest.raises(KeyboardInterrupt):
        extract(Wrapped(tiny_model, {3: kill}), image_folder, output=out, size=64, chunk_size=4, batch_size=2,
                progress=False)
    capsys.readouterr()
    counting = Wrapped(tiny_model)
    extract(counting, image_folder, output=out, size=48, chunk_size=4, batch_size=2, progress=False)
    assert counting.images == 12
    assert "discarded 1 saved chunk(s)" in capsys.readouterr().err
    np.testing.assert_allclose(read_descriptors(out)[1], extract(tiny_model, image_folder, size=48,
                                                                 progress=False).vectors, atol=1e-6)


def test_a_rerun_with_another_chunk_size_reuses_finished_work(image_folder, tmp_path, tiny_model, capsys):
    out = tmp_path / "c.h5"
    with pytest.raises(KeyboardInterrupt):  # batches of 2, chunks of 4: chunk 0..3 saved, then killed
        extract(Wrapped(tiny_model, {3: kill}), image_folder, output=out, chunk_size=4, batch_size=2, progress=False)
    capsys.readouterr()
    counting = Wrapped(tiny_model)
    extract(counting, image_folder, output=out, chunk_size=5, batch_size=2, progress=False)
    assert counting.images == 8
    assert "resuming, 1 finished chunk(s) (4 images)" in capsys.readouterr().err
    ids, vectors = read_descriptors(out)
    clean = extract(tiny_model, image_folder, progress=False)
    assert ids == clean.ids
    np.testing.assert_allclose(vectors, clean.vectors, atol=1e-6)


def test_damaged_and_old_format_chunks_are_discarded(image_folder, tmp_path, tiny_model, capsys):
    out = tmp_path / "g.h5"
    partial = tmp_path / "g.h5.partial"
    partial.mkdir()
    (partial / "chunk_000000000-000000004.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.savez(partial / "chunk_000001.npz", idx=np.arange(4))  # an older rdcd's chunk: no settings recorded
    counting = Wrapped(tiny_model)
    extract(counting, image_folder, output=out, progress=False)
    err = capsys.readouterr().err
    assert counting.images == 12 and "unreadable (BadZipFile" in err and "older rdcd" in err


def test_no_resume_discards_and_says_so(image_folder, tmp_path, tiny_model, capsys):
    out = tmp_path / "n.h5"
    with pytest.raises(KeyboardInterrupt):
        extract(Wrapped(tiny_model, {3: kill}), image_folder, output=out, chunk_size=4, batch_size=2, progress=False)
    counting = Wrapped(tiny_model)
    extract(counting, image_folder, output=out, chunk_size=4, batch_size=2, progress=False, resume=False)
    assert counting.images == 12 and "discarded 1 saved chunk(s)" in capsys.readouterr().err


def test_a_stale_lock_of_a_dead_process_is_taken_over(image_folder, tmp_path, tiny_model, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "s.h5"
    lock = tmp_path / "s.h5.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": "here", "started": "earlier"}))
    extract(tiny_model, image_folder, output=out, progress=False)
    assert f"taking over the lock {lock} of an earlier run that is gone (pid {dead.pid}" in capsys.readouterr().err
    assert len(read_descriptors(out)[0]) == 12 and not lock.exists()


def test_a_live_lock_holder_is_named(image_folder, tmp_path, tiny_model):
    out = tmp_path / "l.h5"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from rdcd.resume import OutputLock\n"
                               f"with OutputLock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=f"being written by another rdcd run \\(pid {holder.pid} on "):
            extract(tiny_model, image_folder, output=out, progress=False)
    finally:
        holder.kill()
        holder.wait()
    extract(tiny_model, image_folder, output=out, progress=False)  # its lock died with it
    assert len(read_descriptors(out)[0]) == 12


def test_adaptive_chunks_are_cut_by_time(image_folder, tmp_path, tiny_model):
    """Without a chunk size a chunk is saved once it holds chunk_seconds of work: with 0.1 s a batch and
    0.25 s a chunk, a kill after 5 batches loses at most the 2 batches of the chunk in flight."""
    out = tmp_path / "a.h5"
    slow = Wrapped(tiny_model, {5: kill}, sleep=0.1)
    with pytest.raises(KeyboardInterrupt):
        extract(slow, image_folder, output=out, batch_size=2, progress=False, chunk_seconds=0.25)
    ranges = [tuple(int(x) for x in p.stem[len("chunk_"):].split("-"))
              for p in sorted((tmp_path / "a.h5.partial").glob("chunk_*.npz"))]
    assert ranges and ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    # a chunk holds at most 3 batches (0.3 s >= 0.25 s): of the 10 images embedded, at most 2 batches are lost
    assert all(end - start <= 6 for start, end in ranges) and ranges[-1][1] >= 6
    counting = Wrapped(tiny_model)
    extract(counting, image_folder, output=out, batch_size=2, progress=False, chunk_seconds=0.25)
    assert counting.images == 12 - ranges[-1][1]
    np.testing.assert_allclose(read_descriptors(out)[1], extract(tiny_model, image_folder, progress=False).vectors,
                               atol=1e-6)


def test_non_ascii_names_are_listed_before_embedding(image_folder, tmp_path, tiny_model, capsys):
    picture(99).save(image_folder / "café.jpg")
    out = tmp_path / "u.h5"
    with pytest.raises(KeyboardInterrupt):  # killed at the first batch: the message came before any embedding
        extract(Wrapped(tiny_model, {0: kill}), image_folder, output=out, progress=False)
    assert "café.jpg: id 'café' is not ASCII" in capsys.readouterr().err
    result = extract(tiny_model, image_folder, output=out, progress=False)
    assert len(result.ids) == 12 and "café" not in result.ids
    with open(tmp_path / "u.failures.csv") as fh:
        assert [r["path"].endswith("café.jpg") for r in csv.DictReader(fh)] == [True]
    # .npy keeps every id (one UTF-8 id a line)
    npy = extract(tiny_model, image_folder, output=tmp_path / "u.npy", progress=False)
    assert "café" in npy.ids and read_descriptors(tmp_path / "u.npy")[0] == npy.ids


def test_npy_ids_with_spaces_read_back(tmp_path, tiny_model):
    folder = tmp_path / "spaced"
    folder.mkdir()
    for i, name in enumerate(["my photo", "a  b"]):
        picture(i).save(folder / f"{name}.png")
    result = extract(tiny_model, folder, output=tmp_path / "s.npy", progress=False)
    assert read_descriptors(tmp_path / "s.npy")[0] == result.ids == ["a  b", "my photo"]


def test_unknown_output_format_fails_before_the_model_loads(image_folder, tmp_path):
    with pytest.raises(ValueError, match="unknown descriptor format '.csv'"):
        extract("no-such-model-file.onnx", image_folder, output=tmp_path / "x.csv", progress=False)

"""Extraction: bad files skipped and listed, DISC2021 output, resume, atomic saves, torchrun shards."""
import csv
import io
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import picture
from rdcd.descriptors import read_descriptors, write_descriptors
from rdcd.extract import extract
from rdcd.models import DescriptorModel, load_model


class CountingModel(DescriptorModel):
    """Wraps a real model, counts embedded images, and can crash after a number of batches."""

    def __init__(self, inner, crash_after_batches=None):
        self.inner, self.name, self.dim, self.input_size = inner, inner.name, inner.dim, inner.input_size
        self.images, self.batches, self.crash_after = 0, 0, crash_after_batches

    def embed(self, images):
        if self.crash_after is not None and self.batches >= self.crash_after:
            raise KeyboardInterrupt("simulated kill")
        self.batches += 1
        self.images += len(images)
        return self.inner.embed(images)


@pytest.fixture
def messy_folder(tmp_path):
    """Good images in many modes plus every kind of bad file."""
    d = tmp_path / "messy"
    d.mkdir()
    base = picture(5, (120, 90))
    good = {"rgb.jpg": base, "gray.png": base.convert("L"), "one.png": base.convert("1"),
            "cmyk.jpg": base.convert("CMYK"), "la.png": base.convert("LA"), "pal.gif": base.convert("P"),
            "rgba.webp": base.convert("RGBA"),
            "deep.png": Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257))}
    for name, im in good.items():
        im.save(d / name)
    buf = io.BytesIO()
    picture(6, (300, 300)).save(buf, "JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[:2000])
    (d / "zero.jpg").write_bytes(b"")
    (d / "notimage.png").write_text("plain text")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(500))
    Image.new("1", (2500, 2500)).save(d / "bomb.png")
    bad = {"truncated.jpg", "zero.jpg", "notimage.png", "corrupt.png", "bomb.png"}
    return d, set(good), bad


@pytest.fixture(scope="module")
def tiny_model(tiny_student_file):
    return load_model(tiny_student_file)


def test_messy_folder_good_embedded_bad_listed(messy_folder, tmp_path, tiny_model, capsys):
    folder, good, bad = messy_folder
    out = tmp_path / "out.h5"
    r = extract(tiny_model, folder, output=out, max_pixels=4_000_000, progress=False, batch_size=3)
    assert sorted(r.ids) == sorted(os.path.splitext(n)[0] for n in good)
    assert {os.path.basename(p) for p, _ in r.failures} == bad
    err = capsys.readouterr().err
    for name in bad:
        assert name in err
    with open(tmp_path / "out.failures.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {os.path.basename(r["path"]) for r in rows} == bad and all(r["reason"] for r in rows)
    # a plain h5py reader expecting the DISC2021 layout
    with h5py.File(out, "r") as f:
        vec, names = f["vectors"][()], f["image_names"][()]
    assert vec.dtype == np.float32 and vec.shape == (len(good), 32)
    assert names.dtype.kind == "S" and sorted(n.decode() for n in names) == sorted(r.ids)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1, atol=1e-5)


def test_nothing_embeddable_and_strict(tmp_path, tiny_model, messy_folder):
    empty_ish = tmp_path / "bad"
    empty_ish.mkdir()
    (empty_ish / "a.jpg").write_bytes(b"")
    with pytest.raises(RuntimeError, match="no image could be embedded"):
        extract(tiny_model, empty_ish, output=tmp_path / "x.h5", progress=False)
    folder, good, _ = messy_folder
    with pytest.raises(RuntimeError, match="strict"):
        extract(tiny_model, folder, output=tmp_path / "s.h5", strict=True, max_pixels=4_000_000, progress=False)
    assert len(read_descriptors(tmp_path / "s.h5")[0]) == len(good), "good descriptors are kept in strict mode"


def test_npy_output_and_order(image_folder, tmp_path, tiny_model):
    r = extract(tiny_model, image_folder, output=tmp_path / "d.npy", progress=False)
    ids, vec = read_descriptors(tmp_path / "d.npy")
    assert ids == r.ids == [f"img{i:03d}" for i in range(12)]
    np.testing.assert_array_equal(vec, r.vectors)


def test_prefetch_thread_changes_nothing_but_the_overlap(messy_folder, tmp_path, tiny_model, monkeypatch):
    import rdcd.extract as extract_module

    calls = []
    real = extract_module.prefetched
    monkeypatch.setattr(extract_module, "prefetched", lambda it: calls.append(1) or real(it))
    folder, good, bad = messy_folder
    kw = dict(batch_size=3, workers=0, max_pixels=4_000_000, progress=False)
    on = extract(tiny_model, folder, prefetch=True, **kw)
    off = extract(tiny_model, folder, prefetch=False, **kw)
    assert on.ids == off.ids and len(on.ids) == len(good)
    np.testing.assert_array_equal(on.vectors, off.vectors)
    assert sorted(on.failures) == sorted(off.failures) and len(on.failures) == len(bad)
    assert len(calls) == 1  # the thread ran only where asked (workers 0, prefetch on)
    extract(tiny_model, folder, prefetch=True, **dict(kw, workers=1))
    assert len(calls) == 1  # worker processes decode ahead already: no thread


def test_prefetched_keeps_order_raises_and_stops():
    import threading

    from rdcd.extract import prefetched

    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))

    # it runs ahead: while the consumer holds item 0, the thread fetches item 1 (a plain loop would not)
    fetched = []

    def source():
        for i in range(3):
            fetched.append(i)
            yield i

    ahead = prefetched(source())
    assert next(ahead) == 0
    deadline = time.time() + 5
    while len(fetched) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert fetched[:2] == [0, 1]
    assert list(ahead) == [1, 2]

    def broken():
        yield 1
        raise OSError("disk gone")

    got = prefetched(broken())
    assert next(got) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(got)
    # a consumer that stops early releases the producer thread (it would block on a full queue)
    early = prefetched(iter(range(10**9)))
    assert next(early) == 0
    early.close()
    assert not [t for t in threading.enumerate() if t.name == "rdcd-prefetch"]


def test_resume_after_crash_recomputes_nothing(image_folder, tmp_path, tiny_model):
    out = tmp_path / "r.h5"
    reference = extract(tiny_model, image_folder, progress=False)
    crashing = CountingModel(tiny_model, crash_after_batches=3)
    with pytest.raises(KeyboardInterrupt):
        extract(crashing, image_folder, output=out, chunk_size=4, batch_size=2, progress=False)
    assert not out.exists()
    assert len(list((tmp_path / "r.h5.partial").glob("chunk_*.npz"))) == 1  # 3 batches of 2 = chunk 0 only
    counting = CountingModel(tiny_model)
    extract(counting, image_folder, output=out, chunk_size=4, batch_size=2, progress=False)
    assert counting.images == 12 - 4, "finished chunk must not be recomputed"
    ids, vec = read_descriptors(out)
    assert ids == reference.ids and len(set(ids)) == 12
    np.testing.assert_allclose(vec, reference.vectors, atol=1e-6)
    assert not (tmp_path / "r.h5.partial").exists()


def test_changed_input_list_restarts(image_folder, tmp_path, tiny_model):
    out = tmp_path / "c.h5"
    with pytest.raises(KeyboardInterrupt):
        extract(CountingModel(tiny_model, 2), image_folder, output=out, chunk_size=4, batch_size=2, progress=False)
    (image_folder / "img000.jpg").unlink()
    counting = CountingModel(tiny_model)
    extract(counting, image_folder, output=out, chunk_size=4, batch_size=2, progress=False)
    assert counting.images == 11


def test_killed_save_leaves_old_file(tmp_path, monkeypatch):
    out = tmp_path / "keep.h5"
    write_descriptors(out, ["a", "b"], np.eye(2, dtype=np.float32))
    before = out.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(h5py.File, "create_dataset", boom)
    with pytest.raises(OSError):
        write_descriptors(out, ["c"], np.ones((1, 2), np.float32))
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.h5"], "no temporary file left behind"


@pytest.mark.slow
def test_cli_resume_after_sigkill(image_folder, tmp_path, tiny_student_file):
    for i in range(12, 60):
        picture(i).save(image_folder / f"img{i:03d}.jpg")
    out = tmp_path / "k.h5"
    cmd = [sys.executable, "-m", "rdcd", "extract", "--model", str(tiny_student_file), "--images",
           str(image_folder), "--output", str(out), "--chunk-size", "8", "--batch-size", "4", "--size", "160"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "k.h5.partial"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(partial.glob("chunk_*.npz"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("extraction finished before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(partial.glob("chunk_*.npz")))
    assert done >= 2 and not out.exists()
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert f"resuming, {done} finished chunk(s)" in res.stderr
    ids, vec = read_descriptors(out)
    assert len(ids) == len(set(ids)) == 60
    fresh = extract(load_model(tiny_student_file), image_folder, size=160, progress=False)
    assert ids == fresh.ids
    np.testing.assert_allclose(vec, fresh.vectors, atol=1e-5)


@pytest.mark.slow
def test_torchrun_two_processes_match_single(image_folder, tmp_path, tiny_student_file, tiny_model):
    (image_folder / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "ddp.h5"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "rdcd", "extract", "--model", str(tiny_student_file), "--images", str(image_folder),
                          "--output", str(out), "--chunk-size", "3", "--batch-size", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ids, vec = read_descriptors(out)
    single = extract(tiny_model, image_folder, progress=False)
    assert ids == single.ids and len(ids) == 12
    np.testing.assert_allclose(vec, single.vectors, atol=1e-5)
    with open(tmp_path / "ddp.failures.csv") as fh:
        assert "broken.jpg" in fh.read()


def test_cli_says_how_it_decodes(image_folder, tmp_path, tiny_student_file, capsys):
    from rdcd.cli import main

    args = ["extract", "--model", str(tiny_student_file), "--images", str(image_folder), "--workers", "0"]
    assert main(args + ["--output", str(tmp_path / "a.h5")]) == 0
    assert "the next batch in a thread" in capsys.readouterr().err
    assert main(args + ["--output", str(tmp_path / "b.h5"), "--no-prefetch"]) == 0
    err = capsys.readouterr().err
    assert "decoding in this process" in err and "thread" not in err
    np.testing.assert_array_equal(read_descriptors(tmp_path / "a.h5")[1], read_descriptors(tmp_path / "b.h5")[1])


def test_draft_decoding_is_the_default_and_exact_decode_turns_it_off(tmp_path, tiny_model, tiny_student_file,
                                                                      monkeypatch, capsys):
    """JPEG draft mode (the decoder downscales) is on by default; --exact-decode / draft=False
    decodes every pixel; a run interrupted in one mode restarts, not resumes, in the other."""
    import rdcd.extract as ex
    from rdcd.cli import main

    folder = tmp_path / "large"
    folder.mkdir()
    for i in range(4):  # >= 2x the input size, so the decoder can downscale
        picture(i, (400, 300)).save(folder / f"p{i}.jpg", quality=92)
    seen = []
    real = ex.load_image_array

    def spy(path, size, max_pixels, draft=False):
        seen.append(draft)
        return real(path, size, max_pixels, draft)

    monkeypatch.setattr(ex, "load_image_array", spy)
    fast = extract(tiny_model, folder, size=64, progress=False, workers=0)  # decoded here, where the spy is
    assert seen and all(seen)
    seen.clear()
    exact = extract(tiny_model, folder, size=64, progress=False, draft=False, workers=0)
    assert seen and not any(seen)
    assert fast.ids == exact.ids and not np.array_equal(fast.vectors, exact.vectors)  # other pixels

    args = ["extract", "--model", str(tiny_student_file), "--images", str(folder), "--workers", "0", "--size", "64"]
    assert main(args + ["--output", str(tmp_path / "a.npy")]) == 0
    assert "JPEG draft mode" in capsys.readouterr().err
    assert main(args + ["--output", str(tmp_path / "b.npy"), "--exact-decode"]) == 0
    assert "every pixel decoded" in capsys.readouterr().err
    assert main(args + ["--output", str(tmp_path / "c.npy"), "--fast-decode"]) == 0  # the old flag still runs
    assert "JPEG draft mode" in capsys.readouterr().err


def test_a_run_interrupted_in_one_decoding_mode_restarts_in_the_other(image_folder, tmp_path, tiny_model):
    out = tmp_path / "d.h5"
    with pytest.raises(KeyboardInterrupt):  # chunk 0 (4 images) finished with every pixel decoded
        extract(CountingModel(tiny_model, 3), image_folder, output=out, chunk_size=4, batch_size=2, progress=False,
                draft=False)
    counting = CountingModel(tiny_model)
    extract(counting, image_folder, output=out, chunk_size=4, batch_size=2, progress=False)  # draft: the default
    assert counting.images == 12, "chunks decoded the other way must not be reused"


def test_descriptor_files_say_how_they_were_made(image_folder, tmp_path, tiny_model):
    from rdcd.descriptors import descriptor_info

    extract(tiny_model, image_folder, output=tmp_path / "d.h5", size=64, progress=False, draft=False)
    assert descriptor_info(tmp_path / "d.h5") == {"rdcd.model": tiny_model.name, "rdcd.input_size": "64",
                                                  "rdcd.decode": "exact"}
    ids, vectors = read_descriptors(tmp_path / "d.h5")  # still a plain DISC2021 file
    assert len(ids) == 12 and vectors.shape[0] == 12

"""Fault injection: `rdcd extract` and `rdcd train` SIGKILLed at seeded random moments, then run again,
end equal to an uninterrupted run; two runs on one output never mix. docs/reliability.md tabulates these."""
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import picture, picture_folder
from faults import env, kill_and_finish, kill_when, rdcd, run
from rdcd.descriptors import read_descriptors

pytestmark = pytest.mark.slow

SEEDS = (1, 2, 3)


@pytest.fixture
def many_images(tmp_path):
    folder = picture_folder(tmp_path / "images", 60)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


def _extract(model, images, out, *extra):
    return rdcd("extract", "--model", model, "--images", images, "--output", out, "--batch-size", "4",
                "--size", "160", *extra)


def _same_output(a, b):
    ids_a, vectors_a = read_descriptors(a)
    ids_b, vectors_b = read_descriptors(b)
    assert ids_a == ids_b and len(ids_a) == 60
    np.testing.assert_allclose(vectors_a, vectors_b, atol=1e-5)
    assert a.with_name(a.stem + ".failures.csv").read_text() == b.with_name(b.stem + ".failures.csv").read_text()


def test_killed_extract_ends_equal_to_an_uninterrupted_run(many_images, tmp_path, tiny_student_file):
    clean = tmp_path / "clean.h5"
    run(_extract(tiny_student_file, many_images, clean, "--chunk-size", "8"))  # exports the model to ONNX once
    _, seconds = run(_extract(tiny_student_file, many_images, clean, "--chunk-size", "8"))  # as long as a rerun
    for seed in SEEDS:
        out = tmp_path / f"killed{seed}.h5"
        report = kill_and_finish(_extract(tiny_student_file, many_images, out, "--chunk-size", "8"), seconds, seed)
        print(f"extract seed {seed}: {report}")  # docs/reliability.md counts these (pytest -s)
        assert report.kills + report.finished_early == 2
        _same_output(out, clean)
        assert not out.with_name(out.name + ".partial").exists() and not out.with_name(out.name + ".lock").exists()


def test_killed_training_ends_equal_to_an_uninterrupted_run(tmp_path):
    from test_train import loss_rows, tiny_args, tiny_onnx_teacher

    from rdcd.models import load_model

    images = tmp_path / "train_images"
    images.mkdir()
    for i in range(18):
        picture(100 + i).save(images / f"T{i:03d}.jpg", quality=90)
    teacher = tiny_onnx_teacher(tmp_path / "teacher.onnx")
    steps = ["--steps", "4", "--checkpoint-every", "1"]
    _, seconds = run(rdcd(*tiny_args(images, tmp_path / "clean", teacher, *steps)))
    clean_weights = load_model(tmp_path / "clean" / "model.pt").module.state_dict()
    for seed in SEEDS[:2]:
        out = tmp_path / f"killed{seed}"
        report = kill_and_finish(rdcd(*tiny_args(images, out, teacher, *steps)), seconds, seed,
                                 rerun=rdcd(*tiny_args(images, out, teacher, *steps, "--resume")))
        print(f"train seed {seed}: {report}")
        assert loss_rows(out) == loss_rows(tmp_path / "clean")
        weights = load_model(out / "model.pt").module.state_dict()
        assert all(np.array_equal(weights[k].numpy(), v.numpy()) for k, v in clean_weights.items())


def test_concurrent_runs_on_one_output(many_images, tmp_path, tiny_student_file):
    """The issue's case: a 160 px run and a 224 px run (--chunk-size 16) on one output. The second is
    refused while the first runs (paused with SIGSTOP after its first chunk, so it is still running
    however slow the second is to start); after both are killed, the 224 px run started again writes
    exactly what an uninterrupted 224 px run writes."""
    out = tmp_path / "shared.h5"
    first = subprocess.Popen(_extract(tiny_student_file, many_images, out, "--chunk-size", "4"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    deadline = time.time() + 120
    partial = tmp_path / "shared.h5.partial"
    while time.time() < deadline and first.poll() is None and not list(partial.glob("chunk_*.npz")):
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)
    if first.poll() is not None:
        pytest.skip("the first run ended before it could be paused")
    second = _extract(tiny_student_file, many_images, out, "--chunk-size", "16")
    second[second.index("160")] = "224"
    try:
        refused = subprocess.run(second, capture_output=True, text=True, env=env())
    finally:
        first.kill()
        first.wait()
    assert refused.returncode == 1
    assert f"is being written by another rdcd run (pid {first.pid} on " in refused.stderr
    # killed once it has saved a chunk of its own (16 images; the first run's chunks hold 4)
    assert kill_when(second, lambda: any(_images_in(p) == 16 for p in partial.glob("chunk_*.npz")))
    run(second)
    clean = tmp_path / "clean224.h5"
    run([a if a != str(out) else str(clean) for a in second])
    _same_output(out, clean)


def _images_in(chunk_file) -> int:
    start, end = chunk_file.stem[len("chunk_"):].split("-")
    return int(end) - int(start)

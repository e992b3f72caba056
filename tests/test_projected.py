"""Projection models: BASE[@SIZE]+pca[w]DIM specs, fitted on background images, cached, benchmarked."""
import os

import numpy as np
import pytest

from conftest import picture
from rdcd.bench import run_bench
from rdcd.benchmark_builder import make_benchmark
from rdcd.cli import main
from rdcd.descriptors import descriptor_info, read_descriptors
from rdcd.extract import extract
from rdcd.metrics import evaluate, read_ground_truth
from rdcd.models import load_model
from rdcd.models.projected import ProjectedModel, fit_projection, parse_projection, parse_sized
from rdcd.postprocess import PCAWhitening
from rdcd.search import Index, knn_pairs


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RDCD_CACHE", str(tmp_path / "cache"))


def test_specs_parse_and_files_are_never_parsed(tmp_path):
    p = parse_projection("sscd-distilled@160+pcaw128")
    assert (p.base, p.size, p.whiten, p.dim) == ("sscd-distilled", 160, True, 128)
    assert p.base_spec == "sscd-distilled@160" and p.name == "sscd-distilled@160+pcaw128"
    p = parse_projection("student:mobilenetv3_large_100:32+pca8")
    assert (p.base, p.size, p.whiten, p.dim) == ("student:mobilenetv3_large_100:32", None, False, 8)
    assert parse_projection("sscd") is None and parse_projection("sscd+pcaw") is None
    assert parse_sized("sscd@224") == ("sscd", 224) and parse_sized("sscd") is None
    odd = tmp_path / "model+pcaw8"  # a file with such a name is a file
    odd.write_bytes(b"x")
    assert parse_projection(str(odd)) is None


def test_plain_pca_projects_without_scaling():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) * np.array([5.0, 3.0, 1.0, 0.5, 0.1])
    pca = PCAWhitening(2, whiten=False).fit(x)
    projected = (x - pca.mean_) @ pca.projection_
    assert np.allclose(np.var(projected, axis=0, ddof=1), np.var(x[:, :2], axis=0, ddof=1), rtol=0.1)
    assert np.allclose(pca.projection_.T @ pca.projection_, np.eye(2), atol=1e-5)  # orthonormal, not scaled


def test_fitted_projection_is_a_model_file_reused_from_the_cache(tiny_student_file, image_folder, tmp_path):
    spec = f"{tiny_student_file}+pcaw8"
    with pytest.raises(ValueError, match="--background"):
        load_model(spec)
    path = fit_projection(spec, image_folder, progress=False)
    mtime = os.stat(path).st_mtime_ns
    assert fit_projection(spec, image_folder, progress=False) == path and os.stat(path).st_mtime_ns == mtime

    model = load_model(str(path))
    assert isinstance(model, ProjectedModel) and model.dim == 8 and model.name == spec
    base = load_model(str(tiny_student_file))
    background = extract(base, image_folder, progress=False).vectors
    images = np.stack([np.asarray(picture(50 + i).resize((64, 64))) for i in range(3)])
    expected = PCAWhitening(8).fit(background).transform(base.embed(images))
    assert np.allclose(model.embed(images), expected, atol=2e-4)  # ONNX Runtime vs PyTorch rounding
    with pytest.raises(ValueError, match="pcaw64.*12 background images"):
        fit_projection(f"{tiny_student_file}+pcaw64", image_folder, progress=False)


def test_cli_extract_writes_projected_descriptors(tiny_student_file, image_folder, tmp_path):
    spec = f"{tiny_student_file}@48+pca6"
    out = tmp_path / "out.h5"
    assert main(["extract", "--model", spec, "--background", str(image_folder), "--images", str(image_folder),
                 "--output", str(out)]) == 0
    ids, vectors = read_descriptors(out)
    assert vectors.shape == (12, 6) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    info = descriptor_info(out)
    assert info["rdcd.model"] == spec and info["rdcd.input_size"] == "48"
    assert main(["extract", "--model", spec, "--images", str(image_folder), "--output", str(tmp_path / "x.h5")]) == 1


def test_bench_fits_each_projection_on_train_and_shares_the_base_embedding(tiny_student_file, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(44):
        picture(seed, (128, 96)).save(images / f"img{seed:03d}.png")
    bench = tmp_path / "bench"
    make_benchmark(images, bench, references=10, queries_per_ref=2, negative_fraction=0.5, seed=0)
    base = str(tiny_student_file)
    rows = run_bench(bench, [base, f"{base}+pcaw8", f"{base}+pca4"], progress=False)
    assert [r["dim"] for r in rows] == [32, 8, 4] and [r["bytes_per_image"] for r in rows] == [128, 32, 16]
    assert "PCA whitening to 8 dims" in rows[1]["runtime"]
    # by hand: whitening fitted on train/, kNN of the whitened queries among the whitened references
    model = load_model(base)
    sets = {name: extract(model, bench / name, progress=False) for name in ("queries", "references", "train")}
    whitening = PCAWhitening(8).fit(sets["train"].vectors)
    index = Index.build(sets["references"].ids, whitening.transform(sets["references"].vectors))
    predictions = knn_pairs(sets["queries"].ids, whitening.transform(sets["queries"].vectors), index, k=10)
    assert rows[1]["uAP"] == pytest.approx(evaluate(predictions, read_ground_truth(bench / "ground_truth.csv"))["uAP"])


def test_gem_spec_gives_the_backbone_features():
    model = load_model("gem:mobilenetv3_large_100", input_size=64)
    out = model.embed(np.zeros((2, 64, 64, 3), np.uint8) + 128)
    assert out.shape == (2, model.dim) and model.dim == 960  # conv_head is never reached: dropped
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


def test_a_refitted_projection_never_reuses_chunks_of_the_old_one(tiny_student_file, image_folder, tmp_path):
    """Same name, same base, another fit: the saved chunks' settings differ, so a resume re-embeds."""
    from rdcd.resume import model_fingerprint

    spec = f"{tiny_student_file}+pcaw6"
    first = load_model(str(fit_projection(spec, image_folder, output=tmp_path / "a.npz", progress=False)))
    fewer = sorted(image_folder.iterdir())[:9]
    second = load_model(str(fit_projection(spec, fewer, output=tmp_path / "b.npz", progress=False)))
    assert first.name == second.name
    assert model_fingerprint(first) != model_fingerprint(second)
    assert model_fingerprint(first) == model_fingerprint(load_model(str(tmp_path / "a.npz")))


def test_the_cached_fit_follows_a_base_file_that_changed(tiny_student_file, image_folder, tmp_path):
    import shutil

    from rdcd.models.student import build_student, save_student

    base = tmp_path / "model.pt"
    shutil.copy(tiny_student_file, base)
    first = fit_projection(f"{base}+pcaw6", image_folder, progress=False)
    save_student(build_student("mobilenetv3_large_100", dim=32, kd_dim=64, input_size=64), base)  # retrained
    assert fit_projection(f"{base}+pcaw6", image_folder, progress=False) != first


def test_a_trained_students_backbone_is_read_out_and_whitened_into_a_new_head(tmp_path):
    """``gem:STUDENT_FILE`` gives the student's (standardised) GeM features; ``with_pcaw_head`` keeps
    the backbone and makes the head exactly PCA whitening of those features, fitted on background
    images, at a new size; the result saves and loads as an ordinary student."""
    import torch

    from conftest import picture_folder
    from rdcd.extract import extract
    from rdcd.images import list_images
    from rdcd.models.student import (GeMFeatures, StudentModel, TorchImageModel, build_student, load_student,
                                     save_student, with_pcaw_head)
    from rdcd.postprocess import PCAWhitening

    torch.manual_seed(0)
    net = build_student("mobilenetv3_large_100", dim=6, kd_dim=12, input_size=48, feature_norm=True)
    with torch.no_grad():  # a standardisation that is not the identity
        net.feature_norm.mean.uniform_(0, 1)
        net.feature_norm.scale.uniform_(0.5, 2)
    path = save_student(net.eval(), tmp_path / "trained.pt")
    background = picture_folder(tmp_path / "bg", 20)
    others = list_images(picture_folder(tmp_path / "others", 5))

    new, n_fit = with_pcaw_head(load_student(path), background, 4)
    assert n_fit == 20 and new.config.dim == 4 and new.config.kd_dim == 4 and new.fc.out_features == 4
    assert torch.equal(new.projector.weight, torch.eye(4))
    old_state = load_student(path).state_dict()
    for key, value in new.state_dict().items():
        if not key.startswith(("fc.", "projector.")):
            assert torch.equal(value, old_state[key]), key

    unit = TorchImageModel(GeMFeatures(load_student(path)), dim=960, input_size=48)  # L2-normalised
    fitted = PCAWhitening(4).fit(extract(unit, list_images(background), progress=False).vectors)
    expected = fitted.transform(extract(unit, others, progress=False).vectors)
    shipped = load_model(str(save_student(new, tmp_path / "whitened.pt")))
    got = extract(shipped, others, progress=False).vectors
    assert got.shape == (5, 4) and np.allclose(got, expected, atol=1e-4) and shipped.net.config.head_l2norm

    readout = load_model(f"gem:{path}")  # the same read-out through a model spec
    raw = TorchImageModel(GeMFeatures(load_student(path)), dim=960, input_size=48, l2_normalize=False)
    features = extract(raw, others, progress=False).vectors
    assert np.allclose(extract(readout, others, progress=False).vectors,
                       features / np.linalg.norm(features, axis=1, keepdims=True), atol=1e-5)
    assert readout.input_size == 48
    with pytest.raises(ValueError, match="needs more than 24 images or views"):
        with_pcaw_head(load_student(path), background, 24)  # 20 background images
    with pytest.raises(ValueError, match="1 <= dim <= 960"):
        with_pcaw_head(load_student(path), background, 961)
    assert isinstance(shipped, StudentModel)

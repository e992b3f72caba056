import json

import numpy as np
import pytest

from rdcd.descriptors import write_descriptors
from rdcd.match import config_path, match
from rdcd.metrics import evaluate, read_predictions

DIM = 32


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    """A DISC-like set where raw scores mislead: 50 true copies (similarity ~0.8 to their source) and 50
    unmatched queries from a dense region that also holds many references (similarity ~0.9 to them).
    The background set samples the same dense region, so score normalisation can discount it."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("bench")
    centre = unit(rng.standard_normal((1, DIM)))
    dense = lambda n: unit(centre + 0.1 * rng.standard_normal((n, DIM)))  # noqa: E731
    sparse_refs = unit(rng.standard_normal((300, DIM)))
    refs = np.concatenate([sparse_refs, dense(200)])
    copies = unit(sparse_refs[:50] + 0.09 * rng.standard_normal((50, DIM)))
    queries = np.concatenate([copies, dense(50)])
    background = np.concatenate([dense(150), unit(rng.standard_normal((150, DIM)))])
    ref_ids = [f"R{i:06d}" for i in range(len(refs))]
    query_ids = [f"Q{i:05d}" for i in range(len(queries))]
    files = {
        "queries": write_descriptors(root / "queries.h5", query_ids, queries),
        "references": write_descriptors(root / "references.npy", ref_ids, refs),
        "background": write_descriptors(root / "train.h5", [f"T{i:06d}" for i in range(len(background))], background),
    }
    gt = {q: (ref_ids[i] if i < 50 else None) for i, q in enumerate(query_ids)}
    return root, files, gt


def test_knn_match_from_descriptor_files(synthetic_set, tmp_path):
    _, files, gt = synthetic_set
    out = tmp_path / "matches.csv"
    preds = match(files["queries"], files["references"], k=5, output=out)
    assert len(preds) == 100 * 5
    back = read_predictions(out)
    assert back.query_ids.tolist() == preds.query_ids.tolist()
    assert back.reference_ids.tolist() == preds.reference_ids.tolist()
    np.testing.assert_array_equal(back.scores.astype(np.float32), preds.scores)
    config = json.loads(config_path(out).read_text())
    assert (config["k"], config["index"], config["score_norm"]) == (5, "Flat", False)
    assert (preds.config.k, preds.config.index, preds.config.beta_source) == (5, "Flat", "SSCD's default")  # returned too
    m = evaluate(preds, gt)
    assert m["acc_at_1"] == 1.0  # every copy finds its source first
    assert m["uAP"] < 0.8  # but unmatched dense queries outrank many true pairs


def test_score_normalisation_discounts_dense_regions(synthetic_set):
    _, files, gt = synthetic_set
    plain = evaluate(match(files["queries"], files["references"]), gt)
    normalized = evaluate(
        match(files["queries"], files["references"], background=files["background"], score_norm=True), gt
    )
    assert normalized["acc_at_1"] == plain["acc_at_1"] == 1.0  # per-query ranking unchanged
    assert normalized["uAP"] > 0.95 > plain["uAP"]
    assert normalized["recall_at_p90"] is not None and normalized["recall_at_p90"] > 0.9


def test_whitening_and_global_best_n(synthetic_set):
    _, files, gt = synthetic_set
    whitened = match(files["queries"], files["references"], background=files["background"], whiten_dim=16, k=3)
    assert len(whitened) == 300
    assert evaluate(whitened, gt)["acc_at_1"] >= 0.9
    best = match(files["queries"], files["references"], global_n=60, k=2)
    assert len(best) == 60
    assert np.all(np.diff(best.scores) <= 0)
    knn = match(files["queries"], files["references"], k=100)
    np.testing.assert_allclose(best.scores, np.sort(knn.scores)[::-1][:60], atol=1e-6)


def test_in_memory_sets_and_approximate_index(synthetic_set):
    _, files, gt = synthetic_set
    from rdcd.descriptors import read_descriptors

    queries, references = read_descriptors(files["queries"]), read_descriptors(files["references"])
    preds = match(queries, references, index="IVF8,Flat", nprobe=8, k=1)
    assert evaluate(preds, gt)["acc_at_1"] == 1.0
    normalized = match(
        queries, references, index="IVF8,Flat", nprobe=8, background=files["background"], score_norm=True
    )
    assert evaluate(normalized, gt)["uAP"] > 0.95


def test_errors_say_what_to_do(synthetic_set, tmp_path):
    root, files, _ = synthetic_set
    with pytest.raises(ValueError, match="background"):
        match(files["queries"], files["references"], score_norm=True)
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="needs a model"):
        match(tmp_path / "images", files["references"])
    write_descriptors(tmp_path / "small.h5", ["a", "b"], np.eye(2, 8, dtype=np.float32))
    with pytest.raises(ValueError, match="differ in dimension \\(queries 8, references 32\\)"):
        match(tmp_path / "small.h5", files["references"])


def test_match_image_folders_use_one_model_load(image_folder, tmp_path):
    """An untrained student: spec gets random weights at each load, so match must load it once."""
    from rdcd.match import match

    preds = match(image_folder, image_folder, model="student:mobilenetv3_large_100:16", k=1,
                  keep_descriptors_dir=tmp_path / "desc")
    assert len(preds) == 12
    for q, r, s in preds.rows():
        assert q == r and s > 0.999, (q, r, s)
    assert (tmp_path / "desc" / "queries.h5").exists() and (tmp_path / "desc" / "references.h5").exists()


def test_match_with_a_student_file_keeps_extracts_onnx_runtime_path(image_folder, tiny_student_file, tmp_path,
                                                                    monkeypatch, caplog):
    import logging

    from rdcd.match import match

    monkeypatch.setenv("RDCD_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="rdcd.match"):
        preds = match(image_folder, image_folder, model=tiny_student_file, k=1)
    assert "ONNX Runtime" in caplog.text
    assert all(q == r for q, r, _ in preds.rows())

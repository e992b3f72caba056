"""The reference store on both backends: the SQLite + FAISS folder and Milvus (through milvus-lite)."""
from pathlib import Path

import numpy as np
import pytest

from rdcd.descriptors import write_descriptors
from rdcd.match import match
from rdcd.metrics import evaluate
from rdcd.store import DuplicateIdError, ReferenceStore, StoreError

from test_match import synthetic_set  # noqa: F401  (a module fixture: 100 queries, 500 references, background)

def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(params=["folder", "milvus"])
def location(request, tmp_path):
    if request.param == "milvus":
        pytest.importorskip("pymilvus")
        pytest.importorskip("milvus_lite")
        return f"milvus:{tmp_path / 'refs.db'}"
    return tmp_path / "refs.store"


def vectors_store(location, **kwargs):
    """A store of phash descriptors (64-d): the model loads instantly."""
    return ReferenceStore.create(location, "phash", **kwargs)


def test_add_query_remove_and_reopen(location):
    rng = np.random.default_rng(1)
    refs = unit(rng.standard_normal((40, 64)))
    store = vectors_store(location)
    assert store.add([f"R{i}" for i in range(40)], refs, [{"label": "batch1"}] * 40) == 40
    predictions = store.query(["q"], refs[7:8] + 0.01, k=3)
    assert predictions.reference_ids[0] == "R7" and len(predictions) == 3
    assert store.remove(["R7", "absent"]) == ["R7"]
    assert "R7" not in store and "R8" in store and len(store) == 39
    assert store.get("R8")["label"] == "batch1" and store.get("R8")["added"] > 0
    store.close()
    reopened = ReferenceStore.open(location)
    assert len(reopened) == 39
    assert reopened.query(["q"], refs[7:8], k=1).reference_ids[0] != "R7"
    assert reopened.query(["q"], refs[8:9], k=1).reference_ids[0] == "R8"


@pytest.mark.parametrize("factory", ["HNSW32", "IVF4,Flat"])
def test_approximate_indexes_add_and_remove(tmp_path, factory):
    """Graph indexes cannot delete entries (the store rebuilds them); IVF trains on the first add."""
    rng = np.random.default_rng(3)
    refs = unit(rng.standard_normal((60, 64)))
    store = vectors_store(tmp_path / "s", index=factory)
    store.add([f"R{i}" for i in range(60)], refs)
    store.remove(["R5"])
    store.add(["R60"], refs[5:6])
    assert len(store) == 60 and store.query(["q"], refs[5:6], k=1).reference_ids[0] == "R60"
    assert len(ReferenceStore.open(tmp_path / "s")) == 60
    store.add(["R60"], refs[6:7], upsert=True)  # an upsert rebuilds a graph index: the new row once
    top = store.query(["q"], refs[6:7], k=2).reference_ids.tolist()
    assert top.count("R60") == 1 and top[0] in ("R6", "R60")


def test_duplicate_id_is_refused_unless_upsert(location):
    rng = np.random.default_rng(2)
    store = vectors_store(location)
    store.add(["a", "b"], unit(rng.standard_normal((2, 64))))
    with pytest.raises(DuplicateIdError, match="already in the store"):
        store.add(["c", "b"], unit(rng.standard_normal((2, 64))))
    assert "c" not in store and len(store) == 2  # nothing of the refused add was kept
    with pytest.raises(DuplicateIdError, match="twice"):
        store.add(["d", "d"], unit(rng.standard_normal((2, 64))))
    new_b = unit(rng.standard_normal((1, 64)))
    store.add(["b"], new_b, upsert=True)
    assert len(store) == 2
    assert store.query(["q"], new_b, k=1).scores[0] == pytest.approx(1.0, abs=1e-5)


def test_other_model_is_refused(location, tmp_path):
    store = vectors_store(location)
    with pytest.raises(StoreError, match="dimension 32"):
        store.add(["x"], unit(np.ones((1, 32))))
    other = write_descriptors(tmp_path / "pdq.h5", ["x"], unit(np.ones((1, 64))), info={"rdcd.model": "pdq"})
    from rdcd.descriptors import descriptor_info, read_descriptors

    with pytest.raises(StoreError, match="rdcd.model: 'pdq'"):
        store.add(*read_descriptors(other), info=descriptor_info(other))
    store.close()
    with pytest.raises(StoreError, match="differs from the store"):
        ReferenceStore.open(location, model="pdq")
    assert ReferenceStore.open(location, model="phash").dim == 64


def test_store_query_equals_match(location, synthetic_set):  # noqa: F811
    """Same pairs and uAP as rdcd match with score normalisation and whitening, background kept in the store."""
    _, files, gt = synthetic_set
    from rdcd.descriptors import read_descriptors

    expected = match(files["queries"], files["references"], background=files["background"], k=5,
                     score_norm=True, whiten_dim=16)
    store = ReferenceStore.create(location, _dim32_model(), background=files["background"], k=5, score_norm=True,
                                  whiten_dim=16)
    store.add(*read_descriptors(files["references"]))
    store.close()
    got = ReferenceStore.open(location).query(*read_descriptors(files["queries"]))
    assert got.query_ids.tolist() == expected.query_ids.tolist()
    assert got.reference_ids.tolist() == expected.reference_ids.tolist()
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-5)
    assert evaluate(got, gt)["uAP"] == pytest.approx(evaluate(expected, gt)["uAP"], abs=1e-6)


def _dim32_model():
    from rdcd.models.hashes import PHashModel

    class Dim32(PHashModel):  # a real model whose descriptors are 32-d, to hold test_match's synthetic set
        name, dim = "phash-32", 32

        def embed(self, images):
            return super().embed(images)[:, :32]

    return Dim32()


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "copydetect"


def test_cli_index_query_scores_as_match(tmp_path, capsys):
    """rdcd index create/add/query on the example images gives rdcd match's predictions and uAP."""
    from rdcd.cli import main
    from rdcd.metrics import read_ground_truth, read_predictions

    store = tmp_path / "refs.store"
    assert main(["index", "create", "--index", str(store), "--model", "pdq"]) == 0
    assert main(["index", "add", "--index", str(store), "--images", str(EXAMPLES / "references")]) == 0
    assert main(["index", "add", "--index", str(store), "--images", str(EXAMPLES / "references")]) == 1
    assert "already in the store" in capsys.readouterr().err
    assert main(["index", "query", "--index", str(store), "--queries", str(EXAMPLES / "queries"),
                 "--output", str(tmp_path / "store.csv"), "--k", "3"]) == 0
    assert main(["match", "--model", "pdq", "--queries", str(EXAMPLES / "queries"), "--references",
                 str(EXAMPLES / "references"), "--output", str(tmp_path / "match.csv"), "--k", "3"]) == 0
    got, expected = read_predictions(tmp_path / "store.csv"), read_predictions(tmp_path / "match.csv")
    assert got.rows() == expected.rows() and len(got) > 0
    gt = read_ground_truth(EXAMPLES / "ground_truth.csv")
    assert evaluate(got, gt)["uAP"] == evaluate(expected, gt)["uAP"]
    capsys.readouterr()
    assert main(["index", "info", "--index", str(store)]) == 0
    assert '"references": 4' in capsys.readouterr().out
    assert main(["index", "remove", "--index", str(store), "R000001", "nope"]) == 1
    assert "not found: nope" in capsys.readouterr().err
    assert main(["index", "create", "--index", str(store), "--model", "pdq"]) == 1


def test_ivf_store_survives_remove_add_remove(tmp_path):
    """FAISS's id map over IVF aborts on a second removal after an add; the store rebuilds instead."""
    rng = np.random.default_rng(4)
    refs = unit(rng.standard_normal((60, 64)))
    store = vectors_store(tmp_path / "s", index="IVF4,Flat")
    store.add([f"R{i}" for i in range(60)], refs)
    store.remove(["R5"])
    store.add(["R60"], refs[5:6])
    store.remove(["R60"])
    assert len(store) == 59 and "R60" not in store
    assert store.query(["q"], refs[7:8], k=1).reference_ids[0] == "R7"


def test_a_file_that_is_not_a_store_gets_a_clear_error(tmp_path):
    folder = tmp_path / "broken.store"
    folder.mkdir()
    (folder / "store.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not an rdcd reference store"):
        ReferenceStore.open(folder)


def test_the_store_records_the_precision_that_ran_not_auto(tmp_path, monkeypatch):
    """A shipped student asked for with precision "auto" runs its int8 file on a CPU; the store
    records "int8", so reopening it anywhere (where "auto" could mean fp32) runs the same file."""
    from rdcd import distributed as du
    from rdcd.models.shipped import shipped_cards

    monkeypatch.setattr(du, "gpu_available", lambda: False)  # "auto" is int8 on a CPU only

    name = next(c.name for c in shipped_cards() if c.kind == "student" and c.int8 is not None)
    store = ReferenceStore.create(tmp_path / "s.store", name)
    assert store.record["rdcd.precision"] == "int8" and "int8" in store.record["rdcd.runtime"]
    store.close()
    reopened = ReferenceStore.open(tmp_path / "s.store", model=name)
    assert reopened.record["rdcd.precision"] == "int8"

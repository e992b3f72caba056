"""Shipped models: cards, registry names, the default alias, --threshold auto, precision/recall at a threshold."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import rdcd.models as models
from conftest import picture
from rdcd.match import copies, copies_path, match, resolve_threshold
from rdcd.metrics import Predictions, at_threshold, read_predictions
from rdcd.models.shipped import WEIGHTS_DIR, CardError, card_for, read_card, register_shipped, shipped_cards


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the model registry, so registering test models leaves the real one alone."""
    monkeypatch.setattr(models, "MODEL_REGISTRY", dict(models.MODEL_REGISTRY))
    return models.MODEL_REGISTRY


def write_card(folder, weights, name="rdcd-tiny-32", default=True, thresholds=None):
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(weights, folder / f"{name}.pt")
    card = {"name": name, "file": f"{name}.pt", "dim": 32, "default": default, "description": "test model",
            "thresholds": thresholds if thresholds is not None else
            {"raw": {"threshold": 0.5, "precision": 0.9, "benchmark": "valbench"},
             "score_norm": {"threshold": 0.1, "precision": 0.9, "benchmark": "valbench"}}}
    (folder / f"{name}.json").write_text(json.dumps(card))
    return folder


def test_every_shipped_card_is_registered_and_loads():
    cards = shipped_cards()
    assert cards, "the package ships trained models (src/rdcd/weights)"
    image = np.asarray(picture(0).convert("RGB").resize((160, 160)))[None]
    for card in cards:
        assert card["name"] in models.MODEL_REGISTRY
        model = models.load_model(card["name"])
        vectors = model.embed(image)
        assert vectors.shape == (1, card["dim"]) and np.isclose(np.linalg.norm(vectors), 1, atol=1e-4)
        assert (WEIGHTS_DIR / card["file"]).stat().st_size < 40e6
        assert (WEIGHTS_DIR / f"{card['name']}.md").exists(), "each shipped model needs its model card"
        assert card["thresholds"]["raw"]["threshold"] is not None  # --threshold auto works for each
        # the score-norm beta rdcd match uses is the one the card's validation numbers were measured at
        assert card["thresholds"]["score_norm"]["beta"] == card["validation"]["score_norm"].get("beta", 1.0)
    assert sum(bool(c.get("default")) for c in cards) == 1
    assert models.model_file("rdcd-default") is not None


def test_register_shipped_adds_names_and_the_default_alias(tmp_path, tiny_student_file, registry):
    folder = write_card(tmp_path / "weights", tiny_student_file)
    assert register_shipped(folder) == ["rdcd-tiny-32", "rdcd-default"]
    model = models.load_model("rdcd-default")
    assert model.dim == 32
    assert card_for("rdcd-tiny-32")["name"] == "rdcd-tiny-32"
    assert card_for(folder / "rdcd-tiny-32.pt")["name"] == "rdcd-tiny-32"  # by file too
    assert card_for("sscd") is None
    assert models.model_file("rdcd-default") == folder / "rdcd-tiny-32.pt"


def test_bad_cards_name_the_file(tmp_path, tiny_student_file):
    folder = write_card(tmp_path / "w", tiny_student_file)
    (folder / "rdcd-tiny-32.pt").unlink()
    with pytest.raises(CardError, match="rdcd-tiny-32.json.*missing"):
        read_card(folder / "rdcd-tiny-32.json")
    (folder / "broken.json").write_text("{not json")
    with pytest.raises(CardError, match="broken.json"):
        shipped_cards(folder)
    folder2 = write_card(tmp_path / "w2", tiny_student_file, name="a")
    write_card(folder2, tiny_student_file, name="b")
    with pytest.raises(CardError, match="several model cards claim to be the default"):
        shipped_cards(folder2)
    # at import time (strict=False) a broken card is skipped with a warning, never an import error
    with pytest.warns(UserWarning, match="broken.json"):
        assert [c["name"] for c in shipped_cards(folder, strict=False)] == []
    with pytest.warns(UserWarning, match="none is registered"):
        assert not any(c["default"] for c in shipped_cards(folder2, strict=False))


def test_threshold_auto_reads_the_card(tmp_path, tiny_student_file, registry):
    register_shipped(write_card(tmp_path / "weights", tiny_student_file))
    assert resolve_threshold("auto", "rdcd-default", False, None)[0] == 0.5
    assert resolve_threshold("auto", "rdcd-tiny-32", True, None)[0] == 0.1
    assert resolve_threshold("0.25", "sscd", False, None) == (0.25, "given")
    with pytest.raises(ValueError, match="needs a shipped model"):
        resolve_threshold("auto", "sscd", False, None)
    with pytest.raises(ValueError, match="whitening"):
        resolve_threshold("auto", "rdcd-default", False, 16)
    with pytest.raises(ValueError, match="number or 'auto'"):
        resolve_threshold("high", "rdcd-default", False, None)


def test_match_marks_copies_at_the_threshold(tmp_path, image_folder, tiny_student_file, registry, capsys):
    from rdcd.cli import main

    args = ["match", "--queries", str(image_folder), "--references", str(image_folder), "--k", "3"]
    assert main(args + ["--model", str(tiny_student_file), "--output", str(tmp_path / "first.csv")]) == 0
    threshold = float(np.median(read_predictions(tmp_path / "first.csv").scores))
    register_shipped(write_card(tmp_path / "weights", tiny_student_file,
                                thresholds={"raw": {"threshold": threshold, "precision": 0.9}}))
    capsys.readouterr()
    out = tmp_path / "m.csv"
    assert main(args + ["--model", "rdcd-default", "--threshold", "auto", "--output", str(out)]) == 0
    printed = capsys.readouterr()
    assert f"threshold {threshold:.4f} from" in printed.err
    everything = read_predictions(out)
    found = read_predictions(copies_path(out))
    assert len(everything) == 12 * 3
    assert sorted(found.rows()) == sorted(r for r in everything.rows() if r[2] >= threshold)
    assert 0 < len(found) < len(everything) and np.all(np.diff(found.scores) <= 0)  # best first
    lines = printed.out.splitlines()
    assert lines[0] == "query_id,reference_id,score" and len(lines) == len(found) + 1
    config = json.loads(out.with_name("m.config.json").read_text())
    assert config["threshold"] == threshold and "rdcd-tiny-32.json" in config["threshold_source"]


def test_copies_and_precision_recall_at_a_threshold():
    p = Predictions(np.array(["q1", "q2", "q3", "q4"]), np.array(["r1", "r9", "r3", "r4"]), np.array([0.9, 0.8, 0.7, 0.2]))
    gt = {"q1": "r1", "q2": "r2", "q3": "r3", "q4": "r4", "q5": None}
    assert copies(p, 0.75).rows() == [("q1", "r1", 0.9), ("q2", "r9", 0.8)]
    r = at_threshold(p, gt, 0.7)
    assert (r["n_flagged"], r["n_true"], r["n_gt"]) == (3, 2, 4)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(0.5)
    assert at_threshold(p, gt, 0.95)["precision"] is None


def test_threshold_auto_refuses_what_it_was_not_calibrated_for(tmp_path, tiny_student_file, registry):
    from rdcd.descriptors import write_descriptors

    register_shipped(write_card(tmp_path / "weights", tiny_student_file))
    with pytest.raises(ValueError, match="calibrated with beta 1.0"):
        resolve_threshold("auto", "rdcd-default", True, None, beta=0.5)
    files = tmp_path / "q.h5"
    write_descriptors(files, ["a", "b"], np.eye(2, 32, dtype=np.float32))
    with pytest.raises(ValueError, match="descriptor files"):
        match(files, files, model="rdcd-default", threshold="auto")
    images = tmp_path / "images"
    images.mkdir()
    picture(3).save(images / "a.jpg")
    with pytest.raises(ValueError, match="descriptor files"):  # one set from a file is enough to refuse
        match(images, files, model="rdcd-default", threshold="auto")
    assert len(match(files, files, threshold=0.5, k=1)) == 2  # a number works with descriptor files


def test_score_norm_uses_the_cards_beta_unless_told(tmp_path, tiny_student_file, image_folder, registry, capsys):
    from rdcd.cli import main
    from rdcd.match import resolve_beta

    thresholds = {"raw": {"threshold": 0.5, "precision": 0.9},
                  "score_norm": {"threshold": 0.1, "precision": 0.9, "beta": 0.5, "ranks": [0, 2]}}
    register_shipped(write_card(tmp_path / "weights", tiny_student_file, thresholds=thresholds))
    card_path = str(tmp_path / "weights" / "rdcd-tiny-32.json")
    assert resolve_beta(None, "rdcd-default") == resolve_beta(None, "rdcd-tiny-32") == (0.5, card_path)
    assert resolve_beta(0.75, "rdcd-default") == (0.75, "given")  # given wins
    assert resolve_beta(None, "sscd") == resolve_beta(None, None) == (1.0, "SSCD's default")  # otherwise
    assert resolve_beta(None, tiny_student_file)[0] == 1.0  # a student file that is not the shipped one
    assert resolve_beta(None, tmp_path / "weights" / "rdcd-tiny-32.pt") == (0.5, card_path)  # the file itself
    # match: beta None -> the card's 0.5, and the auto threshold (calibrated at 0.5) is accepted
    out = tmp_path / "m.csv"
    match(image_folder, image_folder, model="rdcd-default", background=image_folder, score_norm=True, k=2,
          threshold="auto", output=out)
    config = json.loads(out.with_name("m.config.json").read_text())
    assert config["beta"] == 0.5 and config["threshold"] == 0.1
    capsys.readouterr()
    assert main(["match", "--queries", str(image_folder), "--references", str(image_folder), "--background",
                 str(image_folder), "--score-norm", "--k", "2", "--output", str(tmp_path / "c.csv")]) == 0
    assert f"score normalisation with beta 0.5 ({card_path})" in capsys.readouterr().err  # the default model's
    capsys.readouterr()
    assert main(["models"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("rdcd-tiny-32 "))
    assert "[--threshold auto] [--score-norm beta 0.5]" in line
    with pytest.raises(ValueError, match="calibrated with beta 0.5"):  # another beta: a number is needed
        match(image_folder, image_folder, model="rdcd-default", background=image_folder, score_norm=True,
              beta=1.0, threshold="auto")

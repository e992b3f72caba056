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
        assert card.name in models.MODEL_REGISTRY
        model = models.load_model(card.name)
        vectors = model.embed(image)
        assert vectors.shape == (1, card.dim) and np.isclose(np.linalg.norm(vectors), 1, atol=1e-4)
        assert card.path.stat().st_size < 40e6
        assert (WEIGHTS_DIR / f"{card.name}.md").exists(), "each shipped model needs its model card"
        assert card.thresholds["raw"].threshold is not None  # --threshold auto works for each
        # the score-norm beta rdcd match uses is the one the card's validation numbers were measured at
        assert card.beta == card.thresholds["score_norm"].beta == card.data["validation"]["score_norm"].get("beta", 1.0)
    assert sum(c.default for c in cards) == 1
    assert models.model_file("rdcd-default") is not None


def test_the_shipped_projection_runs_the_peer_unmodified_and_names_its_terms():
    """sscd-distilled-pcaw128 = the installed sscd-distilled network at 160 px, then the shipped
    projection: its descriptors equal that computation; its card carries the peer's licence terms."""
    from rdcd.models.projected import ProjectedModel
    from rdcd.postprocess import PCAWhitening

    card = card_for("sscd-distilled-pcaw128")
    assert card.base == "sscd-distilled" and card.dim == 128 and card.input_size == 160
    assert card.kind == "projection" and "unmodified as a dependency" in card.data["licence"]
    assert "unmodified as a dependency" in (WEIGHTS_DIR / "sscd-distilled-pcaw128.md").read_text()
    model = models.load_model("sscd-distilled-pcaw128")
    assert isinstance(model, ProjectedModel) and model.name == "sscd-distilled-pcaw128"
    images = np.stack([np.asarray(picture(i).convert("RGB").resize((160, 160))) for i in range(4)])
    peer = models.load_model("sscd-distilled", input_size=160)
    expected = PCAWhitening.load(card.path).transform(peer.embed(images))
    assert np.allclose(model.embed(images), expected, atol=1e-6)
    assert not list(WEIGHTS_DIR.glob("*.onnx")) or all("int8" in p.name for p in WEIGHTS_DIR.glob("*.onnx"))


def test_every_shipped_model_has_its_int8_file_made_from_its_weights():
    """rdcd extract runs these on a CPU by default: each must exist, match its .pt (sha256), give
    descriptors close to fp32 here, and its card must record parity >= 0.99 on real images and uAP
    within a point of fp32 on both benchmarks (the int8 targets), as ship_model.py measured."""
    from rdcd.models.shipped import int8_file
    from rdcd.models.onnx import OnnxModel

    images = np.stack([np.asarray(picture(i).convert("RGB").resize((160, 160))) for i in range(16)])
    students = [card for card in shipped_cards() if card.kind == "student"]
    assert len(students) == 4
    for card in students:
        path, why_not = int8_file(card)
        assert path is not None, f"{card.name}: {why_not}"
        assert path.stat().st_size < 40e6
        q = card.int8.data
        int8, fp32 = OnnxModel(path), models.load_model(card.name)
        cos = np.sum(int8.embed(images) * fp32.embed(images), axis=1)
        # synthetic shapes, further from the training images than photos; the whitened 256-d student
        # (2026-12-05) gives mean/min 0.977/0.956 on them, 0.993/0.973 on held-out real images (its
        # card), which the next assert holds to 0.99; this one catches a broken file, not drift
        assert cos.mean() >= 0.97 and cos.min() >= 0.95, (card.name, cos.mean(), cos.min())
        assert q["cosine_to_fp32"]["mean"] >= 0.99
        assert q["thresholds"]["raw"]["threshold"] is not None  # its own --threshold auto
        for bench in ("validation", "devbench"):
            fp32_uap = card.data[bench]["raw"]["uAP"]
            assert abs(q[bench]["raw"]["uAP"] - fp32_uap) <= 0.01, (card.name, bench)


def test_extract_runs_a_shipped_models_int8_file_on_cpu_unless_told(tmp_path, tiny_student_file, image_folder,
                                                                     registry, capsys, monkeypatch):
    """The choice itself, on a tiny shipped model whose "int8" file is its fp32 ONNX export (the choice
    does not look inside the file; real int8 files: the test above)."""
    import rdcd.distributed as du
    from rdcd.export import export
    from rdcd.extract import extract
    from rdcd.models.runtime import resolve_runtime

    def prepare_model(spec, **kw):
        resolved = resolve_runtime(spec, **kw)
        return resolved.model, resolved.how
    from rdcd.models.shipped import file_sha256

    monkeypatch.setattr(du, "gpu_available", lambda: False)  # as on a CPU-only machine

    folder = write_card(tmp_path / "weights", tiny_student_file)
    export(folder / "rdcd-tiny-32.pt", folder / "rdcd-tiny-32.int8.onnx")
    card_path = folder / "rdcd-tiny-32.json"
    card = json.loads(card_path.read_text())
    card["int8"] = {"file": "rdcd-tiny-32.int8.onnx", "weights_sha256": file_sha256(folder / "rdcd-tiny-32.pt"),
                    "thresholds": {"raw": {"threshold": 0.75, "precision": 0.9, "benchmark": "valbench"}}}
    card_path.write_text(json.dumps(card))
    register_shipped(folder)
    from rdcd.cli import main

    assert main(["models"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("rdcd-tiny-32 "))
    assert "[int8 file on CPU: rdcd-tiny-32.int8.onnx]" in line

    model, how = prepare_model("rdcd-default")
    assert type(model).__name__ == "OnnxModel" and model.path == folder / "rdcd-tiny-32.int8.onnx"
    assert "runs with ONNX Runtime int8 on the CPU (shipped file rdcd-tiny-32.int8.onnx" in how
    assert model.session.get_providers() == ["CPUExecutionProvider"]
    assert prepare_model(folder / "rdcd-tiny-32.pt")[0].path == model.path  # by weights path too
    model, how = prepare_model("rdcd-tiny-32", precision="fp32")
    assert "int8" not in how and "fp32" in how
    assert "PyTorch" in prepare_model("rdcd-tiny-32", runtime="torch")[1]
    with pytest.raises(ValueError, match="ONNX Runtime only"):
        prepare_model("rdcd-tiny-32", runtime="torch", precision="int8")
    capsys.readouterr()
    assert "int8" not in prepare_model(tiny_student_file, precision="int8")[1]  # not a shipped student:
    assert "is not one and runs as it is" in capsys.readouterr().err          # runs as it is, with a note
    with pytest.raises(ValueError, match="unknown precision"):
        prepare_model("rdcd-tiny-32", precision="int4")

    result = extract("rdcd-tiny-32", image_folder, output=tmp_path / "d.npy", size=64)
    assert "int8" in capsys.readouterr().err and len(result.ids) == 12

    # --threshold auto: the int8 file's own calibrated threshold where it embeds the images
    match(image_folder, image_folder, model="rdcd-tiny-32", k=2, threshold="auto", output=tmp_path / "m.csv")
    used = json.loads((tmp_path / "m.config.json").read_text())
    assert used["threshold"] == 0.75 and "int8 file" in used["threshold_source"]
    assert "ONNX Runtime int8" in used["runtime"] and used["draft"] is True
    match(image_folder, image_folder, model="rdcd-tiny-32", k=2, threshold="auto", output=tmp_path / "m.csv",
          precision="fp32")
    used = json.loads((tmp_path / "m.config.json").read_text())
    assert used["threshold"] == 0.5 and "int8" not in used["threshold_source"]
    assert resolve_threshold("auto", card_for("rdcd-tiny-32"), True, None, int8=True)[0] == 0.1  # none for score-norm: fp32's

    # re-shipped weights without a rebuilt int8 file: warned, and the fp32 weights run
    card["int8"]["weights_sha256"] = "0" * 64
    card_path.write_text(json.dumps(card))
    register_shipped(folder)
    model, how = prepare_model("rdcd-tiny-32")
    assert "int8" not in how
    assert "made from other weights" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--precision int8, but its int8 file .* other weights"):
        prepare_model("rdcd-tiny-32", precision="int8")


def test_register_shipped_adds_names_and_the_default_alias(tmp_path, tiny_student_file, registry):
    folder = write_card(tmp_path / "weights", tiny_student_file)
    assert register_shipped(folder) == ["rdcd-tiny-32", "rdcd-default"]
    model = models.load_model("rdcd-default")
    assert model.dim == 32
    assert card_for("rdcd-tiny-32").name == "rdcd-tiny-32"
    assert card_for(folder / "rdcd-tiny-32.pt").name == "rdcd-tiny-32"  # by file too
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
        assert [c.name for c in shipped_cards(folder, strict=False)] == []
    with pytest.warns(UserWarning, match="none is registered"):
        assert not any(c.default for c in shipped_cards(folder2, strict=False))


def test_threshold_auto_reads_the_card(tmp_path, tiny_student_file, registry):
    register_shipped(write_card(tmp_path / "weights", tiny_student_file))
    default = card_for("rdcd-default")
    assert resolve_threshold("auto", default, False, None)[0] == 0.5
    assert resolve_threshold("auto", card_for("rdcd-tiny-32"), True, None)[0] == 0.1
    assert resolve_threshold("0.25", card_for("sscd"), False, None) == (0.25, "given")
    with pytest.raises(ValueError, match="needs a shipped model.*'sscd' has none"):
        resolve_threshold("auto", card_for("sscd"), False, None, model_name="sscd")
    with pytest.raises(ValueError, match="whitening"):
        resolve_threshold("auto", default, False, 16)
    with pytest.raises(ValueError, match="number or 'auto'"):
        resolve_threshold("high", default, False, None)


def test_match_marks_copies_at_the_threshold(tmp_path, image_folder, tiny_student_file, registry, capsys):
    from rdcd.cli import main

    args = ["match", "--queries", str(image_folder), "--references", str(image_folder), "--k", "3"]
    assert main(args + ["--model", str(tiny_student_file), "--output", str(tmp_path / "first.csv")]) == 0
    # half-way between two written scores: no row sits on the threshold, where the written (rounded)
    # score and the one compared inside could fall on different sides of it
    written = np.unique(read_predictions(tmp_path / "first.csv").scores)
    middle = len(written) // 2
    threshold = float((written[middle - 1] + written[middle]) / 2)
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
        resolve_threshold("auto", card_for("rdcd-default"), True, None, beta=0.5)
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
    def beta_of(model, beta=None):
        return resolve_beta(beta, card_for(model))

    assert beta_of("rdcd-default") == beta_of("rdcd-tiny-32") == (0.5, card_path)
    assert beta_of("rdcd-default", 0.75) == (0.75, "given")  # given wins
    assert beta_of("sscd") == resolve_beta(None, None) == (1.0, "SSCD's default")  # otherwise
    assert beta_of(tiny_student_file)[0] == 1.0  # a student file that is not the shipped one
    assert beta_of(tmp_path / "weights" / "rdcd-tiny-32.pt") == (0.5, card_path)  # the file itself
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

import argparse
import json

import numpy as np
import pytest

from rdcd.commands import evaluate as evaluate_command
from rdcd.commands import match as match_command
from rdcd.descriptors import write_descriptors
from rdcd.metrics import read_predictions, write_ground_truth, write_predictions
from rdcd.match import match as match_fn


def run_cli(*argv):
    parser = argparse.ArgumentParser(prog="rdcd")
    sub = parser.add_subparsers(dest="command")
    evaluate_command.register(sub)
    match_command.register(sub)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture
def golden(tmp_path):
    gt = write_ground_truth(tmp_path / "gt.csv", {"Q1": "R1", "Q2": "R2", "Q3": "R3", "Q4": "R4", "Q5": None})
    rows = [("Q1", "R1", 0.9), ("Q1", "R9", 0.9), ("Q2", "R2", 0.8), ("Q2", "R8", 0.95), ("Q3", "R7", 0.5),
            ("Q5", "R1", 0.7)]
    return write_predictions(tmp_path / "p.csv", rows), gt


def test_eval_prints_one_json_object(golden, capsys):
    predictions, gt = golden
    assert run_cli("eval", "--predictions", predictions, "--ground-truth", gt) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"uAP", "recall_at_p90", "threshold_at_p90", "acc_at_1", "recall_at_10", "n_gt",
                            "n_predictions"}
    assert metrics["uAP"] == pytest.approx(0.2083333, abs=1e-7)
    assert metrics["recall_at_p90"] is None and metrics["recall_at_10"] == 0.5


def test_eval_writes_report(golden, tmp_path, capsys):
    predictions, gt = golden
    report = tmp_path / "report.html"
    assert run_cli("eval", "--predictions", predictions, "--ground-truth", gt, "--report", report) == 0
    assert json.loads(capsys.readouterr().out)["n_gt"] == 4
    assert "0.2083" in report.read_text()
    with pytest.raises(ValueError, match="--report"):
        run_cli("eval", "--predictions", predictions, "--ground-truth", gt, "--queries", tmp_path)


def test_match_then_eval(tmp_path, capsys):
    rng = np.random.default_rng(0)
    refs = rng.standard_normal((200, 16)).astype(np.float32)
    refs /= np.linalg.norm(refs, axis=1, keepdims=True)
    queries = refs[:20] + 0.05 * rng.standard_normal((20, 16)).astype(np.float32)
    write_descriptors(tmp_path / "q.h5", [f"Q{i}" for i in range(20)], queries)
    write_descriptors(tmp_path / "r0.h5", [f"R{i}" for i in range(100)], refs[:100])  # two shards
    write_descriptors(tmp_path / "r1.h5", [f"R{i}" for i in range(100, 200)], refs[100:])
    write_descriptors(tmp_path / "bg.h5", [f"T{i}" for i in range(50)], rng.standard_normal((50, 16)))
    write_ground_truth(tmp_path / "gt.csv", {f"Q{i}": f"R{i}" for i in range(20)})
    out = tmp_path / "matches.csv"
    assert run_cli("match", "--queries", tmp_path / "q.h5", "--references", tmp_path / "r0.h5", tmp_path / "r1.h5",
                   "--background", tmp_path / "bg.h5", "--score-norm", "--whiten", "8", "--k", "3",
                   "--output", out) == 0
    assert len(read_predictions(out)) == 60
    config = json.loads((tmp_path / "matches.config.json").read_text())
    assert config["whiten_dim"] == 8 and config["score_norm"] and config["model"] is None
    assert config["beta"] == 1.0  # descriptor files carry no model: SSCD's beta, not the default model's card
    with pytest.raises(ValueError, match="need a background set"):  # a clear error, even with a model given
        match_fn(tmp_path / "q.h5", tmp_path / "r0.h5", model="rdcd-default", score_norm=True)
    capsys.readouterr()
    run_cli("eval", "--predictions", out, "--ground-truth", tmp_path / "gt.csv")
    assert json.loads(capsys.readouterr().out)["acc_at_1"] >= 0.9


def test_match_warns_when_the_sets_were_made_differently(tmp_path, caplog):
    """Descriptor files written by rdcd extract say how they were made; mixing models, precisions
    (an int8 file's name ends in -int8), input sizes or decodings makes scores incomparable."""
    from rdcd.descriptors import descriptor_info

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(6, 8)).astype(np.float32)
    made = {"rdcd.model": "rdcd-x-128-int8", "rdcd.input_size": "160", "rdcd.decode": "draft"}
    write_descriptors(tmp_path / "q.h5", [f"Q{i}" for i in range(6)], vectors, info=made)
    write_descriptors(tmp_path / "r.h5", [f"R{i}" for i in range(6)], vectors, info=made)
    write_descriptors(tmp_path / "r32.h5", [f"R{i}" for i in range(6)], vectors, info=dict(made, **{"rdcd.model": "rdcd-x-128"}))
    write_descriptors(tmp_path / "plain.h5", [f"R{i}" for i in range(6)], vectors)  # another tool's file
    assert descriptor_info(tmp_path / "q.h5") == made and descriptor_info(tmp_path / "plain.h5") == {}
    with caplog.at_level("WARNING"):
        match_fn(tmp_path / "q.h5", tmp_path / "r.h5", k=2)
        match_fn(tmp_path / "q.h5", tmp_path / "plain.h5", k=2)
    assert not [r for r in caplog.records if "not comparable" in r.getMessage()]
    with caplog.at_level("WARNING"):  # the int8 and fp32 files of one model: a warning
        match_fn(tmp_path / "q.h5", tmp_path / "r32.h5", k=2)
    message = next(r.getMessage() for r in caplog.records if "not comparable" in r.getMessage())
    assert "rdcd.model: queries rdcd-x-128-int8, references rdcd-x-128" in message


def test_descriptor_files_of_different_models_are_an_error(tmp_path, capsys):
    """Two models of one dimension: scores mean nothing, so rdcd match stops (exit 1, "rdcd match: error:")
    unless --allow-mixed-models, and writes nothing."""
    from rdcd.cli import main

    vectors = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    write_descriptors(tmp_path / "q.h5", [f"Q{i}" for i in range(6)], vectors, info={"rdcd.model": "model-a"})
    write_descriptors(tmp_path / "r.h5", [f"R{i}" for i in range(6)], vectors, info={"rdcd.model": "model-b"})
    args = ["match", "--queries", str(tmp_path / "q.h5"), "--references", str(tmp_path / "r.h5"), "--output"]
    assert main(args + [str(tmp_path / "p.csv")]) == 1
    err = capsys.readouterr().err
    assert "rdcd match: error:" in err and "queries model-a, references model-b" in err
    assert "--allow-mixed-models" in err and not (tmp_path / "p.csv").exists()
    assert main(args + [str(tmp_path / "p.csv"), "--allow-mixed-models"]) == 0
    assert len(read_predictions(tmp_path / "p.csv")) == 36


@pytest.mark.parametrize("problem", ["missing", "empty"])
def test_match_checks_the_references_before_embedding_queries(image_folder, tmp_path, problem, monkeypatch):
    import rdcd.extract

    references = tmp_path / "refs"
    if problem == "empty":
        references.mkdir()
    embedded = []
    monkeypatch.setattr(rdcd.extract, "extract", lambda *a, **k: embedded.append(a))
    with pytest.raises(FileNotFoundError, match=f"references: {references}"):
        match_fn(image_folder, references, model="phash")
    assert not embedded


def test_match_checks_dimensions_before_embedding(image_folder, tmp_path, monkeypatch):
    import rdcd.extract

    write_descriptors(tmp_path / "r.h5", ["a", "b"], np.eye(2, 32, dtype=np.float32))
    embedded = []
    monkeypatch.setattr(rdcd.extract, "extract", lambda *a, **k: embedded.append(a))
    with pytest.raises(ValueError, match="queries 64, references 32"):
        match_fn(image_folder, tmp_path / "r.h5", model="phash")
    assert not embedded


def test_cli_warnings_carry_the_rdcd_prefix(tmp_path, capsys):
    from rdcd.cli import main

    vectors = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    write_descriptors(tmp_path / "q.h5", [f"Q{i}" for i in range(6)], vectors, info={"rdcd.input_size": "160"})
    write_descriptors(tmp_path / "r.h5", [f"R{i}" for i in range(6)], vectors, info={"rdcd.input_size": "224"})
    assert main(["match", "--queries", str(tmp_path / "q.h5"), "--references", str(tmp_path / "r.h5"),
                 "--output", str(tmp_path / "p.csv")]) == 0
    assert "rdcd: warning: the sets' descriptors differ in rdcd.input_size" in capsys.readouterr().err

"""rdcd.scoring, as model shipping (rdcd.ship) uses it: the score-normalisation beta a shipped model's
card records is chosen on the validation benchmark, by uAP, among BETAS; a report on another benchmark
reuses it. The model cards for people are written from the JSON cards unchanged."""
import json
from pathlib import Path

import pytest

from rdcd.benchmark_builder import make_benchmark
from rdcd.metrics import evaluate
from rdcd.models import load_model
from rdcd.scoring import BETAS, BenchmarkFolder, benchmark_predictions, embed_benchmark, score_model
from test_bench import write_images


@pytest.fixture(scope="module")
def small_bench(tmp_path_factory) -> Path:
    images = tmp_path_factory.mktemp("images")
    write_images(images, range(30), size=(64, 64))
    output = tmp_path_factory.mktemp("bench") / "bench"
    make_benchmark(images, output, references=8, queries_per_ref=2, negative_fraction=0.5, seed=1)
    return output


def test_calibration_keeps_the_beta_of_the_best_validation_uap(small_bench):
    import torch

    torch.manual_seed(0)
    model = load_model("student:mobilenetv3_large_100:32", input_size=64)
    validation = score_model(model, small_bench, beta=None)
    tried = {float(b): u for b, u in validation["score_norm_betas"].items()}
    assert sorted(tried) == sorted(BETAS)
    chosen = validation["score_norm"]["beta"]
    assert tried[chosen] == max(tried.values()) == validation["score_norm"]["uAP"]
    # the same numbers as scoring each beta directly
    bench = BenchmarkFolder.read(small_bench)
    sets = embed_benchmark(model, bench)
    for beta, uap in tried.items():
        assert evaluate(benchmark_predictions(sets, 10, True, beta=beta), bench.ground_truth)["uAP"] == pytest.approx(uap)
    assert ("score_norm_beta1" in validation) == (chosen != 1.0)
    # a report benchmark reuses a given beta and adds SSCD's beta 1 for comparison with `rdcd bench`
    report = score_model(model, small_bench, beta=0.5)
    assert report["score_norm"]["beta"] == 0.5 and "score_norm_betas" not in report
    assert report["score_norm"]["uAP"] == pytest.approx(tried[0.5])
    assert report["score_norm_beta1"]["uAP"] == pytest.approx(tried[1.0])
    # a threshold calibrated at the model's beta is checked at that beta only, never at beta 1
    with_threshold = score_model(model, small_bench, {"score_norm": {"threshold": 0.0}}, beta=0.5)
    assert "at_calibrated_threshold" in with_threshold["score_norm"]
    assert "at_calibrated_threshold" not in with_threshold["score_norm_beta1"]


def test_the_shipped_projection_card_text_is_written_from_its_json_card():
    """``NAME.md`` of the shipped projection model is what rdcd.model_card writes from ``NAME.json``."""
    from rdcd.model_card import projection_markdown
    from rdcd.models.shipped import WEIGHTS_DIR

    for path in WEIGHTS_DIR.glob("*.json"):
        card = json.loads(path.read_text())
        if card.get("kind") == "projection":
            assert projection_markdown(card) == path.with_suffix(".md").read_text(), path


def test_rdcd_ship_refuses_a_base_it_has_no_terms_for(tmp_path):
    from rdcd.ship import ship_projection

    with pytest.raises(ValueError, match="BASE one of sscd-distilled, sscd"):
        ship_projection("phash+pcaw16", "x", tmp_path, tmp_path)
    with pytest.raises(ValueError, match="must be BASE"):
        ship_projection("sscd", "x", tmp_path, tmp_path)


def test_ship_a_trained_student_with_its_own_whitening(small_bench, tmp_path, monkeypatch, tiny_student_file):
    """A student's model.pt + pcawDIM ships as NAME.student.pt (fp16) beside NAME.npz, which names it
    by file name, so the shipped folder works wherever it is; the card keeps the training command
    without the interpreter's path."""
    import shutil

    import numpy as np

    import rdcd.ship as ship
    from conftest import picture_folder
    from rdcd.models.projected import load_projected, read_projection_meta

    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setattr(ship, "WEIGHTS_DIR", weights)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_student_file, run / "model.pt")
    (run / "config.json").write_text(json.dumps({"resolved": {"argv": ["/somewhere/bin/rdcd", "train", "--dim", "32"]}}))
    (run / "summary.json").write_text(json.dumps({"step": 6}))
    card = ship.ship_projection(f"{run / 'model.pt'}+pcaw8", "tiny-w8", picture_folder(tmp_path / "bg", 12),
                                small_bench)
    assert card["base"] == "tiny-w8.student.pt" and card["training"]["argv"] == ["rdcd", "train", "--dim", "32"]
    assert read_projection_meta(weights / "tiny-w8.npz")["base"] == "tiny-w8.student.pt"
    assert card["validation"]["raw"]["n_gt"] == 16 and "rdcd's own RDCD student" in card["licence"]
    moved = shutil.move(str(weights), str(tmp_path / "elsewhere"))
    model = load_projected(Path(moved) / "tiny-w8.npz", name="tiny-w8")
    vectors = model.embed(np.zeros((2, 64, 64, 3), np.uint8) + 100)
    assert vectors.shape == (2, 8) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_ship_a_runs_snapshot_with_a_pca_whitening_head(small_bench, tmp_path, monkeypatch, capsys):
    """``rdcd ship student --head-pcaw 8 --weights stepN.pt``: the snapshot's backbone ships with its
    head replaced by PCA whitening of its GeM features on the background images, at the new size;
    the card and the model card say so, with the snapshot's step; the int8 file is made from it."""
    import numpy as np
    import torch

    import rdcd.ship as ship
    from conftest import picture_folder
    from rdcd.cli import main
    from rdcd.extract import extract
    from rdcd.images import list_images
    from rdcd.models.student import gem_model, load_student, save_student
    from rdcd.postprocess import PCAWhitening
    from rdcd.train import train
    from test_train import tiny_config, tiny_torch_teacher

    weights = tmp_path / "weights"
    monkeypatch.setattr(ship, "WEIGHTS_DIR", weights)
    images = picture_folder(tmp_path / "pool", 40)
    run = tmp_path / "run"
    train(tiny_config(images, run, tiny_torch_teacher(), steps=4, eval_size=64))
    save_student(load_student(run / "model.pt"), run / "step3.pt")  # stands in for a snapshot
    assert main(["ship", "student", "--run", str(run), "--name", "x", "--valbench", str(small_bench),
                 "--head-pcaw", "8", "--head-background", str(images), "--weights", "../model.pt"]) != 0
    assert "not a student file inside the run folder" in capsys.readouterr().err
    assert main(["ship", "student", "--run", str(run), "--name", "tiny-w8", "--valbench", str(small_bench),
                 "--head-pcaw", "8", "--head-background", str(images), "--weights", "step3.pt",
                 "--threads", "1"]) == 0
    card = json.loads((weights / "tiny-w8.json").read_text())
    assert card["dim"] == 8 and card["head"] == {"kind": "pcaw", "dim": 8, "background": str(images), "images": 40}
    assert card["training"]["steps"] == 3 and card["training"]["weights"] == "step3.pt"
    assert "PCA whitening of the trained backbone" in (weights / "tiny-w8.md").read_text()
    assert (weights / card["int8"]["file"]).is_file()
    shipped = load_model(str(weights / "tiny-w8.pt"))
    trained = load_student(run / "step3.pt")
    raw = gem_model(trained)
    probe = list_images(small_bench / "queries")[:4]
    pcaw = PCAWhitening(8).fit(extract(raw, list_images(images), progress=False).vectors)
    expected = pcaw.transform(extract(raw, probe, progress=False).vectors)
    assert np.allclose(extract(shipped, probe, progress=False).vectors, expected, atol=2e-2)  # fp16 weights
    assert torch.equal(load_student(weights / "tiny-w8.pt").backbone.conv_stem.weight,
                       trained.backbone.conv_stem.weight.half().float())
    shipped_bytes = (weights / "tiny-w8.pt").read_bytes()
    assert main(["ship", "student", "--run", str(run), "--name", "tiny-w8", "--valbench", str(small_bench),
                 "--weights", "step3.pt", "--reuse", "--description", "rewritten"]) == 0
    # texts only, even without --head-pcaw: the whitened weights, their size and their head stay
    again = json.loads((weights / "tiny-w8.json").read_text())
    assert (weights / "tiny-w8.pt").read_bytes() == shipped_bytes and again["dim"] == 8
    assert again["head"] == card["head"] and again["description"] == "rewritten"


def test_score_transformed_projects_every_set_before_scoring(small_bench):
    """One embedding, many projections: the identity gives score_sets' raw row; a projection is
    applied to queries, references and train/ alike (a constant map makes every score equal)."""
    import numpy as np

    from rdcd.scoring import score_sets, score_transformed

    bench = BenchmarkFolder.read(small_bench)
    sets = embed_benchmark(load_model("phash"), bench)
    assert score_transformed(sets, bench, lambda x: x) == score_sets(sets, bench, score_norm=False)[0]["raw"]
    seen = []
    flat = score_transformed(sets, bench, lambda x: seen.append(len(x)) or np.ones_like(x) / np.sqrt(x.shape[1]))
    assert sorted(seen) == sorted(len(s.vectors) for s in sets.values())
    assert flat["uAP"] < score_transformed(sets, bench, lambda x: x)["uAP"]

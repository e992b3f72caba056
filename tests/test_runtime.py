"""One runtime decision per model: ``rdcd.models.runtime.resolve_runtime`` looks the card up once and
every command reads its record."""
from __future__ import annotations

import json

import pytest

import rdcd.models.runtime as runtime
import rdcd.models.shipped as shipped
from rdcd.models.shipped import ModelCard, card_for


@pytest.fixture
def counted(monkeypatch):
    """Counts of card look-ups and runtime decisions from here on."""
    counts = {"card_for": 0, "resolve_runtime": 0}

    def counting(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
        return wrapper

    wrapped = counting(shipped, "card_for")
    monkeypatch.setattr(runtime, "card_for", wrapped)  # runtime holds its own reference
    counting(runtime, "resolve_runtime")
    return counts


def test_one_match_call_looks_the_card_up_once_and_decides_the_runtime_once(tmp_path, image_folder, counted,
                                                                           capsys):
    """With the default model, score normalisation (the card's beta) and --threshold auto (the card's
    threshold): each read from the one record."""
    from rdcd.cli import main

    out = tmp_path / "m.csv"
    assert main(["match", "--queries", str(image_folder), "--references", str(image_folder), "--background",
                 str(image_folder), "--score-norm", "--threshold", "auto", "--k", "2", "--output", str(out)]) == 0
    assert counted == {"card_for": 1, "resolve_runtime": 1}
    card = card_for("rdcd-default")
    config = json.loads(out.with_name("m.config.json").read_text())
    assert config["beta"] == card.beta and config["beta_source"] == str(card.card_path)
    assert config["threshold"] == card.thresholds["score_norm"].threshold
    err = capsys.readouterr().err
    assert f"score normalisation with beta {card.beta:g}" in err and config["runtime"] in err


def test_the_record_of_the_default_and_of_other_models(tiny_student_file):
    resolved = runtime.resolve_runtime("rdcd-default")
    card = resolved.card
    assert isinstance(card, ModelCard) and card.default and card.kind == "projection" and card.base
    assert resolved.precision == "as is" and not resolved.int8
    assert resolved.file == card.path and resolved.model.dim == card.dim
    assert resolved.how.startswith(f"{card.name}: ") and "PCA whitening" in resolved.how
    other = runtime.resolve_runtime(tiny_student_file, runtime="torch")
    assert other.card is None and other.precision == "as is" and other.file == tiny_student_file
    assert "PyTorch" in other.how
    again = runtime.resolve_runtime(other.model)  # a loaded model: taken as it is, no card
    assert again.model is other.model and again.card is None and again.file is None
    with pytest.raises(ValueError, match="unknown precision"):
        runtime.resolve_runtime("rdcd-default", precision="int4")


def test_a_shipped_students_record_says_int8_on_a_cpu(monkeypatch):
    import rdcd.distributed as du

    monkeypatch.setattr(du, "gpu_available", lambda: False)
    student = next(c for c in shipped.shipped_cards() if c.kind == "student")
    resolved = runtime.resolve_runtime(student.name)
    assert resolved.int8 and resolved.card == student
    assert resolved.file == student.path.parent / student.int8.file and resolved.model.path == resolved.file
    fp32 = runtime.resolve_runtime(student.name, precision="fp32", runtime="torch")
    assert fp32.precision == "fp32" and fp32.file == student.path and "PyTorch" in fp32.how

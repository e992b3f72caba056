"""rdcd bench: several models on one benchmark folder -> one comparable row per model."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import picture
from rdcd.bench import bytes_per_image, format_markdown, run_bench, uap_by_edit
from rdcd.scoring import BenchmarkFolder
from rdcd.benchmark_builder import make_benchmark
from rdcd.cli import main
from rdcd.metrics import Predictions
from rdcd.models import load_model

TINY_STUDENT = "student:mobilenetv3_large_100:32"
REQUIRED = {"model": str, "dim": int, "bytes_per_image": int, "images_per_second": float, "uAP": float,
            "uAP_sn": float, "acc_at_1": float, "n_queries": int, "n_gt": int}
TIMING_KEYS = {"images_per_second", "extract_seconds", "report"}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_images(folder: Path, seeds, size=(128, 96)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        picture(seed, size).save(folder / f"img{seed:03d}.png")


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    """44 generated images -> 10 references copied twice, 20 queries without a match, 12 distractors, 12 train."""
    images = tmp_path_factory.mktemp("images")
    write_images(images, range(44))
    output = tmp_path_factory.mktemp("bench") / "bench"
    make_benchmark(images, output, references=10, queries_per_ref=2, negative_fraction=0.5, seed=0)
    return output


@pytest.fixture(scope="module")
def results(bench_dir, tmp_path_factory):
    reports = tmp_path_factory.mktemp("reports")
    return run_bench(bench_dir, ["phash", TINY_STUDENT], size=64, report_dir=reports, progress=False)


def without_timings(result: dict) -> dict:
    return {key: value for key, value in result.items() if key not in TIMING_KEYS}


# ------------------------------------------------------------------------------------ run_bench


def test_one_row_per_model_with_the_documented_keys(results, bench_dir):
    assert [r["model"] for r in results] == ["phash", TINY_STUDENT]
    for result in results:
        for key, kind in REQUIRED.items():
            assert isinstance(result[key], kind), key
        assert result["recall_at_p90"] is None or 0.0 <= result["recall_at_p90"] <= 1.0
        assert 0.0 <= result["uAP"] <= 1.0 and 0.0 <= result["uAP_sn"] <= 1.0
        assert 0.0 <= result["acc_at_1"] <= result["recall_at_10"] <= 1.0
        assert result["images_per_second"] > 0 and result["input_size"] == 64 and result["k"] == 10
        json.dumps(result, allow_nan=False)  # the CLI writes it as JSON
    assert (results[0]["dim"], results[0]["bytes_per_image"]) == (64, 8)  # pHash: 64 bits
    assert (results[1]["dim"], results[1]["bytes_per_image"]) == (32, 128)  # float32
    # how each model ran, as rdcd extract says it (an untrained spec stays in PyTorch)
    assert results[0]["runtime"] == "phash runs with PHashModel"
    assert results[1]["runtime"] == f"{TINY_STUDENT} runs with PyTorch"


def test_models_without_a_card_use_sscds_beta(results):
    for result in results:
        assert result["beta_own"] == 1.0 and result["uAP_sn_own"] == result["uAP_sn"]


def test_a_shipped_model_is_also_scored_with_its_cards_beta(bench_dir, tmp_path, tiny_student_file, monkeypatch):
    import rdcd.models as models
    from rdcd.bench import _load_seeded
    from rdcd.scoring import benchmark_predictions, embed_benchmark
    from rdcd.metrics import evaluate
    from rdcd.models.shipped import register_shipped
    from test_shipped import write_card

    monkeypatch.setattr(models, "MODEL_REGISTRY", dict(models.MODEL_REGISTRY))
    register_shipped(write_card(tmp_path / "weights", tiny_student_file, thresholds={
        "score_norm": {"threshold": 0.1, "precision": 0.9, "beta": 0.25, "ranks": [0, 2]}}))
    [result] = run_bench(bench_dir, ["rdcd-tiny-32"], progress=False)
    assert result["beta_own"] == 0.25
    bench = BenchmarkFolder.read(bench_dir)
    sets = embed_benchmark(_load_seeded("rdcd-tiny-32"), bench)
    expected = {beta: evaluate(benchmark_predictions(sets, 10, True, beta=beta), bench.ground_truth)["uAP"]
                for beta in (0.25, 1.0)}
    assert expected[0.25] != pytest.approx(expected[1.0])  # so the two columns tell the betas apart
    assert result["uAP_sn_own"] == pytest.approx(expected[0.25])
    assert result["uAP_sn"] == pytest.approx(expected[1.0])
    # the same model given as its weights file (a shipped .pt) is recognised by its card
    [by_file] = run_bench(bench_dir, [str(tmp_path / "weights" / "rdcd-tiny-32.pt")], progress=False)
    assert by_file["beta_own"] == 0.25 and by_file["uAP_sn_own"] == pytest.approx(expected[0.25])


def test_counts_come_from_the_benchmark_files(results, bench_dir):
    ground_truth = read_csv(bench_dir / "ground_truth.csv")
    n_matching = sum(1 for row in ground_truth if row["reference_id"])
    n_query_files = len(list((bench_dir / "queries").glob("*.jpg")))
    assert n_matching == 20 and n_query_files == 40
    for result in results:
        assert (result["n_queries"], result["n_gt"]) == (n_query_files, n_matching)
        assert result["n_images_timed"] == n_query_files + len(list((bench_dir / "references").glob("*.jpg")))
        assert result["n_failures"] == 0


def test_breakdown_covers_every_op_of_the_matching_queries(results, bench_dir):
    matching = {row["query_id"] for row in read_csv(bench_dir / "ground_truth.csv") if row["reference_id"]}
    positives_per_op: dict[str, int] = {}
    for row in read_csv(bench_dir / "edits.csv"):
        if row["query_id"] in matching:
            for op in {step["op"] for step in json.loads(row["ops"])}:
                positives_per_op[op] = positives_per_op.get(op, 0) + 1
    for result in results:
        breakdown = result["uAP_by_edit"]
        assert {op: b["n_positives"] for op, b in breakdown.items()} == positives_per_op
        assert all(0.0 <= b["uAP"] <= 1.0 and 0.0 <= b["uAP_sn"] <= 1.0 for b in breakdown.values())


def test_a_report_per_model(results):
    for result in results:
        page = Path(result["report"]).read_text()
        assert page.startswith("<!DOCTYPE html>") and result["model"] in page
    assert Path(results[1]["report"]).name == "student_mobilenetv3_large_100_32.html"


@pytest.mark.slow
def test_two_runs_give_the_same_numbers(bench_dir, results):
    """Even for an untrained student spec: its random layers are seeded."""
    again = run_bench(bench_dir, [TINY_STUDENT], size=64, progress=False)
    assert without_timings(again[0]) == without_timings(results[1])


@pytest.fixture(scope="module")
def self_bench(tmp_path_factory) -> Path:
    """Queries that are byte-identical copies of the references (other ids), no edits.csv."""
    root = tmp_path_factory.mktemp("self") / "bench"
    write_images(root / "train", range(100, 106))
    rows = ["query_id,reference_id"]
    for i in range(10):
        image = picture(200 + i, (128, 96))
        for folder, name in (("references", f"R{i:06d}"), ("queries", f"Q{i:05d}")):
            (root / folder).mkdir(parents=True, exist_ok=True)
            image.save(root / folder / f"{name}.png")
        rows.append(f"Q{i:05d},R{i:06d}")
    (root / "ground_truth.csv").write_text("\n".join(rows) + "\n")
    return root


def test_identical_queries_and_references_give_perfect_scores(self_bench):
    for result in run_bench(self_bench, ["phash", TINY_STUDENT], size=64, progress=False):
        assert result["uAP"] == pytest.approx(1.0) and result["acc_at_1"] == 1.0, result["model"]
        assert result["recall_at_p90"] == 1.0 and result["n_gt"] == 10
        assert result["uAP_by_edit"] is None  # no edits.csv


def test_bench_rejects_bad_inputs(self_bench, tmp_path):
    with pytest.raises(FileNotFoundError, match="train/"):
        run_bench(tmp_path, ["phash"])
    with pytest.raises(ValueError, match="twice"):
        run_bench(self_bench, ["phash", "phash"])
    broken = tmp_path / "broken"
    shutil.copytree(self_bench, broken)
    (broken / "queries" / "Q00003.png").unlink()
    with pytest.raises(ValueError, match="Q00003"):
        BenchmarkFolder.read(broken)


# ------------------------------------------------------------------------------------ pieces


def test_uap_by_edit_hand_worked():
    ground_truth = {"Q1": "R1", "Q2": "R2", "Q3": None}
    edits = {"Q1": ("crop",), "Q2": ("crop", "blur"), "Q3": ("blur", "pad")}
    predictions = Predictions.from_rows([("Q1", "R1", 0.9), ("Q2", "R9", 0.95), ("Q2", "R2", 0.5), ("Q3", "R5", 0.8)])
    # crop: positives Q1, Q2; Q3 is a distractor. Ranked: Q2R9 no | Q1R1 yes (1/2) | Q3R5 no | Q2R2 yes (2/4)
    # blur: positive Q2 only (Q3 has no match).  Ranked: Q2R9 no | Q3R5 no | Q2R2 yes (1/3)
    # pad: only on a query without a match, so no figure
    assert uap_by_edit(predictions, ground_truth, edits) == {
        "blur": {"n_positives": 1, "uAP": pytest.approx(1 / 3)},
        "crop": {"n_positives": 2, "uAP": pytest.approx(0.5)},
    }


def test_bytes_per_image_convention():
    assert bytes_per_image(load_model("phash")) == 8
    assert bytes_per_image(load_model("pdq")) == 32
    assert bytes_per_image(load_model(TINY_STUDENT, input_size=64)) == 4 * 32


def test_markdown_names_command_machine_date_and_counts(results):
    text = format_markdown(results, "rdcd bench --benchmark B --models phash", "Some CPU, 2 cores", "2024-01-02")
    assert "`rdcd bench --benchmark B --models phash`" in text and "Some CPU, 2 cores" in text
    assert "2024-01-02" in text and "40 queries, 20 of them" in text
    rows = [line for line in text.splitlines() if line.startswith("| phash |") or line.startswith(f"| {TINY_STUDENT} |")]
    assert len(rows) == 2 and rows[0].split("|")[5].strip() == f"{results[0]['uAP']:.3f}"
    assert "| crop |" in text or "| small_crop |" in text  # the per-edit table
    assert f"- {TINY_STUDENT}: {TINY_STUDENT} runs with PyTorch" in text  # how each model ran


# ------------------------------------------------------------------------------------ CLI


def test_cli_prints_the_table_and_writes_json_and_markdown(bench_dir, tmp_path, capsys):
    out, md = tmp_path / "results.json", tmp_path / "table.md"
    assert main(["bench", "--benchmark", str(bench_dir), "--models", "phash", "--size", "64",
                 "--output", str(out), "--markdown", str(md)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["model", "dim", "bytes", "img/s", "uAP", "uAP_sn", "own_beta", "uAP_sn_own",
                                              "R@P90", "acc@1"]
    assert "40 queries, 20 of them" in printed
    saved = json.loads(out.read_text())
    assert [r["model"] for r in saved] == ["phash"] and saved[0]["n_gt"] == 20
    assert f"--benchmark {bench_dir} --models phash --size 64" in md.read_text()
    assert main(["bench", "--benchmark", str(bench_dir), "--models", "phash", "--size", "64", "--precision", "fp32",
                 "--exact-decode", "--markdown", str(md)]) == 0
    assert "--precision fp32 --exact-decode" in md.read_text()  # the command that reproduces the run


@pytest.mark.slow
def test_make_benchmark_output_is_accepted_by_bench(tmp_path):
    """The issue's acceptance check, through the installed command line."""
    write_images(tmp_path / "images", range(300, 350))
    rdcd = [sys.executable, "-m", "rdcd"]
    subprocess.run(rdcd + ["make-benchmark", "--images", str(tmp_path / "images"), "--output",
                           str(tmp_path / "bench")], check=True, capture_output=True)
    done = subprocess.run(rdcd + ["bench", "--benchmark", str(tmp_path / "bench"), "--models", "phash",
                                  "--output", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "r.json").read_text())[0]
    n_matching = sum(1 for row in read_csv(tmp_path / "bench" / "ground_truth.csv") if row["reference_id"])
    assert result["n_gt"] == n_matching > 0 and result["uAP_by_edit"]


def test_interleaved_rates_run_every_job_once_per_round_in_turn():
    """The benchmark scripts' timing: one warm-up call each, then rounds that run every job once in
    the order given, so a slow spell of the machine hits all of them; rates are items per second."""
    import time

    from rdcd.machine import interleaved_rates

    calls = []

    def job(name, seconds):
        def run():
            calls.append(name)
            time.sleep(seconds)
        return run

    rates = interleaved_rates({"fast": job("fast", 0.01), "slow": job("slow", 0.04)}, items=8, rounds=3)
    assert calls == ["fast", "slow"] * 4  # warm-up + 3 rounds
    assert {k: len(v) for k, v in rates.items()} == {"fast": 3, "slow": 3}
    assert (rates["slow"] < 8 / 0.04 + 1).all() and (rates["fast"] > rates["slow"]).all()
    calls.clear()
    interleaved_rates({"a": job("a", 0), "b": job("b", 0)}, items=1, rounds=2, warmup=False)
    assert calls == ["a", "b", "a", "b"]

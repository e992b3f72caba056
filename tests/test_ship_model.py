"""scripts/ship_model.py: the score-normalisation beta a shipped model's card records is chosen on the
validation benchmark, by uAP, among BETAS; a report on another benchmark reuses it."""
import importlib.util
from pathlib import Path

import pytest

from rdcd.bench import BenchmarkFolder, benchmark_predictions, embed_benchmark
from rdcd.benchmark import make_benchmark
from rdcd.metrics import evaluate
from rdcd.models import load_model
from test_bench import write_images

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ship_model.py"


@pytest.fixture(scope="module")
def ship_model():
    spec = importlib.util.spec_from_file_location("ship_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_bench(tmp_path_factory) -> Path:
    images = tmp_path_factory.mktemp("images")
    write_images(images, range(30), size=(64, 64))
    output = tmp_path_factory.mktemp("bench") / "bench"
    make_benchmark(images, output, references=8, queries_per_ref=2, negative_fraction=0.5, seed=1)
    return output


def test_calibration_keeps_the_beta_of_the_best_validation_uap(ship_model, small_bench):
    import torch

    torch.manual_seed(0)
    model = load_model("student:mobilenetv3_large_100:32", input_size=64)
    validation = ship_model.bench_model(model, small_bench)
    tried = {float(b): u for b, u in validation["score_norm_betas"].items()}
    assert sorted(tried) == sorted(ship_model.BETAS)
    chosen = validation["score_norm"]["beta"]
    assert tried[chosen] == max(tried.values()) == validation["score_norm"]["uAP"]
    # the same numbers as scoring each beta directly
    bench = BenchmarkFolder.read(small_bench)
    sets = embed_benchmark(model, bench)
    for beta, uap in tried.items():
        assert evaluate(benchmark_predictions(sets, 10, True, beta=beta), bench.ground_truth)["uAP"] == pytest.approx(uap)
    assert ("score_norm_beta1" in validation) == (chosen != 1.0)
    # a report benchmark reuses a given beta and adds SSCD's beta 1 for comparison with `rdcd bench`
    report = ship_model.bench_model(model, small_bench, beta=0.5)
    assert report["score_norm"]["beta"] == 0.5 and "score_norm_betas" not in report
    assert report["score_norm"]["uAP"] == pytest.approx(tried[0.5])
    assert report["score_norm_beta1"]["uAP"] == pytest.approx(tried[1.0])
    # a threshold calibrated at the model's beta is checked at that beta only, never at beta 1
    with_threshold = ship_model.bench_model(model, small_bench, {"score_norm": {"threshold": 0.0}}, beta=0.5)
    assert "at_calibrated_threshold" in with_threshold["score_norm"]
    assert "at_calibrated_threshold" not in with_threshold["score_norm_beta1"]

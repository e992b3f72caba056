import time

import numpy as np
import pytest

from rdcd.metrics import (
    METRIC_KEYS,
    Predictions,
    evaluate,
    precision_recall_curve,
    read_ground_truth,
    read_predictions,
    separation,
    write_ground_truth,
    write_predictions,
)

GOLDEN_GT = {"Q1": "R1", "Q2": "R2", "Q3": "R3", "Q4": "R4"}
GOLDEN_PREDICTIONS = [
    ("Q1", "R1", 0.9),
    ("Q1", "R9", 0.9),
    ("Q2", "R2", 0.8),
    ("Q2", "R8", 0.95),
    ("Q3", "R7", 0.5),
    ("Q5", "R1", 0.7),
]


def test_golden_case_from_evaluation_md():
    m = evaluate(GOLDEN_PREDICTIONS, GOLDEN_GT)
    assert set(m) == set(METRIC_KEYS)
    assert m["uAP"] == pytest.approx((1 / 3 + 2 / 4) / 4)
    assert m["uAP"] == pytest.approx(0.2083333, abs=1e-7)
    assert m["recall_at_p90"] is None and m["threshold_at_p90"] is None
    assert m["acc_at_1"] == 0.0
    assert m["recall_at_10"] == 0.5
    assert m["n_gt"] == 4 and m["n_predictions"] == 6


def test_golden_two_predictions_tied():
    m = evaluate([("Q1", "R1", 1.0), ("Q1", "R9", 1.0)], GOLDEN_GT)
    assert m["uAP"] == pytest.approx(0.125)


def test_golden_precision_recall_curve():
    precision, recall, thresholds = precision_recall_curve(GOLDEN_PREDICTIONS, GOLDEN_GT)
    np.testing.assert_allclose(precision, [0, 0, 1 / 3, 2 / 4, 2 / 5, 2 / 6])
    np.testing.assert_allclose(recall, [0, 0, 0.25, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(thresholds, [0.95, 0.9, 0.9, 0.8, 0.7, 0.5])


def test_recall_at_p90_reached_hand_worked():
    gt = {"Q1": "R1", "Q2": "R2", "Q3": "R3", "Q4": "R4", "Q5": None}
    preds = [("Q1", "R1", 0.9), ("Q2", "R2", 0.8), ("Q5", "R5", 0.7), ("Q3", "R3", 0.6)]
    m = evaluate(preds, gt)
    # precisions 1, 1, 2/3, 3/4 over N = 4 (Q4 never predicted, Q5 has no match)
    assert m["uAP"] == pytest.approx((1 + 1 + 3 / 4) / 4)
    assert m["recall_at_p90"] == pytest.approx(0.5)
    assert m["threshold_at_p90"] == pytest.approx(0.8)
    assert m["acc_at_1"] == pytest.approx(0.75)
    assert m["n_gt"] == 4


def test_perfect_ranking_scores_one():
    gt = {f"Q{i}": f"R{i}" for i in range(20)}
    preds = [(f"Q{i}", f"R{i}", 1.0 - i / 100) for i in range(20)]
    preds += [(f"Q{i}", f"R{i + 1}", 0.5 - i / 100) for i in range(20)]
    m = evaluate(preds, gt)
    assert m["uAP"] == pytest.approx(1.0)
    assert m["recall_at_p90"] == pytest.approx(1.0)
    assert m["threshold_at_p90"] == pytest.approx(1.0 - 19 / 100)
    assert m["acc_at_1"] == 1.0 and m["recall_at_10"] == 1.0


def test_no_positive_predictions():
    m = evaluate([("Q1", "R2", 0.9), ("Q2", "R1", 0.8)], {"Q1": "R1", "Q2": "R2"})
    assert m["uAP"] == 0.0
    assert m["recall_at_p90"] is None
    assert m["acc_at_1"] == 0.0 and m["recall_at_10"] == 0.0


def test_empty_predictions():
    m = evaluate([], {"Q1": "R1"})
    assert m["uAP"] == 0.0 and m["recall_at_p90"] is None and m["n_predictions"] == 0


def test_all_equal_scores_put_positives_last():
    # 3 predictions for one query, 1 positive: worst case puts it at rank 3 -> precision 1/3
    gt = {"Q1": "R1", "Q2": None}
    preds = [("Q1", "R1", 0.5), ("Q1", "R2", 0.5), ("Q2", "R3", 0.5)]
    m = evaluate(preds, gt)
    assert m["uAP"] == pytest.approx(1 / 3)
    assert m["acc_at_1"] == 0.0  # tied with R2: rank 1, pessimistic
    assert m["recall_at_10"] == 1.0


def test_accuracy_at_1_ties_are_pessimistic():
    gt = {"Q1": "R1"}
    assert evaluate([("Q1", "R1", 0.6), ("Q1", "R2", 0.5)], gt)["acc_at_1"] == 1.0
    assert evaluate([("Q1", "R1", 0.5), ("Q1", "R2", 0.5)], gt)["acc_at_1"] == 0.0
    # other queries' scores do not affect a query's rank
    assert evaluate([("Q1", "R1", 0.5), ("Q2", "R2", 0.9)], gt)["acc_at_1"] == 1.0


def test_recall_at_10_boundary():
    gt = {"Q1": "R1"}
    nine_above = [("Q1", f"X{i}", 0.9) for i in range(9)] + [("Q1", "R1", 0.5)]
    ten_above = [("Q1", f"X{i}", 0.9) for i in range(10)] + [("Q1", "R1", 0.5)]
    nine_above_one_tied = nine_above + [("Q1", "Y", 0.5)]
    assert evaluate(nine_above, gt)["recall_at_10"] == 1.0
    assert evaluate(ten_above, gt)["recall_at_10"] == 0.0
    assert evaluate(nine_above_one_tied, gt)["recall_at_10"] == 0.0


def test_duplicate_pairs_rejected_with_the_pair_named():
    preds = [("Q1", "R1", 0.9), ("Q2", "R5", 0.3), ("Q1", "R1", 0.2)]
    with pytest.raises(ValueError, match=r"\(Q1, R1\)"):
        evaluate(preds, {"Q1": "R1"})


def test_non_finite_scores_rejected():
    with pytest.raises(ValueError, match="finite"):
        evaluate([("Q1", "R1", float("nan"))], {"Q1": "R1"})


def test_ground_truth_without_matches_rejected():
    with pytest.raises(ValueError, match="no matching pairs"):
        evaluate([("Q1", "R1", 0.5)], {"Q1": None})


def _reference_metrics(rows, gt):
    """Straight transcription of docs/evaluation.md with Python loops, to check the vectorised code."""
    pairs = {(q, r) for q, r in gt.items() if r}
    n = len(pairs)
    ranked = sorted(rows, key=lambda row: (-row[2], (row[0], row[1]) in pairs))
    tp, uap, best = 0, 0.0, None
    for i, (q, r, s) in enumerate(ranked, start=1):
        if (q, r) in pairs:
            tp += 1
            uap += tp / i / n
        if tp / i >= 0.9 and (best is None or tp / n > best[0]):
            best = (tp / n, s)
    acc1 = rec10 = 0
    for q, r in pairs:
        mine = [s for qq, _, s in rows if qq == q]
        found = [s for qq, rr, s in rows if (qq, rr) == (q, r)]
        if found:
            rank = sum(s >= found[0] for s in mine) - 1
            acc1 += rank == 0
            rec10 += rank < 10
    return uap, best, acc1 / n, rec10 / n


@pytest.mark.parametrize("seed", range(5))
def test_matches_loop_transcription_of_the_definition(seed):
    rng = np.random.default_rng(seed)
    nq, nr = 30, 40
    gt = {f"Q{q}": (f"R{rng.integers(nr)}" if rng.random() < 0.6 else None) for q in range(nq)}
    pairs = {(f"Q{rng.integers(nq)}", f"R{rng.integers(nr)}") for _ in range(300)}
    pairs |= {(q, r) for q, r in gt.items() if r and rng.random() < 0.7}
    rows = [(q, r, float(rng.integers(0, 8)) / 8) for q, r in sorted(pairs)]  # coarse scores: many ties
    m = evaluate(rows, gt)
    uap, best, acc1, rec10 = _reference_metrics(rows, gt)
    assert m["uAP"] == pytest.approx(uap)
    assert m["acc_at_1"] == pytest.approx(acc1)
    assert m["recall_at_10"] == pytest.approx(rec10)
    if best is None:
        assert m["recall_at_p90"] is None
    else:
        assert (m["recall_at_p90"], m["threshold_at_p90"]) == pytest.approx(best)


def test_row_order_within_ties_does_not_matter():
    rng = np.random.default_rng(0)
    gt = {f"Q{q}": f"R{q}" for q in range(50)}
    rows = [(f"Q{q}", f"R{r}", float(rng.integers(0, 4))) for q in range(50) for r in rng.choice(60, 5, replace=False)]
    first = evaluate(rows, gt)
    for _ in range(5):
        shuffled = [rows[i] for i in rng.permutation(len(rows))]
        assert evaluate(shuffled, gt) == first


def test_predictions_csv_round_trip(tmp_path):
    scores32 = np.array([0.1, 1e-5, -0.3333333, 0.99999994], dtype=np.float32)
    preds = Predictions(["Q1", "Q1", "Q2", "Q3"], ["R1", "R2", "R1", "R9"], scores32)
    path = write_predictions(tmp_path / "p.csv", preds)
    assert path.read_text().splitlines()[0] == "query_id,reference_id,score"
    back = read_predictions(path)
    assert back.query_ids.tolist() == ["Q1", "Q1", "Q2", "Q3"]
    assert back.reference_ids.tolist() == ["R1", "R2", "R1", "R9"]
    np.testing.assert_array_equal(back.scores.astype(np.float32), scores32)

    rows64 = [("Q1", "R1", 0.1 + 0.2), ("Q2", "R2", -1e-300)]
    assert read_predictions(write_predictions(tmp_path / "q.csv", rows64)).rows() == rows64


def test_ground_truth_csv_round_trip(tmp_path):
    path = tmp_path / "gt.csv"
    path.write_text("query_id,reference_id\nQ00000,R000012\nQ00001,\nQ00002,R000007\n")
    gt = read_ground_truth(path)
    assert gt == {"Q00000": "R000012", "Q00001": None, "Q00002": "R000007"}
    assert read_ground_truth(write_ground_truth(tmp_path / "gt2.csv", gt)) == gt


def test_csv_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\nQ1,R1,0.5\n")
    with pytest.raises(ValueError, match="bad.csv.*header"):
        read_predictions(bad)
    bad.write_text("query_id,reference_id,score\nQ1,R1,high\n")
    with pytest.raises(ValueError, match="line 2"):
        read_predictions(bad)
    dup = tmp_path / "gt.csv"
    dup.write_text("query_id,reference_id\nQ1,R1\nQ1,R2\n")
    with pytest.raises(ValueError, match="Q1"):
        read_ground_truth(dup)


@pytest.mark.slow
def test_a_million_predictions_evaluate_quickly():
    rng = np.random.default_rng(0)
    nq, k = 100_000, 10
    q = np.repeat(np.arange(nq), k)
    r = rng.integers(0, 1_000_000, size=nq * k)
    r[::k] = np.arange(nq)  # the true reference is among each query's predictions
    r[1::k] = np.arange(nq) + 1_000_000  # distinct from the first, so no duplicate pairs
    preds = Predictions(
        np.char.add("Q", q.astype(str)), np.char.add("R", r.astype(str)), rng.random(nq * k).astype(np.float32)
    )
    keys = np.char.add(preds.query_ids, preds.reference_ids)
    keep = np.unique(keys, return_index=True)[1]
    preds = preds.subset(np.sort(keep))
    gt = {f"Q{i}": f"R{i}" for i in range(nq)}
    start = time.perf_counter()
    m = evaluate(preds, gt)
    elapsed = time.perf_counter() - start
    assert m["n_predictions"] == len(preds) > 990_000
    assert m["recall_at_10"] == 1.0  # every true pair is predicted, at most 10 per query
    assert 0.0 < m["uAP"] < 0.2  # random scores: roughly the 10% positive rate
    assert elapsed < 60, f"evaluating 10^6 predictions took {elapsed:.1f}s"


def test_separation_by_hand():
    """Two references on the axes; Q1 copies R1, Q2 copies R2, Q3 is not a copy."""
    refs = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    queries = np.array([[0.6, 0.8], [0.0, 1.0], [0.8, 0.6]], dtype=np.float32)
    got = separation(["Q1", "Q2", "Q3"], queries, ["R1", "R2"], refs, {"Q1": "R1", "Q2": "R2", "Q3": None})
    # copy cosines: Q1.R1 = 0.6, Q2.R2 = 1.0; hardest non-copy: Q1.R2 = 0.8, Q2.R1 = 0.0, Q3: max(0.8, 0.6) = 0.8
    assert got["pos_cos"] == pytest.approx(0.8)
    assert got["hardest_neg_cos"] == pytest.approx(1.6 / 3)
    assert got["hn"] == pytest.approx(-(np.log(0.2) + np.log(1.0) + np.log(0.2)) / 3)
    # a non-copy identical to a reference hits the floor eps instead of log(0)
    clamp = separation(["Q"], refs[:1], ["R1", "R2"], refs, {"Q": None})
    assert clamp["pos_cos"] is None and clamp["hn"] == pytest.approx(-np.log(1e-3))


def test_csv_with_a_byte_order_mark_and_crlf_lines(tmp_path):
    """As spreadsheet programs save CSV: UTF-8 BOM first, CRLF line ends."""
    (tmp_path / "p.csv").write_bytes("\ufeffquery_id,reference_id,score\r\nQ1,R1,0.5\r\nQ2,R9,0.25\r\n".encode())
    (tmp_path / "gt.csv").write_bytes("\ufeffquery_id,reference_id\r\nQ1,R1\r\nQ2,\r\n".encode())
    assert read_predictions(tmp_path / "p.csv").rows() == [("Q1", "R1", 0.5), ("Q2", "R9", 0.25)]
    assert read_ground_truth(tmp_path / "gt.csv") == {"Q1": "R1", "Q2": None}


def test_predictions_with_no_query_in_the_ground_truth_are_an_error(tmp_path, capsys):
    from rdcd.cli import main

    write_predictions(tmp_path / "p.csv", [("q1.jpg", "R1", 0.9), ("q2.jpg", "R2", 0.8)])
    write_ground_truth(tmp_path / "gt.csv", {"Q1": "R1", "Q2": "R2"})
    with pytest.raises(ValueError, match="none of the 2 query ids of the predictions .*'q1.jpg'.* 'Q1'"):
        evaluate(read_predictions(tmp_path / "p.csv"), read_ground_truth(tmp_path / "gt.csv"))
    assert main(["eval", "--predictions", str(tmp_path / "p.csv"), "--ground-truth", str(tmp_path / "gt.csv")]) == 1
    assert "rdcd eval: error: none of the 2 query ids" in capsys.readouterr().err

import numpy as np
import pytest

from rdcd.postprocess import PCAWhitening, ScoreNormalizer
from rdcd.search import Index, knn_pairs


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# Variance 8/3 along x, 2/3 along y (unbiased covariance of these 4 points, centred at (10, 10)).
CROSS = np.array([[2, 0], [-2, 0], [0, 1], [0, -1]], dtype=np.float32) + 10


def test_whitening_hand_worked():
    w = PCAWhitening(2).fit(CROSS)
    np.testing.assert_allclose(w.mean_, [10, 10])
    np.testing.assert_allclose(w.whiten(CROSS[[0, 2]]), [[2 / np.sqrt(8 / 3), 0], [0, 1 / np.sqrt(2 / 3)]], atol=1e-5)
    np.testing.assert_allclose(w.transform(np.array([[12, 11]])), [[np.sqrt(0.5), np.sqrt(0.5)]], atol=1e-5)
    one = PCAWhitening(1).fit(CROSS)  # keeps the x axis only, sign fixed so the largest coordinate is positive
    np.testing.assert_allclose(one.whiten(np.array([[11, 15]])), [[1 / np.sqrt(8 / 3)]], atol=1e-5)
    np.testing.assert_allclose(one.transform(np.array([[7, 15], [11, 3]])), [[-1], [1]], atol=1e-6)


def test_whitened_background_has_identity_covariance():
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((16, 16)) * np.linspace(0.1, 3, 16)
    background = rng.standard_normal((3000, 16)) @ mixing + 5
    w = PCAWhitening(8).fit(background)
    white = w.whiten(background)
    np.testing.assert_allclose(white.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(white.T), np.eye(8), atol=1e-4)
    out = w.transform(background)
    assert out.shape == (3000, 8) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


def test_whitening_save_load_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    background = rng.standard_normal((200, 6))
    w = PCAWhitening(4).fit(background)
    loaded = PCAWhitening.load(w.save(tmp_path / "w.npz"))
    assert loaded.dim == 4
    np.testing.assert_array_equal(loaded.transform(background), w.transform(background))
    with pytest.raises(ValueError, match="between 1 and 6"):
        PCAWhitening(7).fit(background)
    with pytest.raises(ValueError, match="fewer than 3"):
        PCAWhitening(3).fit(np.c_[background[:, :2], np.zeros(200)])
    with pytest.raises(RuntimeError, match="not fitted"):
        PCAWhitening(2).transform(background)
    with pytest.raises(ValueError, match="expected a saved ScoreNormalizer"):
        ScoreNormalizer.load(tmp_path / "w.npz")


BACKGROUND = np.array([[1, 0], [0.6, 0.8], [0, 1], [-1, 0]], dtype=np.float32)


def test_score_normalizer_hand_worked():
    queries = np.array([[1, 0], [0, 1]], dtype=np.float32)
    # similarities, sorted: q1 -> 1, .6, 0, -1 ; q2 -> 1, .8, 0, 0
    np.testing.assert_allclose(ScoreNormalizer().fit(BACKGROUND).bias(queries), [1.6 / 3, 1.8 / 3], atol=1e-6)
    custom = ScoreNormalizer(beta=2.0, ranks=(1, 2)).fit(BACKGROUND)
    np.testing.assert_allclose(custom.bias(queries), [0.6, 0.8], atol=1e-6)
    scores = np.array([[0.9, 0.5], [0.7, 0.2]])
    np.testing.assert_allclose(custom.normalize(scores, queries), [[0.3, -0.1], [-0.1, -0.6]], atol=1e-6)
    np.testing.assert_allclose(custom.normalize(scores[:, 0], queries), [0.3, -0.1], atol=1e-6)


def test_score_normalizer_checks():
    with pytest.raises(ValueError, match="more than 2 background"):
        ScoreNormalizer(ranks=(0, 2)).fit(BACKGROUND[:2])
    with pytest.raises(ValueError, match="0 <= i <= j"):
        ScoreNormalizer(ranks=(2, 1))
    with pytest.raises(RuntimeError, match="not fitted"):
        ScoreNormalizer().bias(BACKGROUND)


def test_score_normalizer_save_load(tmp_path):
    rng = np.random.default_rng(2)
    background, queries = unit(rng.standard_normal((500, 8))), unit(rng.standard_normal((20, 8)))
    normalizer = ScoreNormalizer(beta=0.5, ranks=(1, 4)).fit(background)
    loaded = ScoreNormalizer.load(normalizer.save(tmp_path / "norm.npz"))
    assert (loaded.beta, loaded.ranks) == (0.5, (1, 4))
    np.testing.assert_array_equal(loaded.bias(queries), normalizer.bias(queries))


def test_normalisation_keeps_each_querys_ranking_but_changes_the_global_one():
    rng = np.random.default_rng(3)
    refs, background = unit(rng.standard_normal((300, 16))), unit(rng.standard_normal((400, 16)))
    queries = unit(rng.standard_normal((40, 16)))
    qids = [f"Q{i}" for i in range(40)]
    index = Index.build([f"R{i}" for i in range(300)], refs)
    plain = knn_pairs(qids, queries, index, k=10)
    bias = ScoreNormalizer().fit(background).bias(queries)
    normalized = knn_pairs(qids, queries, index, k=10, offsets=bias)
    for q in qids:
        mine = plain.query_ids == q
        assert np.array_equal(plain.reference_ids[mine], normalized.reference_ids[mine])
        assert np.all(np.diff(normalized.scores[mine]) <= 0)
    np.testing.assert_allclose(plain.scores - normalized.scores, np.repeat(bias, 10), atol=1e-6)
    assert not np.array_equal(np.argsort(-plain.scores), np.argsort(-normalized.scores))

import numpy as np
import pytest

from rdcd.search import Index, best_pairs, knn_pairs, set_threads


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n, dim, rng, clusters=32, spread=0.3):
    centres = rng.standard_normal((clusters, dim))
    return unit(centres[rng.integers(clusters, size=n)] + spread * rng.standard_normal((n, dim)))


def ids(prefix, n):
    return [f"{prefix}{i:05d}" for i in range(n)]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    refs = clustered(4000, 32, rng)
    queries = unit(refs[:200] + 0.05 * rng.standard_normal((200, 32)))
    return refs, queries


def test_threads_never_exceed_cores():
    import os

    assert 1 <= set_threads(10_000) <= os.cpu_count()
    assert set_threads(1) == 1
    set_threads()


def test_flat_search_equals_brute_force(data):
    refs, queries = data
    index = Index.build(ids("R", len(refs)), refs)  # default: exact inner product
    scores, found = index.search(queries, k=5)
    sims = queries @ refs.T
    expected = np.argsort(-sims, axis=1)[:, :5]
    assert found.tolist() == [[f"R{j:05d}" for j in row] for row in expected]
    np.testing.assert_allclose(scores, np.take_along_axis(sims, expected, axis=1), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)


@pytest.mark.parametrize("factory, params", [("IVF64,Flat", {"nprobe": 16}), ("HNSW32", {"ef_search": 64})])
def test_approximate_indexes_recall_exact_neighbours(data, factory, params):
    refs, queries = data
    exact = Index.build(ids("R", len(refs)), refs).search(queries, 10)[1]
    approx = Index.build(ids("R", len(refs)), refs, factory, **params).search(queries, 10)[1]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.9
    assert np.mean(approx[:, 0] == np.array(ids("R", 200))) >= 0.95  # the source of each noisy copy comes first


def test_search_params_are_set_and_checked(data):
    refs, _ = data
    ivf = Index.build(ids("R", len(refs)), refs, "IVF64,Flat", nprobe=8)
    assert ivf.nprobe == 8
    with pytest.raises(ValueError, match="efSearch"):
        ivf.ef_search = 10
    hnsw = Index.build(ids("R", 300), refs[:300], "HNSW16")
    hnsw.ef_search = 77
    assert hnsw.ef_search == 77 and hnsw.nprobe is None


def test_save_load_extend_round_trip(tmp_path, data):
    refs, queries = data
    index = Index.build(ids("R", 3000), refs[:3000], "IVF32,Flat", nprobe=4)
    path = index.save(tmp_path / "refs.index.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["refs.index.npz"]  # no temporary file left behind
    loaded = Index.load(path)
    assert (loaded.factory, len(loaded), loaded.nprobe, loaded.ids) == ("IVF32,Flat", 3000, 4, index.ids)
    for a, b in zip(index.search(queries, 5), loaded.search(queries, 5)):
        np.testing.assert_array_equal(a, b)

    loaded.add(ids("R", 4000)[3000:], refs[3000:])  # extend without retraining
    reloaded = Index.load(loaded.save(path))
    assert len(reloaded) == 4000
    reloaded.nprobe = 32
    scores, found = reloaded.search(refs[3990:], 1)
    assert found[:, 0].tolist() == ids("R", 4000)[3990:]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_rejects_repeated_ids_and_bad_files(tmp_path, data):
    refs, _ = data
    index = Index.build(["a", "b"], refs[:2])
    with pytest.raises(ValueError, match="'b'"):
        index.add(["c", "b"], refs[2:4])
    with pytest.raises(ValueError, match="'d'"):
        index.add(["d", "d"], refs[2:4])
    assert len(index) == 2
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz"):
        Index.load(tmp_path / "other.npz")


def test_training_on_too_few_vectors_says_what_to_do(data):
    refs, _ = data
    with pytest.raises(ValueError, match="IVF1024.*fewer lists"):
        Index.build(ids("R", 100), refs[:100], "IVF1024,Flat")


def test_missing_neighbours_are_marked(data):
    refs, queries = data
    scores, found = Index.build(["a", "b", "c"], refs[:3]).search(queries[:2], k=5)
    assert (found[:, 3:] == "").all() and np.isneginf(scores[:, 3:]).all()
    assert (found[:, :3] != "").all()


def test_knn_pairs(data):
    refs, queries = data
    index = Index.build(ids("R", len(refs)), refs)
    qids = ids("Q", 50)
    pairs = knn_pairs(qids, queries[:50], index, k=3)
    assert len(pairs) == 150
    assert pairs.query_ids.tolist() == [q for q in qids for _ in range(3)]
    scores, found = index.search(queries[:50], 3)
    assert pairs.reference_ids.tolist() == found.ravel().tolist()
    offsets = np.linspace(0, 1, 50)
    shifted = knn_pairs(qids, queries[:50], index, k=3, offsets=offsets)
    np.testing.assert_allclose(shifted.scores, scores.ravel() - np.repeat(offsets, 3), atol=1e-6)
    assert len(knn_pairs(qids[:2], queries[:2], Index.build(["a"], refs[:1]), k=10)) == 2


def brute_force_best(queries, refs, n, offsets):
    sims = queries @ refs.T - offsets[:, None]
    flat = np.argsort(-sims, axis=None)[:n]
    return np.sort(sims.ravel()[flat])[::-1], set(zip(*np.unravel_index(flat, sims.shape)))


@pytest.mark.parametrize("n", [1, 37, 500, 10_000])
def test_best_pairs_equal_brute_force_global_top_n(data, n):
    rng = np.random.default_rng(n)
    refs, queries = data[0][:60], data[1][:40]
    refs = np.concatenate([refs, unit(queries[:5] + 0.01 * rng.standard_normal((5, 32)))])  # some queries with
    index = Index.build(ids("R", len(refs)), refs)  # several near copies, so top pairs crowd into few queries
    offsets = rng.uniform(0, 0.3, size=len(queries)).astype(np.float32)
    for off in (None, offsets):
        pairs = best_pairs(ids("Q", 40), queries, index, n=n, k=1, offsets=off)
        expected_scores, expected_pairs = brute_force_best(queries, refs, n, np.zeros(40) if off is None else off)
        assert len(pairs) == min(n, 40 * len(refs))
        np.testing.assert_allclose(pairs.scores, expected_scores, atol=1e-5)
        got = {(int(q[1:]), int(r[1:])) for q, r in zip(pairs.query_ids, pairs.reference_ids)}
        assert got == expected_pairs
        assert len(set(got)) == len(pairs)

"""rdcd dedup on generated copies: each picture and its edited copies form one group, nothing else joins."""
import csv

from PIL import ImageEnhance

from conftest import picture
from rdcd.cli import main
from rdcd.dedup import find_groups


def edits(image):
    w, h = image.size
    return [image.crop((w // 12, h // 12, w - w // 12, h - h // 12)),  # a tight crop
            ImageEnhance.Brightness(image).enhance(1.3),
            image.resize((w // 2, h // 2))]


def test_dedup_groups_generated_copies(tmp_path, capsys):
    folder = tmp_path / "collection"
    folder.mkdir()
    truth = {}
    for n in range(6):
        original = picture(100 + n, (256, 224))
        original.save(folder / f"p{n}.jpg", quality=92)
        truth[f"p{n}"] = n
        if n < 4:  # two pictures stay alone
            for e, copy in enumerate(edits(original)):
                copy.save(folder / f"p{n}_copy{e}.jpg", quality=60)
                truth[f"p{n}_copy{e}"] = n
    out = tmp_path / "groups.csv"
    # the shallow student: the default (a PCA whitening fitted on real photos) scores these synthetic
    # gradient-and-shapes pictures as alike (0.64-0.75 between different ones); this test is about grouping
    assert main(["dedup", "--images", str(folder), "--output", str(out), "--html", str(tmp_path / "g.html"),
                 "--model", "rdcd-tf_efficientnet_lite0-shallow-128"]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == len(truth)
    group = {r["image_id"]: r["group"] for r in rows}
    for n in range(6):
        assert len({group[i] for i, t in truth.items() if t == n}) == 1  # all copies of a picture together
    assert len(set(group.values())) == 6  # and nothing else joined them
    assert {int(r["group_size"]) for r in rows} == {4, 1}
    page = (tmp_path / "g.html").read_text()
    assert page.count("<h2>group") == 4 and page.count("<img") == 16
    assert "4 group(s) of copies holding 16 images" in capsys.readouterr().err


def test_connected_components_are_transitive():
    import numpy as np

    a = np.array([1.0, 0.0, 0.0])
    b = np.array([0.8, 0.6, 0.0])  # a.b = 0.8
    c = np.array([0.28, 0.96, 0.0])  # b.c = 0.8, a.c = 0.28
    d = np.array([0.0, 0.0, 1.0])
    groups = find_groups(["a", "b", "c", "d"], np.stack([a, b, c, d]).astype(np.float32), threshold=0.75)
    assert groups.members() == [["a", "b", "c"]]
    assert groups.pairs.rows() == [("a", "b", groups.pairs.scores[0]), ("b", "c", groups.pairs.scores[1])]
    assert np.isnan(groups.best_score[3])


def test_dedup_of_a_store(tmp_path, capsys):
    import numpy as np

    from rdcd.store import ReferenceStore

    store = ReferenceStore.create(tmp_path / "s", "phash", threshold=0.9)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((5, 64)).astype(np.float32)
    vectors = np.concatenate([base, base[:2] + 0.05 * rng.standard_normal((2, 64)).astype(np.float32)])
    store.add([f"r{i}" for i in range(7)], vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    store.close()
    out = tmp_path / "groups.csv"
    assert main(["dedup", "--index", str(tmp_path / "s"), "--output", str(out)]) == 0
    group = {r["image_id"]: r["group"] for r in csv.DictReader(open(out))}
    assert group["r0"] == group["r5"] and group["r1"] == group["r6"] and len(set(group.values())) == 5

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from rdcd.benchmark_builder import OPS, RECIPES, Backdrops, edit, make_benchmark, random_edit, replay

N_IMAGES = 50


def synthetic_picture(index: int) -> Image.Image:
    """One of several kinds of picture (gradient, shapes, smooth noise, stripes), distinct per index."""
    rng = np.random.default_rng(index)
    w, h = int(rng.integers(96, 176)), int(rng.integers(96, 176))
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    kind = index % 4
    if kind == 0:  # two-colour gradient at a random angle
        angle = rng.uniform(0, np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        array = a + (b - a) * t / t.max()
    elif kind == 1:  # smooth random colour field
        coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        array = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=float)
    elif kind == 2:  # stripes of random frequency and direction
        f, angle = rng.uniform(3, 12), rng.uniform(0, np.pi)
        t = np.sin(2 * np.pi * f * (np.cos(angle) * xx + np.sin(angle) * yy))[..., None]
        array = 128 + 100 * t * rng.uniform(0.3, 1.0, 3)
    else:  # fine noise texture
        array = rng.normal(128, 50, size=(h, w, 3))
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):  # shapes make every picture unique
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, min(w, h) / 3)
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x - r, y - r, x + r, y + r], fill=fill)
    return image


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i in range(N_IMAGES):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        synthetic_picture(i).save(sub / f"pic{i:02d}.{'png' if i % 3 else 'jpg'}")
    return folder


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bench(image_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("bench") / "bench"
    summary = make_benchmark(image_folder, output, references=10, queries_per_ref=2, negative_fraction=0.5, seed=0)
    return output, summary


def test_layout_and_counts(bench):
    output, summary = bench
    queries = sorted(p.stem for p in (output / "queries").glob("*.jpg"))
    references = sorted(p.stem for p in (output / "references").glob("*.jpg"))
    train = sorted(p.stem for p in (output / "train").glob("*.jpg"))
    assert queries == [f"Q{i:05d}" for i in range(40)]  # 10 refs x 2 + 10 negative sources x 2
    n_rest = N_IMAGES - 20
    assert references == [f"R{i:06d}" for i in range(10 + (n_rest + 1) // 2)]
    assert train == [f"T{i:06d}" for i in range(n_rest // 2)]
    assert (summary.queries, summary.positive_queries, summary.negative_queries) == (40, 20, 20)
    assert (summary.references, summary.distractors, summary.train) == (len(references), len(references) - 10, len(train))
    assert summary.skipped == []
    recorded = json.loads((output / "benchmark.json").read_text())
    assert recorded["settings"]["seed"] == 0 and recorded["queries"] == 40
    assert not any(p.name.startswith(".") for p in output.parent.iterdir())  # no staging folder left


def test_ground_truth_is_consistent_with_files(bench):
    output, _ = bench
    gt = read_csv(output / "ground_truth.csv")
    queries = {p.stem for p in (output / "queries").glob("*.jpg")}
    references = {p.stem for p in (output / "references").glob("*.jpg")}
    assert [r["query_id"] for r in gt] == sorted(queries)  # one row per query, in id order
    matched = [r for r in gt if r["reference_id"]]
    assert len(matched) == 20 and all(r["reference_id"] in references for r in matched)
    # every copied reference has queries_per_ref queries
    assert set(np.unique([r["reference_id"] for r in matched], return_counts=True)[1]) == {2}

    sources = {r["image_id"]: r for r in read_csv(output / "sources.csv")}
    assert set(sources) == queries | references | {p.stem for p in (output / "train").glob("*.jpg")}
    reference_paths = {s["path"] for s in sources.values() if s["role"] in ("reference", "distractor")}
    train_paths = {s["path"] for s in sources.values() if s["role"] == "train"}
    assert not reference_paths & train_paths
    for row in gt:
        source = sources[row["query_id"]]
        if row["reference_id"]:
            assert source["role"] == "query"
            assert sources[row["reference_id"]]["path"] == source["path"]
        else:
            assert source["role"] == "negative_query"
            assert source["path"] not in reference_paths | train_paths  # negatives copy no reference


def jpeg_q85(image: Image.Image) -> bytes:
    encoded = io.BytesIO()
    image.save(encoded, "JPEG", quality=85, optimize=False, progressive=False, subsampling="4:2:0")
    return encoded.getvalue()


def test_reference_and_train_files_are_their_source_images(bench, image_folder):
    output, _ = bench
    folders = {"reference": "references", "distractor": "references", "train": "train"}
    rows = [r for r in read_csv(output / "sources.csv") if r["role"] in folders]
    assert len(rows) == len(list((output / "references").glob("*.jpg"))) + len(list((output / "train").glob("*.jpg")))
    for row in rows:
        original = Image.open(image_folder / row["path"]).convert("RGB")  # small inputs: no resize
        written = (output / folders[row["role"]] / f"{row['image_id']}.jpg").read_bytes()
        assert written == jpeg_q85(original)


def test_edits_are_recorded_and_replayable(bench, image_folder):
    output, _ = bench
    edits = read_csv(output / "edits.csv")
    recipe = RECIPES["default"]
    assert [r["query_id"] for r in edits] == sorted(r["query_id"] for r in edits) and len(edits) == 40
    for row in edits:
        ops = json.loads(row["ops"])
        names = [o["op"] for o in ops]
        assert row["recipe"] == "+".join(names)
        assert recipe.min_ops <= len(ops) <= recipe.max_ops and set(names) <= set(recipe.ops)
        assert [OPS[n].stage for n in names] == sorted(OPS[n].stage for n in names)
        assert len({OPS[n].family for n in names if OPS[n].family}) == len([n for n in names if OPS[n].family])
    # a query is its source, replayed through the recorded edits, fitted to <= 384 px, saved as JPEG q85
    sources = {r["image_id"]: r for r in read_csv(output / "sources.csv")}
    negatives = {s["path"]: image_folder / s["path"] for s in sources.values() if s["role"] == "negative_query"}
    for row in edits[:8]:
        source = Image.open(image_folder / sources[row["query_id"]]["path"]).convert("RGB")
        redone = replay(source, json.loads(row["ops"]), Backdrops(negatives))
        scale = min(1.0, 384 / min(redone.size))
        if scale < 1:
            redone = redone.resize((round(redone.width * scale), round(redone.height * scale)),
                                   Image.Resampling.LANCZOS)
        assert (output / "queries" / f"{row['query_id']}.jpg").read_bytes() == jpeg_q85(redone)


@pytest.mark.parametrize("name", sorted(OPS))
def test_each_op_runs_alone_and_replays(name, image_folder):
    source = synthetic_picture(7)
    backdrops = Backdrops({"backdrop.png": next(image_folder.rglob("*.png"))})
    rng = np.random.default_rng(11)
    out, records = edit(source, [name], rng, backdrops)
    assert out.mode == "RGB" and min(out.size) >= 16
    assert [r["op"] for r in records] == [name]
    assert json.loads(json.dumps(records)) == records  # parameters are plain JSON
    if out.size == source.size:
        assert not np.array_equal(np.asarray(out), np.asarray(source))
    np.testing.assert_array_equal(np.asarray(replay(source, records, backdrops)), np.asarray(out))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipes_draw_their_own_ops(recipe):
    source = synthetic_picture(3)
    for seed in range(4):
        _, records = random_edit(source, np.random.default_rng(seed), recipe)
        names = [r["op"] for r in records]
        assert set(names) <= set(RECIPES[recipe].ops)
        assert "overlay_onto_background" not in names  # no backdrops given
        assert RECIPES[recipe].min_ops <= len(names) <= RECIPES[recipe].max_ops


def test_same_seed_gives_identical_files_and_another_seed_differs(bench, image_folder, tmp_path):
    output, _ = bench
    make_benchmark(image_folder, tmp_path / "again", references=10, seed=0)
    assert file_bytes(tmp_path / "again") == file_bytes(output)
    make_benchmark(image_folder, tmp_path / "other", references=10, seed=1)
    other = file_bytes(tmp_path / "other")
    assert set(other) == set(file_bytes(output))
    assert other["ground_truth.csv"] != file_bytes(output)["ground_truth.csv"]
    assert other["queries/Q00000.jpg"] != file_bytes(output)["queries/Q00000.jpg"]


def test_bad_inputs_are_skipped_and_reported(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        synthetic_picture(100 + i).save(images / f"ok{i}.png")
    (images / "broken.jpg").write_bytes(b"this is not a JPEG")
    Image.new("RGB", (20, 20), "red").save(images / "tiny.png")
    shutil.copy(images / "ok0.png", images / "ok0_copy.png")
    summary = make_benchmark(images, tmp_path / "bench", references=2, queries_per_ref=1,
                             negative_fraction=0.5, recipe="mild", seed=5)
    skipped = {Path(p).name: reason for p, reason in summary.skipped}
    assert set(skipped) == {"broken.jpg", "tiny.png", "ok0_copy.png"} or \
        set(skipped) == {"broken.jpg", "tiny.png", "ok0.png"}  # whichever of the pair comes second
    assert "unreadable" in skipped["broken.jpg"] and "too small" in skipped["tiny.png"]
    assert summary.queries == 4 and summary.references + summary.train == 8 - 2
    recorded = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert len(recorded["skipped"]) == 3


def test_explicit_distractor_and_background_folders(tmp_path, image_folder):
    extra = {}
    for role, offset in (("distractors", 200), ("background", 300)):
        extra[role] = tmp_path / role
        extra[role].mkdir()
        for i in range(3):
            synthetic_picture(offset + i).save(extra[role] / f"{role}{i}.png")
    summary = make_benchmark(image_folder, tmp_path / "bench", references=4, queries_per_ref=1,
                             negative_fraction=0.2, distractors=extra["distractors"],
                             background=extra["background"], recipe="hard", seed=2)
    assert (summary.positive_sources, summary.negative_sources) == (4, 1)
    assert (summary.references, summary.distractors, summary.train) == (7, 3, 3)
    sources = read_csv(tmp_path / "bench" / "sources.csv")
    assert {s["path"] for s in sources if s["role"] == "distractor"} == {f"distractors{i}.png" for i in range(3)}
    assert {s["input"] for s in sources if s["role"] == "train"} == {"background"}
    assert summary.notes  # most of the images folder was not needed


def test_refuses_impossible_requests(tmp_path, image_folder):
    with pytest.raises(ValueError, match="usable images"):
        make_benchmark(image_folder, tmp_path / "b", references=40, negative_fraction=0.5)
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())  # nothing half-built left
    with pytest.raises(ValueError, match="recipe"):
        make_benchmark(image_folder, tmp_path / "b", references=2, recipe="nope")
    with pytest.raises(ValueError, match="negative_fraction"):
        make_benchmark(image_folder, tmp_path / "b", references=2, negative_fraction=1.0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_benchmark(image_folder, tmp_path / "full", references=2, overwrite=True)
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_cli_builds_a_benchmark(tmp_path, image_folder, capsys):
    import argparse

    from rdcd.commands import make_benchmark as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["make-benchmark", "--images", str(image_folder), "--output", str(tmp_path / "b"),
                              "--references", "3", "--queries-per-ref", "1", "--negative-fraction", "0",
                              "--recipe", "mild", "--seed", "4"])
    assert args.func(args) == 0
    gt = read_csv(tmp_path / "b" / "ground_truth.csv")
    assert len(gt) == 3 and all(r["reference_id"] for r in gt)
    assert "3 queries" in capsys.readouterr().err


def test_cli_refuses_to_overwrite_without_flag(tmp_path, image_folder, capsys):
    import argparse

    from rdcd.commands import make_benchmark as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    argv = ["make-benchmark", "--images", str(image_folder), "--output", str(tmp_path / "b"),
            "--references", "2", "--queries-per-ref", "1", "--negative-fraction", "0", "--recipe", "mild"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    first = file_bytes(tmp_path / "b")
    assert args.func(args) == 1 and "--overwrite" in capsys.readouterr().err
    args = parser.parse_args(argv + ["--overwrite", "--seed", "9"])
    assert args.func(args) == 0
    assert file_bytes(tmp_path / "b") != first

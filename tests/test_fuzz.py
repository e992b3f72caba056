"""Property tests: the readers of user files fed random and mutated input raise only rdcd's own,
documented errors (ValueError / FileNotFoundError naming the file, ImageLoadError, ModelNotAvailable),
never a crash from a library underneath. Sizes: see EXAMPLES, counted in docs/reliability.md."""
import io
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import picture
from rdcd.descriptors import read_descriptors, write_descriptors
from rdcd.images import ImageLoadError, open_image
from rdcd.metrics import read_ground_truth, read_predictions
from rdcd.models import ModelNotAvailable, load_model

#: examples per property; docs/reliability.md adds them up
EXAMPLES = 150
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    """``data`` with bytes overwritten at (position, value) pairs, then cut to ``cut`` bytes."""
    out = bytearray(data)
    for position, value in edits:
        if out:
            out[position % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=12)
cuts = st.none() | st.integers(0, 4096)


# --------------------------------------------------------------------------------------------- CSV

csv_cells = st.text(alphabet=st.sampled_from(list("QR0123456789.,-e\"\r\n \t\ufeffé\x00;inf")), max_size=12)
csv_text = st.one_of(
    st.binary(max_size=300),
    st.lists(st.lists(csv_cells, max_size=4), max_size=8).map(
        lambda rows: "\n".join(",".join(r) for r in rows).encode("utf-8", "surrogatepass")),
    st.tuples(st.sampled_from(["query_id,reference_id,score", "\ufeffquery_id,reference_id", "query_id,reference_id"]),
              st.lists(st.lists(csv_cells, max_size=4), max_size=8)).map(
        lambda h: (h[0] + "\r\n" + "\r\n".join(",".join(r) for r in h[1])).encode()),
)


@FUZZ
@given(data=csv_text)
def test_csv_readers_raise_only_value_errors_naming_the_file(tmp_path, data):
    path = tmp_path / "input.csv"
    path.write_bytes(data)
    for reader in (read_predictions, read_ground_truth):
        try:
            reader(path)
        except ValueError as e:
            assert str(path) in str(e)


# ------------------------------------------------------------------------------------- descriptors

def _valid_descriptor_bytes(suffix: str) -> tuple[bytes, bytes]:
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_descriptors(folder / f"d{suffix}", ["a", "b", "c"], np.eye(3, 4, dtype=np.float32))
        ids = (folder / "d.ids.txt").read_bytes() if suffix == ".npy" else b""
        return (folder / f"d{suffix}").read_bytes(), ids


VALID = {s: _valid_descriptor_bytes(s) for s in (".h5", ".npy")}


@FUZZ
@given(suffix=st.sampled_from([".h5", ".npy"]), random=st.none() | st.binary(max_size=400), edits=edits, cut=cuts,
       ids=st.none() | st.binary(max_size=40))
def test_descriptor_reader_raises_only_documented_errors(tmp_path, suffix, random, edits, cut, ids):
    folder = tmp_path
    path = folder / f"d{suffix}"
    data, valid_ids = VALID[suffix]
    path.write_bytes(random if random is not None else mutate(data, edits, cut))
    if suffix == ".npy":
        (folder / "d.ids.txt").write_bytes(ids if ids is not None else valid_ids)
    try:
        names, vectors = read_descriptors(path)
    except (ValueError, FileNotFoundError) as e:
        assert str(path) in str(e)
    else:
        assert vectors.ndim == 2 and len(names) == len(vectors) and vectors.dtype == np.float32


@FUZZ
@given(names=st.one_of(st.lists(st.binary(max_size=8), min_size=1, max_size=4),
                       st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=4)),
       shape=st.tuples(st.integers(0, 5), st.integers(0, 3)))
def test_descriptor_reader_on_odd_hdf5_layouts(tmp_path, names, shape):
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("vectors", data=np.zeros(shape, np.float32))
        f.create_dataset("image_names", data=np.array(names))
    try:
        ids, vectors = read_descriptors(path)
    except ValueError as e:
        assert str(path) in str(e)
    else:
        assert len(ids) == len(vectors) == shape[0]


# ------------------------------------------------------------------------------------ model specs

model_specs = st.one_of(
    st.text(max_size=30),
    st.text(max_size=20).map(lambda s: "student:" + s),
    st.sampled_from(["sscd", "phash", "pdq", "rdcd-default"]).flatmap(lambda n: st.text(max_size=4).map(lambda s: n + s)),
)


@FUZZ
@given(spec=model_specs)
def test_model_specs_raise_only_documented_errors(spec):
    try:
        load_model(spec)
    except (FileNotFoundError, ValueError, ModelNotAvailable):
        pass


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.sampled_from([".onnx", ".pt", ".pth", ".torchscript.pt"]), data=st.binary(max_size=300),
       zipped=st.booleans())
def test_model_files_with_random_contents_raise_only_documented_errors(tmp_path, suffix, data, zipped):
    import zipfile

    path = tmp_path / f"model{suffix}"
    if zipped:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", data)
    else:
        path.write_bytes(data)
    with pytest.raises((ValueError, ModelNotAvailable)) as e:
        load_model(path)
    assert str(path) in str(e.value)


# ------------------------------------------------------------------------------------------ images

def _image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    im = picture(7, (64, 48))
    im.save(buf, fmt, **({"save_all": True, "append_images": [picture(8, (64, 48))]} if fmt == "GIF" else {}))
    return buf.getvalue()


IMAGES = {fmt: _image_bytes(fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")}


@FUZZ
@given(fmt=st.sampled_from(sorted(IMAGES)), random=st.none() | st.binary(max_size=600), edits=edits, cut=cuts,
       draft=st.booleans())
def test_image_loader_raises_only_image_load_errors(tmp_path, fmt, random, edits, cut, draft):
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(random if random is not None else mutate(IMAGES[fmt], edits, cut))
    try:
        im = open_image(path, max_pixels=4_000_000, draft_size=32 if draft else None)
    except ImageLoadError as e:
        assert e.path == str(path) and e.reason
    else:
        assert im.mode == "RGB" and im.size[0] * im.size[1] <= 4_000_000


def test_fuzz_inputs_are_what_the_docs_count():
    """docs/reliability.md reports 5 x EXAMPLES + 40 fuzzed inputs; keep the two in step."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    assert f"{5 * EXAMPLES + 40} fuzzed inputs" in text
    assert os.path.basename(__file__) in text

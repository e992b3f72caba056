import io

import imagehash
import numpy as np
import pdqhash
import pytest
from PIL import Image

from rdcd.models.base import DescriptorModel
from rdcd.models.hashes import PDQModel, PHashModel, bits_to_descriptors, hamming_similarity

SIZE = 256


def smooth_picture(seed: int) -> np.ndarray:
    """A photo-like picture: low-frequency colour field plus a few shapes and mild grain."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(6, 6, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.Resampling.BICUBIC), dtype=np.float64)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for _ in range(4):
        cx, cy, r = rng.uniform(30, SIZE - 30), rng.uniform(30, SIZE - 30), rng.uniform(12, 50)
        field[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, size=3)
    field += rng.normal(0, 4, size=field.shape)
    return np.clip(field, 0, 255).astype(np.uint8)


def jpeg_and_resize(image: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).resize((200, 200), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=60)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))


MODELS = [PHashModel, PDQModel]


@pytest.fixture(scope="module")
def pictures():
    return np.stack([smooth_picture(seed) for seed in range(6)])


@pytest.mark.parametrize("model_cls, dim", [(PHashModel, 64), (PDQModel, 256)])
def test_model_interface(model_cls, dim, pictures):
    model = model_cls()
    assert isinstance(model, DescriptorModel)
    assert model.dim == dim and model.input_size == 256
    out = model.embed(pictures)
    assert out.shape == (len(pictures), dim) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    assert model.embed(pictures[:0]).shape == (0, dim)


@pytest.mark.parametrize("model_cls", MODELS)
def test_identical_images_score_one(model_cls, pictures):
    a = model_cls().embed(pictures[:1])
    b = model_cls().embed(pictures[:1].copy())
    assert float(a[0] @ b[0]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("model_cls", MODELS)
def test_mild_edit_scores_high_and_unrelated_low(model_cls, pictures):
    model = model_cls()
    originals = model.embed(pictures)
    edited = model.embed(np.stack([jpeg_and_resize(p) for p in pictures]))
    copies = np.sum(originals * edited, axis=1)
    assert copies.min() > 0.75  # at most 12.5 % of the bits flip under JPEG q60 + resize
    scores = originals @ originals.T
    unrelated = scores[~np.eye(len(pictures), dtype=bool)]
    assert unrelated.max() < 0.6 and abs(unrelated.mean()) < 0.3
    # every edited copy ranks its own original first
    assert np.array_equal(np.argmax(edited @ originals.T, axis=1), np.arange(len(pictures)))


def direct_bits(model_cls, image: np.ndarray) -> np.ndarray:
    if model_cls is PHashModel:
        return imagehash.phash(Image.fromarray(image)).hash.reshape(-1).astype(int)
    return np.asarray(pdqhash.compute(image)[0], dtype=int)


@pytest.mark.parametrize("model_cls", MODELS)
def test_inner_product_is_affine_in_hamming_distance(model_cls, pictures):
    model = model_cls()
    vectors = model.embed(pictures)
    bits = [direct_bits(model_cls, p) for p in pictures]
    nbits = model.dim
    for i in range(len(pictures)):
        for j in range(len(pictures)):
            hamming = int(np.count_nonzero(bits[i] != bits[j]))
            assert float(vectors[i] @ vectors[j]) == pytest.approx(1 - 2 * hamming / nbits, abs=1e-6)
            assert float(hamming_similarity(vectors[i:i + 1], vectors[j:j + 1])[0, 0]) == pytest.approx(
                1 - hamming / nbits, abs=1e-6)


def test_bits_to_descriptors_values():
    out = bits_to_descriptors(np.array([[1, 0, 0, 1]]))
    np.testing.assert_allclose(out, [[0.5, -0.5, -0.5, 0.5]])
    with pytest.raises(ValueError):
        bits_to_descriptors(np.array([1, 0]))


def test_embed_rejects_wrong_layout(pictures):
    with pytest.raises(ValueError, match="uint8"):
        PHashModel().embed(pictures.astype(np.float32))

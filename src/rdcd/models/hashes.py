"""Perceptual-hash baselines (pHash, PDQ) behind the :class:`DescriptorModel` interface.

A hash is a bit vector b in {0, 1}^n. It is embedded as the unit vector v = (2b - 1) / sqrt(n), so
the inner product of two embedded hashes is

    v1 . v2 = 1 - 2 * hamming(b1, b2) / n,

an increasing affine map of the usual similarity 1 - hamming / n. Inner-product search (FAISS),
per-query ranking, uAP, accuracy@1 and score normalisation therefore behave exactly as with
Hamming distance; only the threshold values differ, and :func:`hamming_similarity` converts them.
"""
from __future__ import annotations

import imagehash
import numpy as np
import pdqhash
from PIL import Image

from rdcd.models.base import DescriptorModel

__all__ = ["PHashModel", "PDQModel", "bits_to_descriptors", "hamming_similarity"]


def bits_to_descriptors(bits: np.ndarray) -> np.ndarray:
    """Map hash bits (n, nbits) in {0, 1} to unit vectors (2b - 1) / sqrt(nbits), float32."""
    bits = np.asarray(bits)
    if bits.ndim != 2:
        raise ValueError(f"expected hash bits of shape (n, nbits), got {bits.shape}")
    return ((2.0 * bits - 1.0) / np.sqrt(bits.shape[1])).astype(np.float32)


def hamming_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise 1 - hamming / nbits between hash descriptors a (n, nbits) and b (m, nbits).

    Works on the outputs of :class:`PHashModel` / :class:`PDQModel` (equal to (1 + a @ b.T) / 2);
    the same formula turns a score threshold t into the Hamming threshold nbits * (1 - t) / 2.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return ((1.0 + a @ b.T) / 2.0).astype(np.float32)


class _HashModel(DescriptorModel):
    """Shared batching: hash each image of the batch, then embed the bit vectors."""

    def _bits(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def embed(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images of shape (n, H, W, 3), got {images.dtype} {images.shape}")
        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return bits_to_descriptors(np.stack([self._bits(image) for image in images]))


class PHashModel(_HashModel):
    """64-bit DCT perceptual hash (``imagehash.phash``, hash_size 8) as a 64-d unit vector.

    The extractor resizes every image to ``input_size`` x ``input_size`` (256) before ``embed``;
    pHash then reduces it to 32 x 32 greyscale itself, so the square resize loses nothing it uses.
    Scores are 1 - 2 * hamming / 64, an affine map of 1 - normalised Hamming distance.
    """

    name = "phash"
    dim = 64
    input_size = 256

    def _bits(self, image: np.ndarray) -> np.ndarray:
        return imagehash.phash(Image.fromarray(image), hash_size=8).hash.reshape(-1)


class PDQModel(_HashModel):
    """Meta's 256-bit PDQ hash (``pdqhash`` package) as a 256-d unit vector.

    The extractor resizes every image to ``input_size`` x ``input_size`` (256) before ``embed``;
    PDQ downsamples to 64 x 64 internally, and 256 px keeps its Jarosz filters well above that.
    PDQ's quality score (low for flat images) is not used. Scores are 1 - 2 * hamming / 256, an
    affine map of 1 - normalised Hamming distance.
    """

    name = "pdq"
    dim = 256
    input_size = 256

    def _bits(self, image: np.ndarray) -> np.ndarray:
        bits, _quality = pdqhash.compute(np.ascontiguousarray(image))
        return bits

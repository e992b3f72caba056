"""The one interface every descriptor model implements.

A model takes a batch of decoded images as a uint8 array (n, H, W, 3), RGB, all of one size, and
returns float32 descriptors (n, dim), L2-normalised. Preprocessing beyond resizing (float
conversion, normalisation, layout) is the model's own business, so ONNX graphs that take raw
uint8 and PyTorch networks that take normalised NCHW floats look the same from outside.
"""
from __future__ import annotations

import abc

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DescriptorModel(abc.ABC):
    """Base class: ``embed(uint8 NHWC batch) -> float32 (n, dim)`` unit vectors."""

    #: short name shown in logs and benchmark tables
    name: str = "model"
    #: descriptor dimension
    dim: int
    #: preferred square input size in pixels (images are resized to input_size x input_size)
    input_size: int = 288
    #: whether embedding runs PyTorch (then ``rdcd.export.choose_runtime`` may convert it); others run as they are
    runs_torch: bool = False

    @abc.abstractmethod
    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embed a batch of images given as uint8 (n, H, W, 3) RGB; returns float32 (n, dim)."""

    def describe(self) -> str:
        return f"{self.name} (dim {self.dim}, input {self.input_size}px)"

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"<{type(self).__name__} {self.describe()}>"


def as_matrix(vectors: np.ndarray, dim: int | None = None, what: str = "vectors") -> np.ndarray:
    """``vectors`` as a C-contiguous float32 (n, dim) array (what FAISS needs), or a ValueError naming ``what``."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        expected = f"(n, {dim})" if dim is not None else "(n, d)"
        raise ValueError(f"{what} must have shape {expected}; got {x.shape}")
    return x


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)

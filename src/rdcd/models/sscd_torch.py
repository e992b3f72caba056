"""PyTorch descriptor models loaded from files: SSCD TorchScript and SSCD torchvision state dicts
(ONNX files: ``rdcd.models.onnx``).

SSCD's released checkpoints (MIT) come in two forms, both supported here:
- ``*.torchscript.pt``: a TorchScript module taking ImageNet-normalised float NCHW, returning
  L2-normalised descriptors.
- ``*.torchvision.pt``: a state dict of ``torchvision.models.resnet50(num_classes=512)`` whose
  average pooling is replaced by GeM (p=3); the descriptor is the L2-normalised fc output.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .base import IMAGENET_MEAN, IMAGENET_STD
from .student import GeM, TorchImageModel


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

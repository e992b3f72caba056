"""A PyTorch descriptor model -> one deployable file: ONNX (fp32, fp16, int8) or TorchScript.

ONNX files follow one convention, so any ONNX Runtime user (C++, C#, Java, JS...) can run them
without knowing the model (see docs/export.md):

    input  ``image``      uint8 (n, H, W, 3), RGB, 0-255, resized to input_size x input_size
    output ``embedding``  float32 (n, dim), L2-normalised: the copy-detection descriptor

Normalisation (mean/std), the layout change and the final L2 norm are inside the graph. Batch size
and image size are dynamic. The graph's metadata says ``rdcd.input_size``, ``rdcd.mean``,
``rdcd.std``, ``rdcd.name``, ``rdcd.dim``, ``rdcd.input_convention``, ``rdcd.precision``, the
source model's config (``rdcd.config``) and how it was exported (``rdcd.export``).

TorchScript files take ImageNet-style normalised float NCHW, as SSCD's released ``.torchscript.pt``
files do, and return L2-normalised descriptors; the same metadata is stored as the extra file
``rdcd.json`` so ``TorchScriptModel`` knows the input size and normalisation.

Precisions (ONNX only; TorchScript is fp32): ``fp16`` stores weights and computes in fp16
(onnxconverter-common; inputs and outputs stay uint8/float32); ``int8`` is ONNX Runtime static
quantisation calibrated on a folder of the user's images, decoded and resized as at inference.
Every file is written atomically: an interrupted export leaves no partial file behind.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .descriptors import atomic_path
from .images import ImageLoadError, list_images, load_image_array
from .models import DescriptorModel, load_model
from .models.student import StudentModel, TorchImageModel

FORMATS = ("onnx", "torchscript")
PRECISIONS = ("fp32", "fp16", "int8")
QUANT_FORMATS = ("qdq", "qoperator")
INPUT_NAME, OUTPUT_NAME = "image", "embedding"
GRAPH_REVISION = 2  # bump when the exported graph changes, so cached exports are rebuilt (2: SAME_UPPER convs)
ONNX_INPUT_CONVENTION = ("uint8 RGB NHWC (n, H, W, 3), values 0-255, each image resized to "
                         "input_size x input_size (bilinear, aspect not kept); normalisation inside the graph")
TORCHSCRIPT_INPUT_CONVENTION = "float32 NCHW (n, 3, H, W), RGB scaled to 0-1 then (x - mean) / std"
TORCHSCRIPT_METADATA = "rdcd.json"  # extra file inside a TorchScript archive


@dataclass
class ExportConfig:
    """How a model is exported. Defaults: ONNX fp32, opset 17; int8 calibrated on 128 images."""

    format: str = "onnx"
    precision: str = "fp32"
    opset: int = 17
    calibration: str | None = None  # image folder / file list, needed for int8
    calibration_size: int = 128  # images used for int8 calibration
    quant_format: str = "qdq"  # int8 graph form, same descriptors; QDQ faster at the students' 160 px, mixed at 224-288
    per_channel: bool = True  # int8 weight scales per output channel (better accuracy, same speed)
    float_layers: int = 3  # int8: the first N weighted layers stay fp32 (most of the error, little of the time)
    weight_bits: int = 7  # int8 weights in 7 bits (ORT reduce_range: no u8 x s8 saturation without VNNI) or 8
    input_size: int | None = None  # written to the metadata and used for calibration; default: the model's
    same_upper: bool = True  # timm's dynamic "same" padding as Conv(auto_pad=SAME_UPPER), not Pad + Conv

    def check(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown export format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.format == "torchscript" and self.precision != "fp32":
            raise ValueError(f"TorchScript export is fp32 only; use --format onnx for {self.precision}")
        if self.precision == "int8" and not self.calibration:
            raise ValueError("int8 export needs calibration images: --calibration DIR, a folder of images like "
                             "those you will embed (100-500 are enough)")
        if self.quant_format not in QUANT_FORMATS:
            raise ValueError(f"unknown quantisation format {self.quant_format!r}; choose one of {QUANT_FORMATS}")
        if self.weight_bits not in (7, 8):
            raise ValueError(f"weight_bits must be 7 or 8, got {self.weight_bits}")
        if self.float_layers < 0:
            raise ValueError(f"float_layers must be >= 0, got {self.float_layers}")


@dataclass
class SourceModel:
    """What an export needs from a PyTorch descriptor model."""

    network: nn.Module  # normalised float NCHW -> (n, dim)
    name: str
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    config: dict


def source_model(model: str | os.PathLike | DescriptorModel) -> SourceModel:
    """The PyTorch network behind ``model`` (a name, a student spec, a model file or a loaded model)."""
    loaded = model if isinstance(model, DescriptorModel) else load_model(model)
    if not isinstance(loaded, TorchImageModel):
        raise ValueError(f"{loaded.name}: only PyTorch models can be exported (rdcd students, SSCD "
                         f".torchvision.pt / .torchscript.pt); this one is a {type(loaded).__name__}")
    network = copy.deepcopy(loaded.module).cpu().float().eval().to(memory_format=torch.contiguous_format)
    if isinstance(loaded, StudentModel):
        config = dataclasses.asdict(loaded.net.config)
    else:
        config = {"type": type(loaded).__name__, "name": loaded.name}
    return SourceModel(network, loaded.name, loaded.dim, loaded.input_size, tuple(loaded.mean), tuple(loaded.std),
                       config)


class UInt8Pipeline(nn.Module):
    """uint8 RGB NHWC -> float NCHW -> (x - 255 mean) / (255 std) -> network -> L2 norm."""

    def __init__(self, network: nn.Module, mean, std):
        super().__init__()
        self.network = network
        # the same arithmetic as TorchImageModel.to_input, so exports match PyTorch to fp32 rounding
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # transpose the uint8 pixels, then widen: a quarter of the bytes to move (same values)
        x = (image.permute(0, 3, 1, 2).float() - self.mean) / self.std
        return F.normalize(self.network(x).float(), dim=1)


class NormalizedOutput(nn.Module):
    """network -> L2 norm, for TorchScript files that take normalised float NCHW."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.network(x).float(), dim=1)


def metadata(src: SourceModel, cfg: ExportConfig, input_convention: str) -> dict[str, str]:
    from . import __version__

    name = src.name if cfg.precision == "fp32" else f"{src.name}-{cfg.precision}"
    return {
        "rdcd.name": name,
        "rdcd.dim": str(src.dim),
        "rdcd.input_size": str(cfg.input_size or src.input_size),
        "rdcd.mean": json.dumps(list(src.mean)),
        "rdcd.std": json.dumps(list(src.std)),
        "rdcd.input_convention": input_convention,
        "rdcd.precision": cfg.precision,
        "rdcd.config": json.dumps(src.config),
        "rdcd.export": json.dumps(dataclasses.asdict(cfg), default=str),
        "rdcd.version": __version__,
    }


def export(model: str | os.PathLike | DescriptorModel, output: str | os.PathLike,
           config: ExportConfig | None = None, **overrides) -> Path:
    """Export ``model`` to ``output`` (format and precision from ``config`` or keyword overrides of
    ExportConfig's fields, e.g. ``export("student:tf_efficientnet_lite0:128", "m.onnx", precision="int8",
    calibration="images/")``). Returns the path written."""
    cfg = dataclasses.replace(config or ExportConfig(), **overrides)
    cfg.check()
    src = source_model(model)
    if cfg.format == "torchscript":
        return export_torchscript(src, output, cfg)
    return export_onnx(src, output, cfg)


# --- ONNX -------------------------------------------------------------------------------------------

def export_onnx(src: SourceModel, output: str | os.PathLike, cfg: ExportConfig) -> Path:
    import onnx

    output = Path(output)
    with tempfile.TemporaryDirectory(prefix="rdcd-export-") as work:
        fp32 = Path(work) / "fp32.onnx"
        trace_onnx(src, fp32, cfg.opset, cfg.same_upper)
        if cfg.precision == "int8":
            graph = quantize_int8(fp32, Path(work) / "int8.onnx", cfg, cfg.input_size or src.input_size)
        else:
            graph = onnx.load(str(fp32))
            if cfg.precision == "fp16":
                graph = to_fp16(graph)
        set_metadata(graph, metadata(src, cfg, ONNX_INPUT_CONVENTION))
        onnx.checker.check_model(graph)
        with atomic_path(output, ".onnx") as tmp:
            onnx.save(graph, str(tmp))
    return output


@torch.library.custom_op("rdcd::conv2d_same_upper", mutates_args=())
def conv2d_same_upper(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: list[int],
                      dilation: list[int], groups: int) -> torch.Tensor:
    """timm's TensorFlow-style "same" convolution (pad by an amount computed from the input size,
    the extra pixel at the end, then convolve), as an op that exports to ONE ONNX ``Conv`` with
    ``auto_pad="SAME_UPPER"``: the same padding rule, applied inside ONNX Runtime's convolution
    kernel. Traced as timm writes it, it becomes shape arithmetic + a ``Pad`` of the whole activation
    + a ``Conv``; at 288 px that ``Pad``, the layout changes around it and (int8) the
    dequantise/quantise pairs it needs took 29 % (fp32) and 42 % (int8) of the shipped student's
    time (scripts/profile_onnx.py, docs/export.md)."""
    from timm.layers.conv2d_same import conv2d_same

    return conv2d_same(x, weight, bias, tuple(stride), (0, 0), tuple(dilation), groups)


def _conv2d_same_upper_onnx(g, x, weight, bias, stride, dilation, groups):
    from torch.onnx import symbolic_helper

    kernel = symbolic_helper._get_tensor_sizes(weight)[2:]
    return g.op("Conv", x, weight, bias, kernel_shape_i=kernel, strides_i=stride, dilations_i=dilation,
                group_i=groups, auto_pad_s="SAME_UPPER")


def _register_onnx_symbolics() -> None:
    from torch.onnx import register_custom_op_symbolic, symbolic_helper

    symbolic = symbolic_helper.parse_args("v", "v", "v", "is", "is", "i")(_conv2d_same_upper_onnx)
    register_custom_op_symbolic("rdcd::conv2d_same_upper", symbolic, 9)


class SameUpperConv(nn.Module):
    """Export-time stand-in for timm's ``Conv2dSame``: same weights, same outputs (conv2d_same_upper)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight = conv.weight
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, dtype=conv.weight.dtype)
        self.register_buffer("bias", bias.detach().clone())
        self.stride, self.dilation, self.groups = list(conv.stride), list(conv.dilation), conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d_same_upper(x, self.weight, self.bias, self.stride, self.dilation, self.groups)


def fuse_same_padding(network: nn.Module) -> int:
    """Replace every timm ``Conv2dSame`` in ``network`` (in place) by ``SameUpperConv``; returns how many.
    Dilated ones stay as they are: ONNX Runtime refuses auto_pad with dilation."""
    from timm.layers.conv2d_same import Conv2dSame

    targets = [(name, m) for name, m in network.named_modules()
               if isinstance(m, Conv2dSame) and all(d == 1 for d in m.dilation)]
    for name, conv in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(network.get_submodule(parent_name) if parent_name else network, child, SameUpperConv(conv))
    return len(targets)


def trace_onnx(src: SourceModel, path: Path, opset: int, same_upper: bool = True) -> None:
    """The uint8 pipeline as an fp32 ONNX graph with dynamic batch, height and width. With
    ``same_upper`` (the default), timm's dynamic "same" padding becomes ``Conv(auto_pad=SAME_UPPER)``."""
    network = src.network
    if same_upper:
        network = copy.deepcopy(network)
        if fuse_same_padding(network):
            _register_onnx_symbolics()
    pipeline = UInt8Pipeline(network, src.mean, src.std).eval()
    example = torch.zeros(2, src.input_size, src.input_size, 3, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(pipeline, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch", 1: "height", 2: "width"},
                                        OUTPUT_NAME: {0: "batch"}})


def set_metadata(graph, values: dict[str, str]) -> None:
    kept = [p for p in graph.metadata_props if p.key not in values]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    for key, value in values.items():
        graph.metadata_props.add(key=key, value=value)


def to_fp16(graph):
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise RuntimeError("fp16 export needs onnxconverter-common: pip install onnxconverter-common") from None
    from onnx import TensorProto

    # keep_io_types: the uint8 input and the float32 output stay as they are
    graph = float16.convert_float_to_float16(graph, keep_io_types=True)
    # the converter types the outputs of Casts to float as fp16 but leaves their target float32
    # (the uint8 input's Cast, and timm's "same"-padding shape arithmetic): make them cast to fp16
    # (exact for pixel values and for image sides up to 2048)
    fp16_values = {v.name for v in graph.graph.value_info if v.type.tensor_type.elem_type == TensorProto.FLOAT16}
    for node in graph.graph.node:
        if node.op_type == "Cast" and node.output[0] in fp16_values:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16
    return graph


def calibration_images(source: str | os.PathLike, size: int, count: int) -> np.ndarray:
    """Up to ``count`` images spread evenly over ``source``, decoded and resized as at inference.
    Files that cannot be decoded are skipped (and named)."""
    paths = list_images(source)
    picks = np.unique(np.linspace(0, len(paths) - 1, min(count, len(paths))).round().astype(int))
    images = []
    for i in picks:
        try:
            images.append(load_image_array(paths[i], size))
        except ImageLoadError as e:
            print(f"rdcd export: calibration skips {e}", file=sys.stderr)
    if not images:
        raise ValueError(f"{source}: none of the calibration images could be decoded")
    return np.stack(images)


#: ops quantised in int8 graphs: the weighted layers and the activations/residuals between them
INT8_OPS = ("Conv", "MatMul", "Gemm", "Clip", "Relu", "Add")


def int8_nodes(graph, float_layers: int = 0) -> list[str]:
    """Names of the nodes to quantise: INT8_OPS on the image's data path, from the first weighted
    layer after the first ``float_layers`` ones to the last. Left in float: the uint8 -> float
    normalisation, the first ``float_layers`` weighted layers and the activations between them, the
    final L2 norm, and the shape arithmetic of timm's dynamic "same" padding (quantising it breaks
    the graph).

    Why keep the first layers in float: on the 128-d students (160 px, 64 held-out pool images)
    quantising everything gave a mean cosine to fp32 of 0.972-0.974 (min 0.84); leaving the stem and
    first depthwise-separable block (3 weighted layers) in fp32 gave 0.995-0.996, at the same speed
    (docs/export.md, "Which layers stay fp32"; scripts/int8_layers.py)."""
    data, path = {INPUT_NAME}, []
    for node in graph.node:  # ONNX nodes are topologically sorted
        if node.op_type != "Shape" and any(i in data for i in node.input):
            data.update(node.output)
            path.append(node)
    weighted = [i for i, n in enumerate(path) if n.op_type in ("Conv", "MatMul", "Gemm")]
    if len(weighted) <= float_layers:
        raise ValueError(f"the graph has {len(weighted)} Conv/MatMul/Gemm layers, none left to quantise "
                         f"after keeping {float_layers} in float")
    return [n.name for n in path[weighted[float_layers]:weighted[-1] + 1] if n.op_type in INT8_OPS]


def quantize_int8(fp32: Path, output: Path, cfg: ExportConfig, size: int):
    """ONNX Runtime static int8 quantisation (MinMax calibration) of an fp32 uint8-pipeline graph.

    uint8 activations, int8 weights, per-channel by default, and 7-bit weights (reduce_range) unless
    ``weight_bits=8``: x86 CPUs without VNNI (AVX2 only, like the one this was measured on) can
    saturate the u8 x s8 products with 8-bit weights. With every layer quantised the 8-bit form was
    clearly further from fp32 there; with the first layers kept fp32 (the default) it depends on the
    model and the calibration set: closer for the shallow default model calibrated on 512 images,
    never closer for the full-depth one (docs/export.md, "7-bit or 8-bit weights").
    """
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    images = calibration_images(cfg.calibration, size, cfg.calibration_size)

    class Batches(CalibrationDataReader):
        def __init__(self, batch_size: int = 16):
            self.batches = iter([{INPUT_NAME: images[i:i + batch_size]} for i in range(0, len(images), batch_size)])

        def get_next(self):
            return next(self.batches, None)

    prepared = output.with_name("prepared.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(output), Batches(),
                    quant_format=QuantFormat.QOperator if cfg.quant_format == "qoperator" else QuantFormat.QDQ,
                    per_channel=cfg.per_channel, reduce_range=cfg.weight_bits == 7, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_quantize=int8_nodes(onnx.load(str(prepared)).graph, cfg.float_layers))
    return onnx.load(str(output))


# --- TorchScript ------------------------------------------------------------------------------------

def export_torchscript(src: SourceModel, output: str | os.PathLike, cfg: ExportConfig) -> Path:
    output = Path(output)
    size = cfg.input_size or src.input_size
    example = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic (checked by the tests)
        traced = torch.jit.trace(NormalizedOutput(src.network).eval(), example, check_trace=False)
    extra = {TORCHSCRIPT_METADATA: json.dumps(metadata(src, cfg, TORCHSCRIPT_INPUT_CONVENTION))}
    with atomic_path(output, ".pt") as tmp:
        torch.jit.save(traced, str(tmp), _extra_files=extra)
    return output


# --- ONNX Runtime as the fast CPU path for PyTorch students -------------------------------------

def cache_dir() -> Path:
    """Where rdcd keeps files it can rebuild: $RDCD_CACHE_DIR, else $XDG_CACHE_HOME/rdcd, else ~/.cache/rdcd."""
    if os.environ.get("RDCD_CACHE_DIR"):
        return Path(os.environ["RDCD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rdcd"


def weights_key(src: SourceModel, cfg: ExportConfig) -> str:
    """A hash of everything the exported graph depends on: weights, config, export settings, versions."""
    import hashlib

    from . import __version__

    h = hashlib.sha256(json.dumps([src.config, src.mean, src.std, src.input_size, dataclasses.asdict(cfg),
                                   __version__, GRAPH_REVISION, torch.__version__]).encode())
    for name, tensor in src.network.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def onnx_runtime_model(model: DescriptorModel, cache: str | os.PathLike | None = None,
                       threads: int | None = None) -> DescriptorModel:
    """``model`` (a PyTorch model) run by ONNX Runtime: exported to fp32 ONNX once, cached under
    ``cache`` (default ``cache_dir()/onnx``) by a hash of its weights, then loaded from there. The
    descriptors equal PyTorch's to fp32 rounding (cosine >= 0.9999, tested)."""
    from .models.onnx import OnnxModel

    src = source_model(model)
    cfg = ExportConfig()
    path = Path(cache or cache_dir() / "onnx") / f"{_file_safe(src.name)}-{weights_key(src, cfg)}.onnx"
    if not path.exists():
        export_onnx(src, path, cfg)
    return OnnxModel(path, name=model.name, input_size=model.input_size, threads=threads)


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "model"


RUNTIMES = ("auto", "torch", "onnxruntime")


def choose_runtime(model: DescriptorModel, runtime: str = "auto", from_file: bool = True,
                   threads: int | None = None) -> tuple[DescriptorModel, str]:
    """The model to run and a line saying how it runs.

    ``auto``: a PyTorch model loaded from a file and running on the CPU goes through ONNX Runtime
    (exported once, cached by weight hash: see ``onnx_runtime_model``), which measured faster than
    PyTorch on CPU (docs/bench_inference.md) with the same descriptors to fp32 rounding; anything
    else runs as it is. ``torch`` keeps PyTorch; ``onnxruntime`` converts any PyTorch model.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    from .models.projected import ProjectedModel

    if isinstance(model, ProjectedModel):  # the base picks its runtime; the projection is a matrix product
        base, how = choose_runtime(model.base, runtime, from_file, threads)
        return ProjectedModel(base, model.projection, model.name), model.how(how)
    is_torch = isinstance(model, TorchImageModel)
    on_cpu = is_torch and model.device.type == "cpu"
    if runtime == "onnxruntime" and not is_torch:
        raise ValueError(f"{model.name} is a {type(model).__name__}, not a PyTorch model: nothing to convert")
    if runtime == "torch" or not is_torch or (runtime == "auto" and not (on_cpu and from_file)):
        from .models import runtime_line

        return model, runtime_line(model)
    try:
        fast = onnx_runtime_model(model, threads=threads)
    except Exception as e:  # an architecture the ONNX exporter cannot trace: stay correct, just slower
        if runtime == "onnxruntime":
            raise
        return model, f"{model.name} runs with PyTorch (ONNX export failed: {type(e).__name__}: {e})"
    return fast, f"{model.name} runs with ONNX Runtime fp32 (export cached at {fast.path})"

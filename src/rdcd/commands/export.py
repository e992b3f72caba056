"""rdcd export: a PyTorch descriptor model -> ONNX (fp32/fp16/int8) or TorchScript file."""
from __future__ import annotations

import sys

from .common import add_model_argument


def register(subparsers) -> None:
    from ..export import FORMATS, PRECISIONS, QUANT_FORMATS, ExportConfig

    d = ExportConfig()
    p = subparsers.add_parser("export", help="export a model to ONNX or TorchScript for deployment",
                              description="Write a standalone model file. ONNX: input 'image' uint8 RGB NHWC "
                                          "(normalisation inside), output 'embedding' (L2-normalised); dynamic "
                                          "batch and image size; see docs/export.md. TorchScript: normalised "
                                          "float NCHW in, like SSCD's files.")
    add_model_argument(p)
    p.add_argument("--format", choices=FORMATS, default=d.format)
    p.add_argument("--output", required=True, help="file to write (e.g. model.onnx, model.torchscript.pt)")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="ONNX only: fp16 weights, or int8 static quantisation (needs --calibration); "
                        "default: %(default)s")
    p.add_argument("--calibration", default=None,
                   help="int8: image folder or file list like the images you will embed (100-500 images)")
    p.add_argument("--calibration-size", type=int, default=d.calibration_size,
                   help="int8: images used for calibration (default: %(default)s)")
    p.add_argument("--quant-format", choices=QUANT_FORMATS, default=d.quant_format,
                   help="int8 graph form, same descriptors (default: %(default)s, faster at 160 px on the CPU we "
                        "measured; QOperator was faster at 224 px there: BENCHMARKS.md section 4)")
    p.add_argument("--float-layers", type=int, default=d.float_layers,
                   help="int8: keep the first N weighted layers in fp32 (default: %(default)s; 0 quantises all)")
    p.add_argument("--weight-bits", type=int, choices=(7, 8), default=d.weight_bits,
                   help="int8: weight precision, 7 bits (no saturation on CPUs without VNNI) or 8 (default: %(default)s)")
    p.add_argument("--opset", type=int, default=d.opset, help="ONNX opset (default: %(default)s)")
    p.add_argument("--size", type=int, default=None,
                   help="input size written to the metadata and used for calibration (default: the model's)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..export import ExportConfig, export
    from ..models.runtime import resolve_runtime

    config = ExportConfig(format=args.format, precision=args.precision, opset=args.opset,
                          calibration=args.calibration, calibration_size=args.calibration_size,
                          quant_format=args.quant_format, input_size=args.size,
                          float_layers=args.float_layers, weight_bits=args.weight_bits)
    # the model's fp32 weights in PyTorch on the CPU (a shipped student: its .pt, not its int8 file)
    source = resolve_runtime(args.model, runtime="torch", device="cpu")
    path = export(source.model, args.output, config)
    print(f"rdcd: {args.model} ({source.how}) -> {path} ({args.format} {args.precision})", file=sys.stderr)
    return 0

"""Arguments shared by several commands."""
from __future__ import annotations


def default_model_name() -> str:
    """The model used when --model is not given."""
    from ..models import MODEL_REGISTRY

    return "rdcd-default" if "rdcd-default" in MODEL_REGISTRY else "sscd"


def add_model_argument(parser, required: bool = False) -> None:
    parser.add_argument("--model", required=required, default=None if required else default_model_name(),
                        help="model name (see `rdcd models`), student:BACKBONE[:DIM], or a model file "
                             "(.onnx, rdcd .pt, SSCD .torchscript.pt / .torchvision.pt); default: %(default)s")

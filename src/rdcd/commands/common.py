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


def add_embedding_arguments(parser, sets: str = "") -> None:
    """``--precision`` and ``--exact-decode``: how a model embeds images, the same for every command
    that embeds (rdcd extract, and match / bench for their image sets). ``sets`` names what is
    embedded, e.g. " of image sets"."""
    from ..models.runtime import PRECISIONS

    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="for shipped students: auto (default) runs the int8 ONNX file shipped beside the "
                             "weights on a CPU (fastest; uAP within half a point of fp32, see the model card), fp32 "
                             "the fp32 weights, int8 the int8 file even where a GPU would run fp32; other models run "
                             "as they are")
    parser.add_argument("--exact-decode", action="store_true",
                        help=f"decode every pixel{sets}, then resize (default: the JPEG decoder downscales images "
                             "at least twice the input size while decoding: ~3x faster for camera-sized JPEGs, same "
                             "devbench uAP)")

"""rdcd extract: image folder / file list -> descriptor file."""
from __future__ import annotations

import argparse
import sys

from .common import add_embedding_arguments, add_model_argument


def register(subparsers) -> None:
    p = subparsers.add_parser("extract", help="compute descriptors of images (DISC2021 HDF5 or .npy)",
                              description="Embed every image of a folder or file list. Bad files are skipped "
                                          "and listed; an interrupted run resumes where it stopped.")
    add_model_argument(p)
    p.add_argument("--images", required=True, help="image folder (recursive), file list (one path a line) or image")
    p.add_argument("--output", required=True, help="OUT.h5 (DISC2021 layout) or OUT.npy (+ OUT.ids.txt)")
    p.add_argument("--size", type=int, default=None, help="square input size in px (default: the model's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: by core count)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="images per resumable chunk (default: a chunk is saved every ~30 s of work, at most 1024 "
                        "images, so a kill loses about that much; a rerun reuses the finished chunks whatever the "
                        "chunk size)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any file could not be embedded")
    p.add_argument("--no-resume", action="store_true", help="start afresh: discard the finished chunks of an interrupted run")
    p.add_argument("--fast-decode", action="store_true", help=argparse.SUPPRESS)  # now the default; accepted so old scripts run
    p.add_argument("--no-prefetch", action="store_true",
                   help="without --workers, decode each batch only after the previous one is embedded "
                        "(default: a thread decodes the next batch meanwhile)")
    p.add_argument("--runtime", choices=["auto", "torch", "onnxruntime"], default="auto",
                   help="auto (default): a PyTorch model file on the CPU runs through ONNX Runtime, exported once "
                        "and cached (same descriptors, faster); torch: keep PyTorch")
    p.add_argument("--background", default=None,
                   help="with --model BASE+pcawDIM (or +pcaDIM): images to fit the projection on, unrelated to the "
                        "references (e.g. training images); fitted once, cached and reused")
    add_embedding_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..extract import extract

    result = extract(args.model, args.images, output=args.output, size=args.size, batch_size=args.batch_size,
                     workers=args.workers, strict=args.strict, chunk_size=args.chunk_size,
                     resume=not args.no_resume, draft=not args.exact_decode,
                     runtime=args.runtime, prefetch=not args.no_prefetch, precision=args.precision,
                     background=args.background)
    if result.ids:
        print(f"rdcd: {len(result.ids)} descriptors ({result.vectors.shape[1]}-d, {result.model}) -> {args.output}; "
              f"{result.images_per_second:.1f} images/s", file=sys.stderr)
    return 0

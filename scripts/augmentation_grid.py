"""Render a grid of augmented training views, to check by eye what a recipe does.

    python scripts/augmentation_grid.py --images /path/to/images --output docs/augmentations.png
    python scripts/augmentation_grid.py --images DIR --output text.png --p text=1 --p emoji=1

Each row is one image (the first --n-images files of DIR, sorted by name): the original, then
--views views, labelled with the steps that fired.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from rdcd.augment import AUGMENTATIONS, augmentation_grid, build_augmentation
from rdcd.descriptors import IMAGE_SUFFIXES


def parse_probability(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=P (e.g. text=1), got {text!r}")
    return name, float(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of images")
    parser.add_argument("--output", type=Path, required=True, help="PNG to write")
    parser.add_argument("--recipe", default="advanced", choices=sorted(AUGMENTATIONS))
    parser.add_argument("--n-images", type=int, default=4)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="view size the recipe produces")
    parser.add_argument("--cell", type=int, default=128, help="size each view is shown at in the grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--p", type=parse_probability, action="append", default=[], metavar="NAME=P",
                        help="override a step's probability (repeatable)")
    parser.add_argument("--colors", type=int, default=256,
                        help="palette size of the saved PNG, to keep it small (0: full RGB)")
    args = parser.parse_args(argv)

    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[: args.n_images]
    if not paths:
        parser.error(f"{args.images}: no images ({', '.join(IMAGE_SUFFIXES)})")
    augmentation = build_augmentation(args.recipe, args.size, probabilities=dict(args.p))
    grid = augmentation_grid([Image.open(p) for p in paths], augmentation, args.views, args.seed, args.cell)
    if args.colors:  # a dithered palette image is about 40% of the RGB PNG's size
        palette = grid.quantize(args.colors, method=Image.Quantize.FASTOCTREE)
        grid = grid.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.output, optimize=True)
    print(f"{args.output}: {len(paths)} images x {args.views} views, {args.output.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()

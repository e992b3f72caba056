"""Training views: the SSCD "advanced" augmentation recipe (docs/method.md) and a light one.

A recipe is a list of ``Step``s, each an op applied with probability ``p``, in order, to a PIL image;
the result becomes a uint8 tensor (3, size, size), ImageNet-normalised to float unless
``normalize=False`` (for a teacher that takes raw uint8; normalise later with ``imagenet_normalize``).

Seeding: every random draw (whether a step fires and its parameters) comes from the one
``random.Random`` passed to the call, never from the global torch / numpy / python RNGs, so the
same seed gives the same tensor in any process or DataLoader worker. Derive a per-sample seed with
``view_seed(base_seed, epoch, index)`` so views do not depend on which worker loads the sample.

Text and emoji come from AugLy's bundled assets (:mod:`rdcd.augly_assets`).
Differences from SSCD's implementation, on purpose: rotation by 90/180/270 is lossless (the image
is transposed, not rotated inside its old frame and cropped); AugLy's ``overlay_text`` is drawn
onto a transparent layer that is then alpha-composited, because drawn straight onto an RGB image
it loses the opacity (the text comes out opaque).
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from augly.image.functional import encoding_quality, overlay_emoji, overlay_text
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps
from torch import Tensor
from torchvision.transforms import InterpolationMode

from rdcd.augly_assets import emoji_names, emoji_path, font_charset, font_names, font_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Range = tuple[float, float]
Op = Callable[[Image.Image, random.Random], Image.Image]


# ------------------------------------------------------------------ seeding


def view_seed(base_seed: int, epoch: int, index: int) -> int:
    """A well-mixed seed for the views of sample ``index`` in ``epoch`` (independent of the worker)."""
    return int(np.random.SeedSequence([base_seed, epoch, index]).generate_state(2, np.uint32).view(np.uint64)[0])


def as_rng(rng: random.Random | int | np.random.Generator | torch.Generator | None) -> random.Random:
    """The ``random.Random`` to draw from: used as is, seeded from an int, or seeded by one draw
    from a numpy / torch generator. None: seeded by one draw from python's global ``random``
    (which PyTorch seeds per DataLoader worker, so views then depend on the worker: prefer a seed)."""
    if rng is None:
        return random.Random(random.getrandbits(64))
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, (int, np.integer)):
        return random.Random(int(rng))
    if isinstance(rng, np.random.Generator):
        return random.Random(int(rng.integers(2**63)))
    if isinstance(rng, torch.Generator):
        return random.Random(int(torch.randint(2**62, (1,), generator=rng)))
    raise TypeError(f"rng must be a random.Random, an int seed, a numpy or torch Generator, or None; got {type(rng)}")


# ------------------------------------------------------------------ ops: (image, rng) -> image


@dataclass(frozen=True)
class HorizontalFlip:
    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        return ImageOps.mirror(image)


@dataclass(frozen=True)
class Rotate90:
    """Counter-clockwise by 90, 180 or 270 degrees, keeping the whole image."""

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        method = rng.choice((Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270))
        return image.transpose(method)


@dataclass(frozen=True)
class FreeRotate:
    """Counter-clockwise by a whole number of degrees, same frame size, black corners (as SSCD)."""

    degrees: tuple[int, int] = (0, 359)

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        return image.rotate(rng.randint(*self.degrees), resample=Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class OverlayText:
    """A random string in a random AugLy font, fitted inside the image (SSCD's OverlayText).

    Font size is a fraction of the short side; up to ``max_chars`` characters are drawn from the
    font's charset and cut to a random length that fits the image width.
    """

    font_size: Range = (0.1, 0.3)
    opacity: Range = (0.1, 1.0)
    max_chars: int = 100

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        font = rng.choice(font_names())
        charset = font_charset(font)
        size_fraction = rng.uniform(*self.font_size)
        indices = [rng.randrange(len(charset)) for _ in range(self.max_chars)]
        fraction_of_length = rng.random()  # the length is drawn uniformly among those that fit
        width, height = image.size
        pixels = int(min(width, height) * size_fraction)  # the size AugLy will use
        if pixels < 1:
            return image
        fx, fy = rng.random(), rng.random()
        opacity = rng.uniform(*self.opacity)
        color = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
        # about 1 draw in 300 hits a glyph the font's layout engine rejects: leave the image as is
        try:
            typeface = ImageFont.truetype(font_path(font), pixels)

            def extent(n: int) -> tuple[float, float]:
                _, _, right, bottom = typeface.getbbox("".join(chr(charset[i]) for i in indices[:n]))
                return right, bottom

            fits = _longest_prefix(len(indices), lambda n: all(a <= b for a, b in zip(extent(n), (width, height))))
            if fits == 0:
                return image
            length = 1 + int(fraction_of_length * fits)
            text_width, text_height = extent(length)
            layer = overlay_text(
                Image.new("RGBA", image.size, (0, 0, 0, 0)),
                text=indices[:length],
                font_file=font_path(font),
                font_size=size_fraction,
                opacity=opacity,
                color=color,
                x_pos=fx * max(0.0, width - text_width) / width,
                y_pos=fy * max(0.0, height - text_height) / height,
            )
        except (OSError, RuntimeError):
            return image
        return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def _longest_prefix(n_max: int, fits: Callable[[int], bool]) -> int:
    """Largest n in [0, n_max] with fits(n), for fits monotone (true up to some n, false after)."""
    low, high = 0, n_max
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


@dataclass(frozen=True)
class OverlayEmoji:
    """A random AugLy emoji, side = ``size`` x the image's short side, fully inside the image."""

    size: Range = (0.1, 0.5)
    opacity: Range = (0.7, 1.0)

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        emoji = rng.choice(emoji_names())
        side_fraction = rng.uniform(*self.size)
        opacity = rng.uniform(*self.opacity)
        fx, fy = rng.random(), rng.random()
        width, height = image.size
        side = side_fraction * min(width, height)  # AugLy's emojis are square
        return overlay_emoji(
            image,
            emoji_path=emoji_path(emoji),
            opacity=opacity,
            emoji_size=side / height,  # AugLy sizes the emoji relative to the image height
            x_pos=fx * (1 - side / width),
            y_pos=fy * (1 - side / height),
        )


@dataclass(frozen=True)
class RandomResizedCrop:
    """torchvision's RandomResizedCrop (same parameter search), drawing from ``rng``."""

    size: int = 224
    scale: Range = (0.08, 1.0)
    ratio: Range = (3 / 4, 4 / 3)

    def box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        # fallback: the largest central crop with an allowed aspect ratio
        if width / height < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif width / height > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        top, left, h, w = self.box(*image.size, rng)
        return TF.resized_crop(
            image, top, left, h, w, [self.size, self.size], InterpolationMode.BILINEAR, antialias=True
        )


@dataclass(frozen=True)
class ColorJitter:
    """torchvision's ColorJitter: brightness/contrast/saturation factors in [1-x, 1+x], hue shift in
    [-hue, hue], applied in a random order."""

    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        adjustments = [
            (TF.adjust_brightness, rng.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness)),
            (TF.adjust_contrast, rng.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast)),
            (TF.adjust_saturation, rng.uniform(max(0.0, 1 - self.saturation), 1 + self.saturation)),
            (TF.adjust_hue, rng.uniform(-self.hue, self.hue)),
        ]
        rng.shuffle(adjustments)
        for adjust, factor in adjustments:
            image = adjust(image, factor)
        return image


@dataclass(frozen=True)
class Grayscale:
    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        return image.convert("L").convert("RGB")


@dataclass(frozen=True)
class GaussianBlur:
    radius: Range = (1.0, 5.0)

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*self.radius)))


@dataclass(frozen=True)
class JpegReencode:
    quality: tuple[int, int] = (0, 100)

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        return encoding_quality(image, quality=rng.randint(*self.quality))


# ------------------------------------------------------------------ recipes


@dataclass(frozen=True)
class Step:
    name: str
    p: float
    op: Op


def imagenet_normalize(pixels: Tensor) -> Tensor:
    """uint8 (..., 3, H, W) -> float32, scaled to [0, 1] then ImageNet mean/std normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


class Augmentation:
    """Applies ``steps`` in order, each with its probability, then converts to a tensor.

    ``aug(image, rng)`` -> float32 (3, size, size), or uint8 with ``normalize=False``.
    """

    def __init__(self, steps: Sequence[Step], normalize: bool = True):
        self.steps = tuple(steps)
        self.normalize = normalize

    def augment(self, image: Image.Image, rng: random.Random) -> tuple[Image.Image, list[str]]:
        """The augmented PIL image and the names of the steps that fired."""
        image = image.convert("RGB")
        applied = []
        for step in self.steps:
            if rng.random() < step.p:
                image = step.op(image, rng)
                applied.append(step.name)
        return image, applied

    def __call__(self, image: Image.Image, rng: random.Random | int | None = None) -> Tensor:
        augmented, _ = self.augment(image, as_rng(rng))
        pixels = TF.pil_to_tensor(augmented)
        return imagenet_normalize(pixels) if self.normalize else pixels

    def __repr__(self) -> str:
        lines = [f"  p={s.p:<4} {s.name}: {s.op}" for s in self.steps]
        return f"Augmentation(normalize={self.normalize},\n" + "\n".join(lines) + "\n)"


class TwoViews:
    """Two independent views of one image, drawn one after the other from the same rng."""

    def __init__(self, augmentation: Augmentation):
        self.augmentation = augmentation

    def __call__(self, image: Image.Image, rng: random.Random | int | None = None) -> tuple[Tensor, Tensor]:
        rng = as_rng(rng)
        return self.augmentation(image, rng), self.augmentation(image, rng)


def _with_probabilities(steps: list[Step], probabilities: Mapping[str, float] | None) -> list[Step]:
    probabilities = dict(probabilities or {})
    unknown = set(probabilities) - {s.name for s in steps}
    if unknown:
        raise ValueError(f"unknown augmentation steps {sorted(unknown)}; this recipe has {[s.name for s in steps]}")
    return [dataclasses.replace(s, p=probabilities.get(s.name, s.p)) for s in steps]


def advanced(size: int = 224, normalize: bool = True, probabilities: Mapping[str, float] | None = None) -> Augmentation:
    """SSCD's "advanced" recipe, in docs/method.md's order; ``probabilities`` overrides p by step name."""
    steps = [
        Step("hflip", 0.5, HorizontalFlip()),
        Step("rotate90", 0.05, Rotate90()),
        Step("text", 0.1, OverlayText(font_size=(0.1, 0.3), opacity=(0.1, 1.0))),
        Step("emoji", 0.2, OverlayEmoji(size=(0.1, 0.5), opacity=(0.7, 1.0))),
        Step("rotate", 0.05, FreeRotate(degrees=(0, 359))),
        Step("crop", 1.0, RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))),
        Step("color_jitter", 0.8, ColorJitter(0.8, 0.8, 0.8, 0.2)),
        Step("grayscale", 0.2, Grayscale()),
        Step("blur", 0.5, GaussianBlur(radius=(1.0, 5.0))),
        Step("jpeg", 0.2, JpegReencode(quality=(0, 100))),
    ]
    return Augmentation(_with_probabilities(steps, probabilities), normalize)


def light(size: int = 224, normalize: bool = True, probabilities: Mapping[str, float] | None = None) -> Augmentation:
    """Crop (scale 0.3-1), flip and mild colour jitter."""
    steps = [
        Step("crop", 1.0, RandomResizedCrop(size, scale=(0.3, 1.0))),
        Step("hflip", 0.5, HorizontalFlip()),
        Step("color_jitter", 0.8, ColorJitter(0.4, 0.4, 0.4, 0.1)),
    ]
    return Augmentation(_with_probabilities(steps, probabilities), normalize)


AUGMENTATIONS: dict[str, Callable[..., Augmentation]] = {"advanced": advanced, "light": light}


def build_augmentation(
    name: str = "advanced",
    size: int = 224,
    normalize: bool = True,
    probabilities: Mapping[str, float] | None = None,
) -> Augmentation:
    """The recipe registered as ``name`` (see ``AUGMENTATIONS``), producing size x size views."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {sorted(AUGMENTATIONS)}")
    return AUGMENTATIONS[name](size=size, normalize=normalize, probabilities=probabilities)


# ------------------------------------------------------------------ looking at views


def augmentation_grid(
    images: Sequence[Image.Image],
    augmentation: Augmentation,
    views: int = 8,
    seed: int = 0,
    cell: int = 128,
) -> Image.Image:
    """One row per image: the original, then ``views`` augmented views, each labelled with the steps
    that fired (the crop, always on, is left out of the labels). Row i uses ``view_seed(seed, 0, i)``."""
    font = ImageFont.load_default(size=10)
    label_height, pad = 26, 4
    grid = Image.new("RGB", ((views + 1) * (cell + pad) + pad, len(images) * (cell + label_height + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for row, image in enumerate(images):
        rng = random.Random(view_seed(seed, 0, row))
        tiles = [(ImageOps.contain(image.convert("RGB"), (cell, cell)), ["original"])]
        for _ in range(views):
            view, applied = augmentation.augment(image, rng)
            tiles.append((view.resize((cell, cell), Image.Resampling.BILINEAR), [a for a in applied if a != "crop"]))
        y = pad + row * (cell + label_height + pad)
        for col, (tile, names) in enumerate(tiles):
            x = pad + col * (cell + pad)
            grid.paste(tile, (x, y))
            draw.multiline_text((x, y + cell + 1), _wrap(names, font, cell), fill="black", font=font, spacing=1)
    return grid


def _wrap(words: list[str], font: ImageFont.ImageFont, width: int) -> str:
    lines = [""]
    for word in words:
        candidate = f"{lines[-1]} {word}".strip()
        if lines[-1] and font.getlength(candidate) > width:
            lines.append(word)
        else:
            lines[-1] = candidate
    return "\n".join(lines[:2])

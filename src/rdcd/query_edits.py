"""Edited copies "internet-user style": the edit operations, recipes and their exact replay.

1-4 random edits (crops, rotations, colour changes, blur, JPEG, overlays, memes, screenshots,
pasting onto another image, perspective...) made with AugLy and PIL, applied in stage order
(geometry, pixels, overlays, framing, encoding), each with parameters drawn from a
``np.random.Generator`` and recorded in full, so :func:`replay` redoes any edit exactly.
``rdcd.benchmark_builder`` makes the queries of a benchmark with them.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from rdcd import _augly_compat
from rdcd.augly_assets import emoji_names, emoji_path, font_charset, font_names, font_path
from rdcd.images import open_image

__all__ = ["OPS", "RECIPES", "EditOp", "Recipe", "Backdrops", "random_edit", "edit", "replay"]


#: shorter side of references and train images, and of the final queries (as DISC2021/devbench)
OUTPUT_SHORT_SIDE = 384
#: shorter side at which a source is edited (edits then see more detail than the output keeps)
EDIT_SHORT_SIDE = 768
#: inputs smaller than this (shorter side, pixels) are skipped
MIN_SHORT_SIDE = 64
JPEG_QUALITY = 85
#: explicit encoder options: no optimisation passes or progressive scans, fixed chroma subsampling
_JPEG_OPTIONS = {"optimize": False, "progressive": False, "subsampling": "4:2:0"}

GEOMETRY, PIXELS, OVERLAY, FRAMING, ENCODING = range(5)


# --------------------------------------------------------------------------------------------
# Image IO
# --------------------------------------------------------------------------------------------

def _fit_short_side(image: Image.Image, short_side: int) -> Image.Image:
    """Downscale so the shorter side is at most ``short_side`` (never upscale)."""
    w, h = image.size
    if min(w, h) <= short_side:
        return image
    scale = short_side / min(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)


def _load(path: Path, short_side: int) -> Image.Image:
    """Decode to RGB (see :func:`rdcd.images.open_image`) with the shorter side at most ``short_side``."""
    return _fit_short_side(open_image(path, draft_size=short_side), short_side)


def _jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=int(quality), **_JPEG_OPTIONS)
    return buffer.getvalue()


def _jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    with Image.open(io.BytesIO(_jpeg_bytes(image, quality))) as reloaded:
        return reloaded.convert("RGB")


# --------------------------------------------------------------------------------------------
# AugLy assets
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _augly():
    """``augly.image.functional``, patched once for current Pillow / numpy."""
    _augly_compat.apply()
    import augly.image.functional as functional

    return functional


@lru_cache(maxsize=None)
def _latin_fonts() -> tuple[str, ...]:
    letters = {ord(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    return tuple(f for f in font_names() if letters <= set(font_charset(f)))


@lru_cache(maxsize=None)
def _words() -> tuple[str, ...]:
    """Plain English words for captions: the correctly spelled keys of AugLy's misspelling list."""
    from augly.utils import TEXT_DIR

    with open(os.path.join(TEXT_DIR, "misspelling.json"), encoding="utf-8") as f:
        keys = json.load(f)
    return tuple(sorted({w.lower() for w in keys if w.isascii() and w.isalpha() and 3 <= len(w) <= 8}))


# --------------------------------------------------------------------------------------------
# Random parameters
# --------------------------------------------------------------------------------------------

def _uniform(rng: np.random.Generator, low: float, high: float, digits: int = 3) -> float:
    return round(float(rng.uniform(low, high)), digits)


def _either(rng: np.random.Generator, below: tuple[float, float], above: tuple[float, float]) -> float:
    """A factor that clearly weakens or clearly strengthens (never close to 1)."""
    return _uniform(rng, *(below if rng.random() < 0.5 else above))


def _color(rng: np.random.Generator) -> list[int]:
    return [int(c) for c in rng.integers(0, 256, size=3)]


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def _choice(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _words_of(rng: np.random.Generator, low: int, high: int) -> list[str]:
    words = _words()
    return [_choice(rng, words) for _ in range(int(rng.integers(low, high + 1)))]


class Backdrops:
    """Images a query may be pasted onto, by the name recorded in ``edits.csv``."""

    def __init__(self, paths: Mapping[str, str | os.PathLike] | None = None):
        self._paths = {name: Path(p) for name, p in sorted((paths or {}).items())}
        self._cache: dict[str, Image.Image] = {}

    def names(self) -> list[str]:
        return list(self._paths)

    def load(self, name: str) -> Image.Image:
        if name not in self._paths:
            raise KeyError(f"backdrop {name!r} is not known; pass its file to Backdrops({{name: path}})")
        if name not in self._cache:
            if len(self._cache) >= 32:
                self._cache.pop(next(iter(self._cache)))
            self._cache[name] = _load(self._paths[name], EDIT_SHORT_SIDE)
        return self._cache[name]


# --------------------------------------------------------------------------------------------
# Edit operations: sample(image, rng, backdrops) -> params; apply(image, params, backdrops) -> image
# --------------------------------------------------------------------------------------------

Params = dict
Sampler = Callable[[Image.Image, np.random.Generator, Backdrops], Params]
Applier = Callable[[Image.Image, Params, Backdrops], Image.Image]


@dataclass(frozen=True)
class EditOp:
    """One kind of edit: random parameters from ``sample``, deterministic ``apply``.

    ``stage`` orders the edits of one query; ops of the same ``family`` never share a query.
    """

    name: str
    stage: int
    sample: Sampler
    apply: Applier
    family: str | None = None
    needs_backdrop: bool = False
    description: str = ""


def _augly_call(function: str) -> Applier:
    """An applier passing the params straight to ``augly.image.functional.<function>``."""

    def apply(image: Image.Image, params: Params, backdrops: Backdrops) -> Image.Image:
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
        return getattr(_augly(), function)(image, **kwargs)

    return apply


def _crop_sampler(min_area: float, max_area: float) -> Sampler:
    def sample(image, rng, backdrops):
        area = rng.uniform(min_area, max_area)
        aspect = math.exp(rng.uniform(-0.4, 0.4))  # change of aspect ratio, up to x1.5 either way
        w = min(1.0, math.sqrt(area * aspect))
        h = min(1.0, area / w)
        x1, y1 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        return {"x1": round(x1, 4), "y1": round(y1, 4), "x2": round(min(1.0, x1 + w), 4),
                "y2": round(min(1.0, y1 + h), 4)}

    return sample


def _sample_degrees(rng: np.random.Generator) -> float:
    if rng.random() < 0.3:
        return float(_choice(rng, (90, 180, 270)))
    return round(float(rng.uniform(5, 30) * rng.choice((-1, 1))), 2)


def _rotate(image: Image.Image, degrees: float) -> Image.Image:
    if degrees % 90 == 0:
        return image.rotate(degrees, expand=True)  # exact transpose, no interpolation
    return _augly().rotate(image, degrees=degrees)  # crops to the largest inner rectangle


def _apply_mirror_rotate(image, params, backdrops):
    flipped = ImageOps.mirror(image) if params["flip"] == "h" else ImageOps.flip(image)
    return _rotate(flipped, params["degrees"])


def _sample_perspective(image, rng, backdrops):
    return {"sigma": round(_uniform(rng, 0.03, 0.10) * min(image.size), 1), "seed": _seed(rng),
            "crop_out_black_border": bool(rng.random() < 0.5)}


def _apply_perspective(image, params, backdrops):
    functional = _augly()
    try:
        return functional.perspective_transform(image, **params)
    except Exception as exc:  # AugLy raises a bare Exception when no border-free crop exists
        if not (params["crop_out_black_border"] and "Cannot crop out black border" in str(exc)):
            raise
        return functional.perspective_transform(image, **{**params, "crop_out_black_border": False})


def _sample_aspect_ratio(image, rng, backdrops):
    factor = _either(rng, (0.5, 0.8), (1.25, 2.0))
    return {"ratio": round(image.width / image.height * factor, 4)}


def _sample_scale(image, rng, backdrops):
    # never below MIN_SHORT_SIDE / 2, so later edits still have pixels to work with
    floor = min(1.0, MIN_SHORT_SIDE / 2 / min(image.size))
    return {"factor": max(_uniform(rng, 0.25, 0.8), round(floor + 0.005, 3))}


def _apply_noise(image, params, backdrops):
    rng = np.random.default_rng(params["seed"])  # AugLy's random_noise reseeds numpy's global RNG
    array = np.asarray(image, dtype=np.float32) / 255.0
    noisy = array + rng.normal(0.0, math.sqrt(params["var"]), size=array.shape)
    return Image.fromarray(np.uint8(np.clip(noisy, 0.0, 1.0) * 255.0))


def _apply_opacity(image, params, backdrops):
    under = Image.new("RGB", image.size, tuple(params["flattened_on"]))
    return Image.blend(under, image.convert("RGB"), params["level"])


def _sample_opacity(image, rng, backdrops):
    under = _choice(rng, ("white", "black", "color"))
    color = {"white": [255, 255, 255], "black": [0, 0, 0]}.get(under) or _color(rng)
    return {"level": _uniform(rng, 0.35, 0.8), "flattened_on": color}


def _sample_overlay_text(image, rng, backdrops):
    font = _choice(rng, font_names())
    glyphs = font_charset(font)
    index = {c: i for i, c in enumerate(glyphs)}
    lines = []
    for _ in range(int(rng.integers(1, 4))):
        word = _words_of(rng, 1, 1)[0]
        if font in _latin_fonts():
            lines.append([index[ord(c)] for c in word])
        else:  # a font without Latin letters: random glyphs of its own script (no control characters)
            printable = [i for i, c in enumerate(glyphs) if chr(c).isprintable()]
            lines.append([int(printable[i]) for i in rng.integers(0, len(printable), size=len(word))])
    return {"font_file": font, "text": lines, "font_size": _uniform(rng, 0.07, 0.22),
            "opacity": _uniform(rng, 0.7, 1.0), "color": _color(rng),
            "x_pos": _uniform(rng, 0.0, 0.6), "y_pos": _uniform(rng, 0.0, 0.7)}


def _apply_overlay_text(image, params, backdrops):
    # drawn straight onto the image, AugLy's text replaces pixels and ignores its opacity:
    # draw it on a transparent layer and composite that instead
    layer = _augly().overlay_text(Image.new("RGBA", image.size, (0, 0, 0, 0)),
                                  **{**params, "font_file": font_path(params["font_file"]),
                                     "color": tuple(params["color"])})
    return Image.alpha_composite(image.convert("RGBA"), layer)


def _sample_overlay_emoji(image, rng, backdrops):
    return {"emojis": [{"emoji": _choice(rng, emoji_names()), "emoji_size": _uniform(rng, 0.12, 0.45),
                        "opacity": _uniform(rng, 0.6, 1.0), "x_pos": _uniform(rng, 0.0, 0.8),
                        "y_pos": _uniform(rng, 0.0, 0.8)} for _ in range(int(rng.integers(1, 4)))]}


def _apply_overlay_emoji(image, params, backdrops):
    functional = _augly()
    for e in params["emojis"]:
        image = functional.overlay_emoji(image, emoji_path=emoji_path(e["emoji"]),
                                         opacity=e["opacity"], emoji_size=e["emoji_size"],
                                         x_pos=e["x_pos"], y_pos=e["y_pos"])
    return image


def _sample_overlay_stripes(image, rng, backdrops):
    return {"line_width": _uniform(rng, 0.1, 0.7), "line_color": _color(rng),
            "line_angle": _uniform(rng, -90, 90, 1), "line_density": _uniform(rng, 0.2, 0.8),
            "line_type": _choice(rng, ("solid", "dotted", "dashed")),
            "line_opacity": _uniform(rng, 0.3, 0.8)}


def _sample_pad(image, rng, backdrops):
    return {"w_factor": _uniform(rng, 0.03, 0.35), "h_factor": _uniform(rng, 0.03, 0.35),
            "color": _color(rng)}


def _smallest_font_size(caption_height: int) -> int:
    """The last size AugLy's meme_format tries (it shrinks by 5 from caption_height - 10)."""
    return (caption_height - 11) % 5 + 1


def _caption_fits(text: str, font: str, width: int, caption_height: int) -> bool:
    typeface = ImageFont.truetype(font_path(font), _smallest_font_size(caption_height))
    _, _, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).multiline_textbbox((0, 0), text, font=typeface)
    return right <= width - 10 and bottom <= caption_height - 10


def _sample_meme_format(image, rng, backdrops):
    font = _choice(rng, _latin_fonts())
    caption_height = max(30, round(_uniform(rng, 0.12, 0.35) * image.height))
    words = _words_of(rng, 1, 4)
    text = " ".join(words)
    while not _caption_fits(text, font, image.width, caption_height) and len(text) > 1:
        words = words[:-1] if len(words) > 1 else [words[0][:-1]]  # shorten until it fits the width
        text = " ".join(words)
    dark_bar = bool(rng.random() < 0.3)
    return {"text": text, "font_file": font, "caption_height": caption_height,
            "text_color": [255, 255, 255] if dark_bar else [0, 0, 0],
            "meme_bg_color": [0, 0, 0] if dark_bar else [255, 255, 255]}


def _apply_meme_format(image, params, backdrops):
    return _augly().meme_format(image, **{**params, "font_file": font_path(params["font_file"]),
                                          "text_color": tuple(params["text_color"]),
                                          "meme_bg_color": tuple(params["meme_bg_color"])})


def _apply_overlay_onto_screenshot(image, params, backdrops):
    from augly.utils import SCREENSHOT_TEMPLATES_DIR

    return _augly().overlay_onto_screenshot(
        image, template_filepath=os.path.join(SCREENSHOT_TEMPLATES_DIR, params["template"]),
        crop_src_to_fit=params["crop_src_to_fit"])


def _sample_overlay_onto_background(image, rng, backdrops):
    name = _choice(rng, backdrops.names())
    backdrop = backdrops.load(name)
    size = _uniform(rng, 0.35, 0.75)
    # keep the pasted copy inside the backdrop: its width is size * backdrop height * image aspect
    widest = 0.95 * backdrop.width * image.height / (image.width * backdrop.height)
    size = round(min(size, widest), 3)
    pasted_width = size * backdrop.height * image.width / image.height / backdrop.width
    return {"backdrop": name, "overlay_size": size, "opacity": _uniform(rng, 0.85, 1.0),
            "x_pos": _uniform(rng, 0.0, max(0.0, 1.0 - pasted_width)),
            "y_pos": _uniform(rng, 0.0, 1.0 - size)}


def _apply_overlay_onto_background(image, params, backdrops):
    return _augly().overlay_onto_background_image(
        image, background_image=backdrops.load(params["backdrop"]), opacity=params["opacity"],
        overlay_size=params["overlay_size"], x_pos=params["x_pos"], y_pos=params["y_pos"])


def _apply_jpeg(image, params, backdrops):
    return _jpeg_roundtrip(image, params["quality"])


def _no_params(image, rng, backdrops):
    return {}


_OP_LIST = [
    EditOp("crop", GEOMETRY, _crop_sampler(0.4, 0.9), _augly_call("crop"), family="crop",
           description="crop keeping 40-90 % of the area, random aspect and position"),
    EditOp("small_crop", GEOMETRY, _crop_sampler(0.2, 0.4), _augly_call("crop"), family="crop",
           description="crop keeping 20-40 % of the area"),
    EditOp("rotate", GEOMETRY, lambda im, rng, b: {"degrees": _sample_degrees(rng)},
           lambda im, p, b: _rotate(im, p["degrees"]),
           description="rotation +-5..30 deg cropped to the largest inner rectangle, or 90/180/270"),
    EditOp("hflip", GEOMETRY, _no_params, lambda im, p, b: ImageOps.mirror(im), family="mirror",
           description="horizontal mirror"),
    EditOp("vflip", GEOMETRY, _no_params, lambda im, p, b: ImageOps.flip(im), family="mirror",
           description="vertical flip"),
    EditOp("mirror_rotate", GEOMETRY,
           lambda im, rng, b: {"flip": _choice(rng, ("h", "v")), "degrees": _sample_degrees(rng)},
           _apply_mirror_rotate, family="mirror", description="h- or v-mirror, then a rotation"),
    EditOp("perspective", GEOMETRY, _sample_perspective, _apply_perspective,
           description="AugLy perspective_transform, sigma 3-10 % of the shorter side, border kept or cropped"),
    EditOp("skew", GEOMETRY,
           lambda im, rng, b: {"skew_factor": round(_uniform(rng, 0.15, 0.6) * float(rng.choice((-1, 1))), 3),
                               "axis": int(rng.integers(2))},
           _augly_call("skew"), description="AugLy skew, factor +-0.15..0.6, either axis"),
    EditOp("aspect_ratio", GEOMETRY, _sample_aspect_ratio, _augly_call("change_aspect_ratio"),
           description="aspect-ratio change x0.5-0.8 or x1.25-2.0 (area kept)"),
    EditOp("scale", GEOMETRY, _sample_scale, _augly_call("scale"), description="downscale x0.25-0.8"),
    EditOp("color_jitter", PIXELS,
           lambda im, rng, b: {"brightness_factor": _uniform(rng, 0.6, 1.4),
                               "contrast_factor": _uniform(rng, 0.6, 1.5),
                               "saturation_factor": _uniform(rng, 0.2, 2.0)},
           _augly_call("color_jitter"), description="brightness 0.6-1.4, contrast 0.6-1.5, saturation 0.2-2"),
    EditOp("brightness", PIXELS, lambda im, rng, b: {"factor": _either(rng, (0.4, 0.75), (1.3, 1.8))},
           _augly_call("brightness"), description="brightness x0.4-0.75 or x1.3-1.8"),
    EditOp("contrast", PIXELS, lambda im, rng, b: {"factor": _either(rng, (0.3, 0.7), (1.4, 2.2))},
           _augly_call("contrast"), description="contrast x0.3-0.7 or x1.4-2.2"),
    EditOp("saturation", PIXELS, lambda im, rng, b: {"factor": _either(rng, (0.0, 0.5), (1.6, 3.0))},
           _augly_call("saturation"), description="saturation x0-0.5 or x1.6-3"),
    EditOp("grayscale", PIXELS, _no_params, _augly_call("grayscale"), description="grayscale"),
    EditOp("blur", PIXELS, lambda im, rng, b: {"radius": round(_uniform(rng, 0.004, 0.014, 4) * min(im.size), 2)},
           _augly_call("blur"), description="Gaussian blur, radius 0.4-1.4 % of the shorter side"),
    EditOp("sharpen", PIXELS, lambda im, rng, b: {"factor": _uniform(rng, 2.0, 10.0, 2)},
           _augly_call("sharpen"), description="sharpen factor 2-10"),
    EditOp("noise", PIXELS, lambda im, rng, b: {"var": _uniform(rng, 0.003, 0.03, 4), "seed": _seed(rng)},
           _apply_noise, description="Gaussian noise, variance 0.003-0.03"),
    EditOp("pixelization", PIXELS, lambda im, rng, b: {"ratio": _uniform(rng, 0.08, 0.35)},
           _augly_call("pixelization"), description="pixelization ratio 0.08-0.35"),
    EditOp("opacity", PIXELS, _sample_opacity, _apply_opacity,
           description="opacity 0.35-0.8, flattened onto white, black or a random colour"),
    EditOp("overlay_text", OVERLAY, _sample_overlay_text, _apply_overlay_text,
           description="AugLy overlay_text: 1-3 words in a random AugLy font, size 7-22 %, random colour"),
    EditOp("overlay_emoji", OVERLAY, _sample_overlay_emoji, _apply_overlay_emoji,
           description="1-3 AugLy twemoji, size 12-45 %, opacity 0.6-1"),
    EditOp("overlay_stripes", OVERLAY, _sample_overlay_stripes, _augly_call("overlay_stripes"),
           description="AugLy overlay_stripes: solid/dotted/dashed, random colour/angle/density, opacity 0.3-0.8"),
    EditOp("pad", FRAMING, _sample_pad, _augly_call("pad"), description="border of a random colour, 3-35 % per side"),
    EditOp("meme_format", FRAMING, _sample_meme_format, _apply_meme_format,
           description="AugLy meme_format: caption bar 12-35 % of the height with 1-4 words, white or black"),
    EditOp("overlay_onto_screenshot", FRAMING,
           lambda im, rng, b: {"template": _choice(rng, ("web.png", "mobile.png")),
                               "crop_src_to_fit": bool(rng.random() < 0.5)},
           _apply_overlay_onto_screenshot, family="screenshot",
           description="AugLy overlay_onto_screenshot (web or mobile template), cropped to fit or not"),
    EditOp("overlay_onto_background", FRAMING, _sample_overlay_onto_background, _apply_overlay_onto_background,
           needs_backdrop=True, family="screenshot",
           description="pasted at 35-75 % of the height onto a negative source (never a reference)"),
    EditOp("jpeg", ENCODING, lambda im, rng, b: {"quality": int(rng.integers(10, 71))}, _apply_jpeg,
           family="jpeg", description="JPEG re-encode, quality 10-70"),
    EditOp("heavy_jpeg", ENCODING, lambda im, rng, b: {"quality": int(rng.integers(5, 21))}, _apply_jpeg,
           family="jpeg", description="JPEG re-encode, quality 5-20"),
]
#: every edit operation, by name
OPS: dict[str, EditOp] = {op.name: op for op in _OP_LIST}


@dataclass(frozen=True)
class Recipe:
    """A named edit set: which ops a query draws from, and how many (uniform in [min_ops, max_ops])."""

    name: str
    ops: tuple[str, ...]
    min_ops: int
    max_ops: int
    description: str


_MILD_OPS = ("crop", "rotate", "hflip", "aspect_ratio", "scale", "color_jitter", "brightness", "contrast",
             "saturation", "grayscale", "blur", "sharpen", "noise", "jpeg", "pad", "overlay_text",
             "overlay_emoji")
_HARD_OPS = ("small_crop", "mirror_rotate", "perspective", "skew", "aspect_ratio", "color_jitter",
             "saturation", "blur", "noise", "pixelization", "opacity", "overlay_text", "overlay_emoji",
             "overlay_stripes", "pad", "meme_format", "overlay_onto_screenshot", "overlay_onto_background",
             "heavy_jpeg")

#: named recipes for ``make_benchmark(recipe=...)``
RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("default", tuple(OPS), 1, 3, "every op, 1-3 per query (as devbench)"),
    Recipe("mild", _MILD_OPS, 1, 2, "photometric changes, light crops and overlays, 1-2 per query"),
    Recipe("hard", _HARD_OPS, 2, 4, "strong crops, geometry, overlays and framing, 2-4 per query"),
]}


def _get_recipe(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[recipe]


def _choose_ops(recipe: Recipe, rng: np.random.Generator, with_backdrops: bool) -> list[str]:
    candidates = [n for n in recipe.ops if with_backdrops or not OPS[n].needs_backdrop]
    chosen: list[str] = []
    for _ in range(int(rng.integers(recipe.min_ops, recipe.max_ops + 1))):
        if not candidates:
            break
        name = _choice(rng, candidates)
        chosen.append(name)
        family = OPS[name].family
        candidates = [n for n in candidates if n != name and (family is None or OPS[n].family != family)]
    return sorted(chosen, key=lambda n: OPS[n].stage)  # stable: random order within a stage


def edit(image: Image.Image, ops: Sequence[str], rng: np.random.Generator,
         backdrops: Backdrops | None = None) -> tuple[Image.Image, list[dict]]:
    """Apply the named ops in the given order with random parameters.

    Returns the edited RGB image and the records ``[{"op": name, "params": {...}}]`` that
    :func:`replay` turns back into the same image.
    """
    backdrops = backdrops or Backdrops()
    records = []
    image = image.convert("RGB")
    for name in ops:
        op = OPS[name]
        if op.needs_backdrop and not backdrops.names():
            raise ValueError(f"edit {name!r} needs backdrop images; pass backdrops=Backdrops({{name: path}})")
        params = op.sample(image, rng, backdrops)
        image = op.apply(image, params, backdrops).convert("RGB")
        records.append({"op": name, "params": params})
    return image, records


def random_edit(image: Image.Image, rng: np.random.Generator, recipe: str | Recipe = "default",
                backdrops: Backdrops | None = None) -> tuple[Image.Image, list[dict]]:
    """Draw 1-4 ops from ``recipe`` (skipping those needing backdrops if none) and :func:`edit`."""
    backdrops = backdrops or Backdrops()
    return edit(image, _choose_ops(_get_recipe(recipe), rng, bool(backdrops.names())), rng, backdrops)


def replay(image: Image.Image, records: Iterable[dict], backdrops: Backdrops | None = None) -> Image.Image:
    """Redo recorded edits (a list from :func:`edit` or the parsed ``ops`` column of edits.csv)."""
    backdrops = backdrops or Backdrops()
    image = image.convert("RGB")
    for record in records:
        image = OPS[record["op"]].apply(image, record["params"], backdrops).convert("RGB")
    return image

"""Image files -> RGB uint8 arrays, never crashing a batch job.

Every Pillow mode becomes RGB (alpha flattened onto white, 16-bit and float scaled to 8 bits,
CMYK converted), EXIF orientation is applied, animated files give their first frame, and a
pixel-count limit refuses decompression bombs before decoding. Anything that cannot be decoded
raises ``ImageLoadError`` naming the file and the reason; batch code catches it, reports the
file and goes on.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from .descriptors import IMAGE_SUFFIXES, image_id

#: default limit on width x height: 16k x 16k. DISC2021's largest images are far below this.
DEFAULT_MAX_PIXELS = 16384 * 16384
# Pillow warns above its own pixel limit; rdcd applies max_pixels itself (and names the file), so the
# warning is noise. A filter set once, not warnings.catch_warnings() per file, which swaps the global
# filter list and is not thread-safe (extract decodes in a thread).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, module=r"PIL\.")


class ImageLoadError(Exception):
    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _to_rgb(im: Image.Image, background=(255, 255, 255)) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(a.max()), 1.0)
        if mode in ("I", "F") and a.max() <= 255 and a.min() >= 0:
            top = 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, background + (255,))
        return Image.alpha_composite(canvas, im).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def open_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
               draft_size: int | None = None) -> Image.Image:
    """Decode one file to an RGB PIL image, or raise ImageLoadError saying why not.

    ``draft_size`` lets the JPEG decoder downscale by 1/2, 1/4 or 1/8 while keeping both sides
    >= draft_size (much faster for large photos that will be resized anyway).
    """
    path = Path(path)
    with _open_file(path) as fh:
        return _decode(fh, path, max_pixels, draft_size)


def decode_image(data: bytes, name: str = "upload", max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_size: int | None = None) -> Image.Image:
    """``open_image`` for bytes in memory (an upload); errors name ``name``."""
    if not data:
        raise ImageLoadError(name, "empty file (0 bytes)")
    return _decode(io.BytesIO(data), name, max_pixels, draft_size)


def _decode(source, name, max_pixels: int, draft_size: int | None) -> Image.Image:
    try:
        with Image.open(source) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageLoadError(name, f"too many pixels: {w}x{h} = {w * h} exceeds rdcd's limit of {max_pixels} "
                                           "(max_pixels, a decompression-bomb guard; raise it if the file is trusted)")
            if getattr(im, "is_animated", False):
                im.seek(0)
            if draft_size and im.format == "JPEG":
                im.draft("RGB", (draft_size, draft_size))
            im.load()
            im = ImageOps.exif_transpose(im) if im.getexif() else im
            rgb = _to_rgb(im)
            if rgb is im:
                rgb = im.copy()
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(name, f"too many pixels: {e} (Pillow's own guard, Image.MAX_IMAGE_PIXELS)") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError(name, "not an image file Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError,
            struct.error, ZeroDivisionError, KeyError, OverflowError) as e:
        raise ImageLoadError(name, f"{_damage(e)} image ({type(e).__name__}: {e})") from None
    return rgb


def _open_file(path: Path):
    """The file opened for reading, or ImageLoadError saying why not (not found, a directory,
    permission denied, empty)."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise ImageLoadError(path, "not found") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except OSError as e:
        raise ImageLoadError(path, f"cannot read file ({e.strerror or e})") from None
    if os.fstat(fh.fileno()).st_size == 0:
        fh.close()
        raise ImageLoadError(path, "empty file (0 bytes)")
    return fh


def _damage(error: BaseException) -> str:
    """'truncated' where the decoder ran out of data, else 'corrupt'."""
    text = str(error).lower()
    truncated = isinstance(error, EOFError) or any(
        word in text for word in ("truncated", "broken data stream", "not enough data", "premature end"))
    return "truncated" if truncated else "corrupt"


def resize_square(im: Image.Image, size: int) -> np.ndarray:
    """Resize to size x size (aspect not kept, as in the DISC2021 evaluations) -> uint8 (size, size, 3)."""
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR, reducing_gap=None)
    return np.asarray(im, dtype=np.uint8)


def load_image_array(path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, draft: bool = False) -> np.ndarray:
    return resize_square(open_image(path, max_pixels=max_pixels, draft_size=size if draft else None), size)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def list_images(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Image paths from a folder (recursive, sorted), a file list (one path per line, relative paths
    resolved against the list's folder), a single image file, or a Python sequence of paths."""
    if not isinstance(source, (str, os.PathLike)):
        return [Path(p) for p in source]
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.is_file() and is_image_name(p.name))
        if not paths:
            raise FileNotFoundError(f"{source}: folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return paths
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such folder or file")
    if is_image_name(source.name):
        return [source]
    paths = []
    with open(source, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line)
                paths.append(p if p.is_absolute() else source.parent / p)
    if not paths:
        raise ValueError(f"{source}: file list is empty")
    return paths


def check_unique_ids(paths: Sequence[Path]) -> list[str]:
    ids = [image_id(str(p)) for p in paths]
    seen: dict[str, Path] = {}
    for i, p in zip(ids, paths):
        if i in seen:
            raise ValueError(f"two images share the id {i!r}: {seen[i]} and {p}; ids are file stems and must be unique")
        seen[i] = p
    return ids

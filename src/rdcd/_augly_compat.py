"""Make AugLy 1.0.0's image functions work under Pillow >= 10 and numpy >= 1.24.

AugLy 1.0.0 (the latest release) calls two APIs that no longer exist:

* ``augly.image.functional.meme_format`` measures its caption with
  ``FreeTypeFont.getsize_multiline``, removed in Pillow 10 -> ``AttributeError``.
* ``augly.image.functional.perspective_transform`` calls
  ``augly.image.utils.compute_transform_coeffs``, which builds ``np.matrix(..., dtype=np.float)``;
  the ``np.float`` alias was removed in numpy 1.24 -> ``AttributeError``.

Every other function of ``augly.image.functional`` runs with its default arguments. One more
``np.float`` sits in ``augly.image.utils.bboxes`` (the bounding-box helper of
``perspective_transform``); it is only reached when ``bboxes=`` is passed, which rdcd never does,
and it is not patched here.

:func:`apply` repairs the two functions inside AugLy's own module namespace and nothing else:

* ``augly.image.functional.ImageFont`` (AugLy's reference to ``PIL.ImageFont``) is replaced by a
  stand-in whose ``truetype`` returns fonts that have ``getsize_multiline`` back, measured with
  ``ImageDraw.multiline_textbbox`` like Pillow 9 did. ``PIL.ImageFont`` itself is untouched, so no
  other code in the process sees a resurrected, deprecated method.
* ``augly.image.utils.compute_transform_coeffs`` is replaced by the same least-squares solve in
  float64.

Patching (rather than copying the two AugLy functions into rdcd) keeps AugLy's own code, assets
and class-based transforms (``augly.image.MemeFormat``, ``PerspectiveTransform``) usable as
documented. It is done by an explicit call, not at import, so importing rdcd never changes a
third-party module behind the user's back; :func:`apply` is idempotent and only patches what is
actually broken, so it becomes a no-op once AugLy or Pillow fix the problem.

AugLy is installed without its dependency pins (``pip install --no-deps augly``); on import it
needs ``iopath``, ``regex`` and ``python-magic``, and python-magic loads the system library
libmagic (Debian/Ubuntu: ``apt-get install libmagic1``; macOS: ``brew install libmagic``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["apply", "needed_patches", "compute_transform_coeffs"]


def _import_augly():
    try:
        import augly.image.functional as functional
        import augly.image.utils as imutils
    except ImportError as exc:  # magic raises ImportError when libmagic is missing
        raise ImportError(
            f"cannot import AugLy ({exc}). Install it with `pip install --no-deps augly==1.0.0` "
            "plus its runtime dependencies `pip install iopath regex python-magic`; python-magic "
            "needs the system libmagic (Debian/Ubuntu: `apt-get install libmagic1`)."
        ) from exc
    return functional, imutils


class _LegacyMetricsFont(ImageFont.FreeTypeFont):
    """A FreeType font that still answers Pillow 9's ``getsize_multiline``."""

    def getsize_multiline(self, text: str, direction=None, spacing: int = 4, features=None,
                          language=None, stroke_width: int = 0) -> tuple[int, int]:
        # Pillow 9 returned the right/bottom edge of the text drawn at (0, 0), offset included.
        draw = ImageDraw.Draw(Image.new("L", (1, 1)))
        _, _, right, bottom = draw.multiline_textbbox(
            (0, 0), text, font=self, spacing=spacing, direction=direction, features=features,
            language=language, stroke_width=stroke_width)
        return right, bottom


class _ImageFontForAugLy:
    """Stands in for ``PIL.ImageFont`` inside ``augly.image.functional`` only."""

    def __getattr__(self, name: str) -> Any:
        return getattr(ImageFont, name)

    @staticmethod
    def truetype(font=None, size: float = 10, index: int = 0, encoding: str = "",
                 layout_engine=None) -> _LegacyMetricsFont:
        return _LegacyMetricsFont(font, size, index, encoding, layout_engine)


def compute_transform_coeffs(src_coords, dst_coords) -> np.ndarray:
    """Coefficients of the perspective map sending ``dst_coords`` to ``src_coords`` (PIL order).

    Same equations as AugLy's version, solved in float64 instead of ``np.float``.
    """
    rows = []
    for (sx, sy), (dx, dy) in zip(src_coords, dst_coords):
        rows.append([dx, dy, 1, 0, 0, 0, -sx * dx, -sx * dy])
        rows.append([0, 0, 0, dx, dy, 1, -sy * dx, -sy * dy])
    a = np.asarray(rows, dtype=np.float64)
    b = np.asarray(src_coords, dtype=np.float64).reshape(8)
    coeffs, *_ = np.linalg.lstsq(a, b, rcond=None)
    return coeffs


def needed_patches() -> list[str]:
    """Names of the AugLy functions that are broken in this environment and not yet patched."""
    functional, imutils = _import_augly()
    needed = []
    if not hasattr(functional.ImageFont.truetype(_a_font_file(), 10), "getsize_multiline"):
        needed.append("meme_format")
    try:
        imutils.compute_transform_coeffs([(0, 0), (1, 0), (1, 1), (0, 1)],
                                         [(0, 0), (1, 0), (1, 1), (0, 1)])
    except AttributeError:
        needed.append("perspective_transform")
    return needed


def _a_font_file() -> str:
    from augly.utils import FONT_PATH

    return FONT_PATH


def apply() -> list[str]:
    """Patch AugLy's broken image functions in place; return the names patched by this call."""
    functional, imutils = _import_augly()
    needed = needed_patches()
    if "meme_format" in needed:
        functional.ImageFont = _ImageFontForAugLy()
    if "perspective_transform" in needed:
        import augly.image.utils.utils as imutils_impl

        imutils.compute_transform_coeffs = compute_transform_coeffs
        imutils_impl.compute_transform_coeffs = compute_transform_coeffs
    return needed

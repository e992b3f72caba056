"""AugLy's bundled overlay assets (fonts with their charsets, twemoji PNGs), listed in one place.

An asset is named by its path relative to AugLy's asset folder (``"NotoSans-Regular.ttf"``,
``"smileys/grinning_face.png"``), so names recorded in a benchmark's ``edits.csv`` stay valid on
another install; ``font_path`` / ``emoji_path`` turn a name into a file. Lists are sorted, so a
seeded choice picks the same asset on every machine. AugLy is imported only when an asset is
first needed (it is cheap: ``augly.utils`` pulls in neither torch nor numpy).
"""
from __future__ import annotations

import os
import pickle
from functools import lru_cache
from pathlib import Path

_REINSTALL = "AugLy's assets are missing; reinstall augly==1.0.0"


def fonts_dir() -> str:
    from augly.utils import FONTS_DIR

    return FONTS_DIR


def emoji_dir() -> str:
    from augly.utils import EMOJI_DIR

    return EMOJI_DIR


@lru_cache(maxsize=None)
def font_names() -> tuple[str, ...]:
    """AugLy's ``.ttf`` fonts that come with a charset (``.pkl`` beside them), sorted."""
    folder = fonts_dir()
    names = tuple(sorted(f for f in os.listdir(folder)
                         if f.endswith(".ttf") and os.path.exists(os.path.join(folder, f[:-4] + ".pkl"))))
    if not names:
        raise FileNotFoundError(f"{folder}: no .ttf fonts with .pkl charsets; {_REINSTALL}")
    return names


def font_path(name: str) -> str:
    return os.path.join(fonts_dir(), name)


@lru_cache(maxsize=None)
def font_charset(name: str) -> tuple[int, ...]:
    """Code points the font can draw, as AugLy lists them (its ``.pkl`` next to the ``.ttf``)."""
    with open(os.path.join(fonts_dir(), os.path.splitext(name)[0] + ".pkl"), "rb") as f:
        return tuple(pickle.load(f))


@lru_cache(maxsize=None)
def emoji_names() -> tuple[str, ...]:
    """AugLy's twemoji PNGs as ``category/file.png`` (POSIX separators), sorted."""
    root = Path(emoji_dir())
    names = tuple(sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")))
    if not names:
        raise FileNotFoundError(f"{root}: no emoji PNGs; {_REINSTALL}")
    return names


def emoji_path(name: str) -> str:
    return os.path.join(emoji_dir(), name)

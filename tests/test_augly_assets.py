"""AugLy's fonts and emoji, listed once for the training augmentations and the benchmark builder."""
import os
import subprocess
import sys

from rdcd.augly_assets import emoji_names, emoji_path, font_charset, font_names, font_path


def test_fonts_are_sorted_names_with_charsets():
    names = font_names()
    assert len(names) > 100 and list(names) == sorted(set(names))
    assert all("/" not in n and n.endswith(".ttf") and os.path.exists(font_path(n)) for n in names)
    assert {ord(c) for c in "Hello"} <= set(font_charset("NotoSans-Regular.ttf"))


def test_emoji_are_sorted_relative_names():
    names = emoji_names()
    assert len(names) > 100 and list(names) == sorted(set(names))
    assert all(n.endswith(".png") and not os.path.isabs(n) and os.path.isfile(emoji_path(n)) for n in names)


def test_listing_assets_does_not_import_torch():
    code = ("import sys; from rdcd import augly_assets as a; a.font_names(); a.emoji_names(); "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

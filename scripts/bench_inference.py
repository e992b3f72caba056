"""CPU inference speed of the students (PyTorch, ONNX fp32/fp16/int8) next to SSCD and sscd-distilled.

One run on one machine: model compute only (latency at batch 1, images/s at batch 32) and end to end
(JPEG files on disk -> descriptors, through ``rdcd.extract``), at 224 and 288 px; the student's
GFLOPs per image times its images/s against this machine's measured fp32 GEMM GFLOP/s; and the
input pipeline choices (JPEG draft decoding, resizing, DataLoader workers, threads, channels-last).
Times are the best of ``--repeats`` runs after a warm-up (the best is the least disturbed by other
processes). Markdown on stdout:

    python scripts/bench_inference.py > docs/bench_inference.md
    python scripts/bench_inference.py --student runs/rdcd-lite0-128.pt > docs/bench_inference.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
from functools import partial
import time
from pathlib import Path

import numpy as np
import torch

from rdcd.machine import cpu_model, interleaved_rates
from rdcd.export import export
from rdcd.extract import extract
from rdcd.images import list_images, load_image_array, open_image, resize_square
from rdcd.models import load_model, model_file
from rdcd.models.shipped import card_for, int8_file
from rdcd.models.student import OFFLINE_PRETRAINED, build_student, load_student, save_student
from timm.layers.conv2d_same import Conv2dSame
from rdcd.models.onnx import cpu_threads

DEVBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "devbench"


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (first-run allocations, ORT/oneDNN kernel selection)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def gemm_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / best_time(lambda: a @ b, repeats) / 1e9


def student_gflops(net, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9  # FlopCounterMode counts a multiply-add as 2 FLOPs


def compute_speed(model, images: np.ndarray, repeats: int) -> tuple[float, float]:
    """(latency at batch 1 in ms, images/s at batch 32) of model.embed on decoded images."""
    one, batch = images[:1], images[:32]
    latency = best_time(lambda: model.embed(one), repeats) * 1000
    throughput = len(batch) / best_time(lambda: model.embed(batch), repeats)
    return latency, throughput


def end_to_end(model, paths, size: int, repeats: int, workers: int = 0, draft: bool = True,
               prefetch: bool = True) -> float:
    """Images/s from JPEG files to descriptors through rdcd.extract (no output file; its defaults:
    no worker process on 2 cores, the next batch decoded in a thread, JPEG draft mode)."""
    seconds = best_time(lambda: extract(model, paths, size=size, batch_size=32, workers=workers, progress=False,
                                        draft=draft, prefetch=prefetch), repeats)
    return len(paths) / seconds


def student_variants(spec: str, work: Path, calibration: str):
    """(label, DescriptorModel) for every runtime/precision of one student."""
    if spec.startswith("student:"):  # an untrained student: fix its weights in a file first
        _, backbone, *rest = spec.split(":")
        torch.manual_seed(0)
        net = build_student(backbone, dim=int(rest[0]) if rest else 128, pretrained=backbone in OFFLINE_PRETRAINED,
                            name=spec)
        path = save_student(net, work / f"{backbone}.pt")
    else:
        path = model_file(spec) or Path(spec)  # a shipped model's name or a student file
        net = load_student(path)
    name = net.config.name or path.stem
    yield f"{name} PyTorch fp32", load_model(path)
    yield f"{name} ONNX fp32", load_model(export(path, work / f"{path.stem}.fp32.onnx"))
    if any(isinstance(m, Conv2dSame) for m in net.modules()):  # the graph before rdcd exported SAME_UPPER convs
        yield f"{name} ONNX fp32, Pad+Conv graph", load_model(export(path, work / f"{path.stem}.pad.onnx",
                                                                     same_upper=False))
    int8, _ = int8_file(card_for(path))
    if int8 is not None:  # what `rdcd extract` runs for a shipped model on a CPU
        yield f"{name} shipped int8 file (rdcd extract default)", load_model(int8)
    yield f"{name} ONNX int8 QOperator", load_model(export(path, work / f"{path.stem}.int8.onnx", precision="int8",
                                                           calibration=calibration, calibration_size=64))
    yield f"{name} ONNX int8 QDQ", load_model(export(path, work / f"{path.stem}.int8qdq.onnx", precision="int8",
                                                     calibration=calibration, calibration_size=64,
                                                     quant_format="qdq"))
    yield f"{name} ONNX fp16", load_model(export(path, work / f"{path.stem}.fp16.onnx", precision="fp16"))


def pipeline_rows(student_file: Path, paths, size: int, repeats: int, threads: int, work: Path,
                  sizes=()) -> list[str]:
    """Input pipeline and runtime settings, one change at a time, for one student at one size."""
    rows = []
    big = work / "large"
    big.mkdir(exist_ok=True)
    for p in paths[:32]:  # camera-sized JPEGs (the devbench files are <= 384 px on the short side)
        im = open_image(p)
        im.resize((im.width * 4, im.height * 4)).save(big / p.name, quality=90)
    large = list_images(big)

    def per_image_ms(fn, files):
        return best_time(lambda: [fn(f) for f in files], repeats) / len(files) * 1000

    for label, files in [("devbench files (<= 384 px)", paths[:32]), ("4x upscaled JPEGs (~1500 px)", large)]:
        # draft mode only downscales where both sides stay >= the input size: never for devbench files at 288
        full = per_image_ms(lambda f: open_image(f), files)
        draft = per_image_ms(lambda f: open_image(f, draft_size=size), files)
        both = per_image_ms(lambda f: load_image_array(f, size), files)
        both_draft = per_image_ms(lambda f: load_image_array(f, size, draft=True), files)
        rows.append(f"| decode, {label} | {full:.2f} ms/img | draft mode: {draft:.2f} ms/img |")
        rows.append(f"| decode + resize to {size}, {label} | {both:.2f} ms/img | draft mode: {both_draft:.2f} ms/img |")
    decoded = [open_image(f) for f in paths[:32]]
    resize = best_time(lambda: [resize_square(im, size) for im in decoded], repeats) / len(decoded) * 1000
    rows.append(f"| resize only (bilinear, PIL) | {resize:.2f} ms/img | |")

    pt, onnx = load_model(student_file), load_model(export(student_file, work / "pipeline.onnx"))
    images = np.stack([load_image_array(p, size) for p in paths[:32]])
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        pt_speed = len(images) / best_time(lambda: pt.embed(images), repeats)
        ort_n = load_model(work / "pipeline.onnx", threads=n)
        ort_speed = len(images) / best_time(lambda: ort_n.embed(images), repeats)
        rows.append(f"| {n} thread(s), batch 32 | PyTorch {pt_speed:.1f} img/s | ONNX Runtime {ort_speed:.1f} img/s |")
    torch.set_num_threads(threads)
    contiguous = load_model(student_file)
    contiguous.channels_last = False
    contiguous.module = contiguous.module.to(memory_format=torch.contiguous_format)
    cl = len(images) / best_time(lambda: pt.embed(images), repeats)
    nchw = len(images) / best_time(lambda: contiguous.embed(images), repeats)
    rows.append(f"| PyTorch memory format, batch 32 | channels-last {cl:.1f} img/s | contiguous NCHW {nchw:.1f} img/s |")
    for batch in (8, 32, 64):
        imgs = np.concatenate([images] * 2)[:batch]
        speed = batch / best_time(lambda: onnx.embed(imgs), repeats)
        rows.append(f"| ONNX Runtime, batch {batch} | {speed:.1f} img/s | |")
    no_prefetch = end_to_end(onnx, paths, size, repeats, prefetch=False)
    for workers in (0, 1, 2):
        e2e = end_to_end(onnx, paths, size, repeats, workers=workers)
        alternative = f"no prefetch thread: {no_prefetch:.1f} img/s" if workers == 0 else ""
        rows.append(f"| end to end (ONNX fp32), DataLoader workers={workers} | {e2e:.1f} img/s | {alternative} |")
    quiet = load_model(work / "pipeline.onnx", spinning=False)
    spin_off = end_to_end(quiet, paths, size, repeats)
    rows.append(f"| end to end (ONNX fp32), ONNX Runtime threads spin while idle (its default) | "
                f"{end_to_end(onnx, paths, size, repeats):.1f} img/s | spinning off: {spin_off:.1f} img/s |")
    e2e_large = end_to_end(onnx, large, size, repeats, draft=False)
    e2e_large_draft = end_to_end(onnx, large, size, repeats)
    rows.append(f"| end to end (ONNX fp32), ~1500 px JPEGs, every pixel decoded (--exact-decode) | "
                f"{e2e_large:.1f} img/s | draft mode (the default): {e2e_large_draft:.1f} img/s |")
    for small in sorted({min(sizes or [size]), size}):
        exact = end_to_end(onnx, paths, small, repeats, draft=False)
        rows.append(f"| end to end (ONNX fp32) at {small} px, devbench files, every pixel decoded | {exact:.1f} img/s | "
                    f"draft mode (the default): {end_to_end(onnx, paths, small, repeats):.1f} img/s |")
    return rows


def interleaved_targets(students: list[str], paths, sizes, rounds: int) -> list[str]:
    """The end-to-end speed ratios of the targets, robust to this machine's drift: every round runs each model once
    (rdcd extract's default path for each student, the first one's ONNX fp32 path, SSCD,
    sscd-distilled) on the same files, so a slow spell hits all of them; the ratio is the median of
    the per-round ratios."""
    from rdcd.export import onnx_runtime_model
    from rdcd.models.runtime import resolve_runtime

    models, defaults, notes = {}, [], []
    for i, student in enumerate(students):
        resolved = resolve_runtime(student)
        default, how = resolved.model, resolved.how
        label = "student (rdcd extract default)" if i == 0 else f"{default.name} (rdcd extract default)"
        models[label] = default
        defaults.append(label)
        notes.append(f"`{student}`: {how}")
        if i == 0:
            models["student ONNX fp32"] = onnx_runtime_model(load_model(student))
    models.update({"sscd": load_model("sscd"), "sscd-distilled": load_model("sscd-distilled")})
    ratio_heads = [f"{'default' if i == 0 else models[d].name} / {ref}" for i, d in enumerate(defaults)
                   for ref in ("SSCD", "sscd-distilled")]
    rows = [f"Students, rdcd extract's default path: {'; '.join(notes)}. {rounds} rounds, each model once per "
            f"round on the same {len(paths)} files (after one warm-up run each); images/s median (best); ratio = "
            "median over rounds of the ratio within the round.", "",
            "| size | " + " | ".join(f"{m} img/s" for m in models) + " | " + " | ".join(ratio_heads)
            + " | fp32 / SSCD |", "|---" * (len(models) + len(ratio_heads) + 2) + "|"]
    for size in sizes:
        for model in models.values():  # warm-up, on fewer files
            extract(model, paths[:32], size=size, progress=False)
        sp = interleaved_rates({m: partial(extract, model, paths, size=size, batch_size=32, progress=False)
                                for m, model in models.items()}, len(paths), rounds, warmup=False)
        t, p = sp["sscd"], sp["sscd-distilled"]
        cells = [f"{np.median(v):.1f} ({v.max():.1f})" for v in sp.values()]
        ratios = [f"{np.median(sp[d] / ref):.2f}x" for d in defaults for ref in (t, p)]
        rows.append(f"| {size} | " + " | ".join(cells + ratios) + f" | {np.median(sp['student ONNX fp32'] / t):.2f}x |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", action="append", default=None,
                    help="rdcd student .pt file, shipped model name or student:BACKBONE:DIM spec (repeatable: "
                         "the interleaved targets then time each one's default path too; default: the default "
                         "shipped student's weights file)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 288])
    ap.add_argument("--images", default=str(DEVBENCH / "queries"), help="JPEG folder for end-to-end timing")
    ap.add_argument("--calibration", default=str(DEVBENCH.parent / "train"),
                    help="int8 calibration images (default: the training pool, never the benchmark)")
    ap.add_argument("--n-images", type=int, default=192, help="images per end-to-end run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=cpu_threads())
    ap.add_argument("--no-teachers", action="store_true", help="skip sscd and sscd-distilled")
    ap.add_argument("--no-pipeline", action="store_true", help="skip the input-pipeline section")
    ap.add_argument("--target-rounds", type=int, default=5,
                    help="rounds of the interleaved end-to-end comparison (the speed targets; 0 skips it)")
    ap.add_argument("--targets-only", action="store_true", help="run only the interleaved comparison")
    args = ap.parse_args(argv)
    students = args.student or [str(model_file("rdcd-default"))]  # the default shipped student
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    paths = list_images(args.images)[:args.n_images]
    load_before = os.getloadavg()
    started = time.time()

    out = ["# CPU inference benchmark\n",
           f"`{shlex.join(['python', 'scripts/bench_inference.py'] + sys.argv[1:])}`\n",
           f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
           f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores, {args.threads} thread(s) used",
           f"- torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, "
           f"Python {platform.python_version()}",
           f"- end to end: {len(paths)} JPEGs from `{args.images}`, decoded with rdcd's loader, resized, batch 32, "
           f"DataLoader workers 0, next batch decoded in a thread, JPEG draft mode (rdcd extract's defaults here); compute only: the same images already decoded",
           f"- times: best of {args.repeats} after a warm-up"]
    gemm = gemm_gflops(args.threads)
    out.append(f"- measured fp32 GEMM (2048x2048 matmul, torch, {args.threads} threads): {gemm:.1f} GFLOP/s\n")

    if args.targets_only and (args.no_teachers or not args.target_rounds):
        ap.error("--targets-only compares with SSCD and sscd-distilled: drop --no-teachers, keep --target-rounds > 0")
    if args.target_rounds and not args.no_teachers:
        out += ["## Targets, interleaved (end to end, file on disk to descriptor)", ""]
        out += interleaved_targets(students, paths, args.sizes, args.target_rounds)
        out.append("")
    if not args.targets_only:
        with tempfile.TemporaryDirectory(prefix="rdcd-bench-") as tmp:
            work = Path(tmp)
            decoded = {s: np.stack([load_image_array(p, s) for p in paths[:32]]) for s in args.sizes}
            models = []
            for spec in students:
                models.extend(student_variants(spec, work, args.calibration))
            if not args.no_teachers:
                models += [("sscd (SSCD R50 teacher, int8 ONNX)", load_model("sscd")),
                           ("sscd-distilled (peer, ONNX)", load_model("sscd-distilled"))]
            head = "| model | " + " | ".join(f"{s}px b1 ms | {s}px b32 img/s | {s}px end-to-end img/s"
                                            for s in args.sizes) + " |"
            out += ["## Speed", "", head, "|---" * (1 + 3 * len(args.sizes)) + "|"]
            speeds = {}
            for label, model in models:
                cells = []
                for s in args.sizes:
                    lat, thr = compute_speed(model, decoded[s], args.repeats)
                    e2e = end_to_end(model, paths, s, args.repeats)
                    speeds[label, s] = (thr, e2e)
                    cells += [f"{lat:.1f}", f"{thr:.1f}", f"{e2e:.1f}"]
                out.append(f"| {label} | " + " | ".join(cells) + " |")
                print(out[-1], file=sys.stderr, flush=True)

            out += ["", "## Student compute vs the hardware", "",
                    "| student | size | GFLOPs/img | PyTorch fp32 img/s | achieved GFLOP/s | % of GEMM peak | "
                    "ONNX fp32 img/s | achieved GFLOP/s | % of GEMM peak |", "|---" * 9 + "|"]
            for label, model in models:
                if not label.endswith("PyTorch fp32"):
                    continue
                name = label[:-len(" PyTorch fp32")]
                for s in args.sizes:
                    gf = student_gflops(model.net, s)
                    pt, ox = speeds[label, s][0], speeds[f"{name} ONNX fp32", s][0]
                    out.append(f"| {name} | {s} | {gf:.2f} | {pt:.1f} | {gf * pt:.1f} | {100 * gf * pt / gemm:.0f}% | "
                               f"{ox:.1f} | {gf * ox:.1f} | {100 * gf * ox / gemm:.0f}% |")

            out += ["", "## Targets", ""]
            sscd_label = "sscd (SSCD R50 teacher, int8 ONNX)"
            for label, _ in models:
                if args.no_teachers or not label.endswith(("ONNX fp32", "ONNX int8 QDQ", "(rdcd extract default)")):
                    continue
                for s in args.sizes:
                    e2e, t_e2e = speeds[label, s][1], speeds[sscd_label, s][1]
                    peer = speeds["sscd-distilled (peer, ONNX)", s][1]
                    out.append(f"- {s}px end to end: {label} {e2e:.1f} img/s = {e2e / t_e2e:.1f}x SSCD ({t_e2e:.1f}; "
                               f"target >= 4x: {'met' if e2e >= 4 * t_e2e else 'NOT met'}), "
                               f"{e2e / peer:.2f}x sscd-distilled ({peer:.1f}; target > 1x: "
                               f"{'met' if e2e > peer else 'NOT met'})")

            if not args.no_pipeline:
                s = max(args.sizes)
                first = next(m for label, m in models if label.endswith("PyTorch fp32"))
                student_file = work / "pipeline_student.pt"
                save_student(first.net, student_file)
                out += ["", f"## Input pipeline and runtime settings ({first.name}, {s}px)", "",
                        "| what | measured | alternative |", "|---|---|---|"]
                out += pipeline_rows(student_file, paths, s, args.repeats, args.threads, work, args.sizes)

    load_after = os.getloadavg()
    out += ["", f"Load average (1 min) at start {load_before[0]:.1f}, at end {load_after[0]:.1f} on "
                f"{os.cpu_count()} cores; run took {time.time() - started:.0f} s. A load above the core count "
                "means other processes (e.g. a training job) shared the CPU and the numbers are lower than "
                "on an idle machine; ratios between rows measured in the same run are the reliable part."]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

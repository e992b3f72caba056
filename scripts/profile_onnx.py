"""Where an exported student spends its ONNX Runtime time: share of each op type, for timm's
Pad+Conv graph (``ExportConfig(same_upper=False)``) and rdcd's SAME_UPPER graph, fp32 and int8.

    python scripts/profile_onnx.py [--model rdcd-tf_efficientnet_lite0-128] [--size 288] [--calibration runs/split/train.txt]

One batch of 32 random images, 2 threads, 3 profiled runs after a warm-up (ONNX Runtime's profiler;
its own overhead makes the totals larger than plain timings, the shares are what this is for).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rdcd.export import export


def op_shares(path: Path, size: int, runs: int = 3) -> tuple[float, dict[str, float]]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).integers(0, 256, (32, size, size, 3), dtype=np.uint8)
    for _ in range(runs + 1):
        session.run(None, {session.get_inputs()[0].name: x})
    trace = session.end_profiling()
    by_op: collections.Counter = collections.Counter()
    for event in json.loads(Path(trace).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    os.remove(trace)
    total = sum(by_op.values())
    return total / (runs + 1) / 1000, {op: 100 * t / total for op, t in by_op.most_common()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="rdcd-tf_efficientnet_lite0-128")
    ap.add_argument("--size", type=int, default=288)
    ap.add_argument("--calibration", default="runs/split/train.txt")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rdcd-profile-") as tmp:
        for same_upper in (False, True):
            for precision in ("fp32", "int8"):
                extra = {"calibration": args.calibration} if precision == "int8" else {}
                path = export(args.model, Path(tmp) / f"{precision}-{same_upper}.onnx", precision=precision,
                              same_upper=same_upper, **extra)
                ms, shares = op_shares(path, args.size)
                graph = "SAME_UPPER" if same_upper else "Pad+Conv"
                print(f"{graph} {precision}: {ms:.0f} ms per profiled batch; "
                      + ", ".join(f"{op} {share:.1f}%" for op, share in list(shares.items())[:7]), flush=True)


if __name__ == "__main__":
    main()

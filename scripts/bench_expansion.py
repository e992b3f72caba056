"""How fast would the student be with smaller expansion ratios? A planning measurement for a pruned
student (target: faster than sscd-distilled), speed only, untrained networks.

tf_efficientnet_lite0's inverted-residual blocks expand their channels 6x ("e6"); this builds the
same network with e4 and e3 (what keeping the top 2/3 or 1/2 of each block's expansion channels of
the shipped student would give), exports each to ONNX with rdcd's SAME_UPPER convolutions, quantises
it to int8 (QDQ, every layer, random calibration: speed does not depend on the values), and times
batch 32 at 160 and 288 px, 5 interleaved rounds (median images/s). ``mobilenetv2_100`` (untrained
here; its ImageNet weights exist on PyPI) is timed the same way for comparison.

    python scripts/bench_expansion.py
"""

from __future__ import annotations

import tempfile
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import timm.models.efficientnet as effnet
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static
from timm.models._efficientnet_builder import decode_arch_def, resolve_act_layer, resolve_bn_args, round_channels
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rdcd.export import _register_onnx_symbolics, fuse_same_padding
from rdcd.machine import interleaved_rates


def lite0(expansion: int) -> nn.Module:
    """timm's tf_efficientnet_lite0 (no classifier) with every inverted-residual block expanding ``expansion``x."""
    arch = [["ds_r1_k3_s1_e1_c16"], [f"ir_r2_k3_s2_e{expansion}_c24"], [f"ir_r2_k5_s2_e{expansion}_c40"],
            [f"ir_r3_k3_s2_e{expansion}_c80"], [f"ir_r3_k5_s1_e{expansion}_c112"], [f"ir_r4_k5_s2_e{expansion}_c192"],
            [f"ir_r1_k3_s1_e{expansion}_c320"]]
    return effnet.EfficientNet(
        block_args=decode_arch_def(arch, 1.0, fix_first_last=True), num_features=1280, stem_size=32, fix_stem=True,
        round_chs_fn=partial(round_channels, multiplier=1.0), act_layer=resolve_act_layer({}, "relu6"),
        norm_layer=partial(nn.BatchNorm2d, **resolve_bn_args({"bn_eps": 1e-3})), pad_type="same",
        num_classes=0).eval()


def label(expansion) -> str:
    return f"lite0 e{expansion}" if isinstance(expansion, int) else expansion


class RandomBatches(CalibrationDataReader):
    def __init__(self):
        self.batches = iter([{"x": np.random.rand(8, 3, 160, 160).astype(np.float32)} for _ in range(2)])

    def get_next(self):
        return next(self.batches, None)


def int8_session(net: nn.Module, path: Path) -> ort.InferenceSession:
    """Export ``net`` (SAME_UPPER convolutions) to ``path``, quantise it (QDQ, every layer, random
    calibration) and open it with 2 threads."""
    fuse_same_padding(net)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(2, 3, 160, 160),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})
    quant_pre_process(str(path), str(path.with_suffix(".pre.onnx")), skip_symbolic_shape=True)
    quantize_static(str(path.with_suffix(".pre.onnx")), str(path.with_suffix(".int8.onnx")), RandomBatches(),
                    quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path.with_suffix(".int8.onnx")), opts, providers=["CPUExecutionProvider"])


def interleaved(sessions: dict, sizes=(160, 288), rounds: int = 5) -> dict:
    """Median images/s of each session at batch 32, ``rounds`` rounds, every session once per round."""
    result = {}
    for size in sizes:
        x = np.random.rand(32, 3, size, size).astype(np.float32)
        rates = interleaved_rates({e: partial(s.run, None, {"x": x}) for e, s in sessions.items()}, 32, rounds)
        result[size] = {e: float(np.median(v)) for e, v in rates.items()}
    return result


def main() -> None:
    torch.set_num_threads(2)
    _register_onnx_symbolics()
    sessions = {}
    with tempfile.TemporaryDirectory(prefix="rdcd-expansion-") as tmp:
        for expansion in (6, 4, 3, "mobilenetv2_100"):  # and the lighter backbone with ImageNet weights on PyPI
            net = lite0(expansion) if isinstance(expansion, int) else timm.create_model(expansion, num_classes=0).eval()
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                net(torch.zeros(1, 3, 288, 288))
            sessions[expansion] = int8_session(net, Path(tmp) / f"e{expansion}.onnx")
            print(f"{label(expansion)}: {counter.get_total_flops() / 1e9:.2f} GFLOPs per image at 288 px", flush=True)
        for size, speed in interleaved(sessions).items():
            print(f"{size} px, int8 batch 32, images/s: "
                  + ", ".join(f"{label(e)} {v:.1f}" for e, v in speed.items()), flush=True)


if __name__ == "__main__":
    main()

"""Export: ONNX / TorchScript files match PyTorch, have dynamic batch and size, carry their metadata,
load back through load_model / `rdcd extract`, and are written atomically."""
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import DEVBENCH, SHARED, picture
from rdcd.descriptors import read_descriptors
from rdcd.export import export
from rdcd.models import load_model
from rdcd.models.student import build_student, save_student
from rdcd.models.onnx import OnnxModel
from rdcd.models.sscd_torch import TorchScriptModel


def pictures(first: int, n: int, size: int) -> np.ndarray:
    return np.stack([np.asarray(picture(first + i, (size, size))) for i in range(n)])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def student_file(tmp_path_factory):
    """A MobileNetV3 student at 64 px whose batch-norm statistics come from pictures (a random
    network with untouched statistics maps every image to nearly the same descriptor)."""
    import torch

    torch.manual_seed(0)
    net = build_student("mobilenetv3_large_100", dim=32, kd_dim=64, input_size=64, name="tiny-mnv3")
    x = torch.from_numpy(pictures(500, 32, 64)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(net.config.mean).view(1, 3, 1, 1)) / torch.tensor(net.config.std).view(1, 3, 1, 1)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the one batch
    net.train()
    with torch.no_grad():
        net(x)
    path = tmp_path_factory.mktemp("export") / "student.pt"
    save_student(net.eval(), path)
    return path


@pytest.fixture(scope="module")
def reference(student_file):
    return load_model(student_file)


@pytest.fixture(scope="module")
def onnx_fp32(student_file, tmp_path_factory):
    return export(student_file, tmp_path_factory.mktemp("onnx") / "student.onnx")


def test_onnx_fp32_matches_pytorch_for_any_batch_and_size(onnx_fp32, reference):
    model = load_model(onnx_fp32)
    assert isinstance(model, OnnxModel) and model.layout == "uint8-nhwc"
    for batch, size in [(1, 64), (5, 64), (1, 96), (5, 96)]:
        images = pictures(10, batch, size)
        got, want = model.embed(images), reference.embed(images)
        assert got.shape == (batch, 32)
        assert cosines(got, want).min() >= 0.9999, (batch, size)


def test_onnx_graph_does_normalisation_and_l2_inside(onnx_fp32, reference):
    session = ort.InferenceSession(str(onnx_fp32))
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, out.name, out.type) == ("image", "tensor(uint8)", "embedding", "tensor(float)")
    assert inp.shape[0] == "batch" and inp.shape[1:3] == ["height", "width"] and inp.shape[3] == 3
    images = pictures(20, 3, 80)
    raw = session.run(None, {"image": images})[0]  # the raw graph output, no rdcd code in between
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), 1, atol=1e-5)
    assert cosines(raw, reference.embed(images)).min() >= 0.9999


def test_onnx_metadata(onnx_fp32, student_file):
    meta = {p.key: p.value for p in onnx.load(str(onnx_fp32)).metadata_props}
    assert meta["rdcd.input_size"] == "64" and meta["rdcd.dim"] == "32" and meta["rdcd.name"] == "tiny-mnv3"
    assert json.loads(meta["rdcd.mean"]) == [0.485, 0.456, 0.406]
    assert json.loads(meta["rdcd.std"]) == [0.229, 0.224, 0.225]
    assert meta["rdcd.input_convention"].startswith("uint8 RGB NHWC")
    assert meta["rdcd.precision"] == "fp32"
    assert json.loads(meta["rdcd.config"])["backbone"] == "mobilenetv3_large_100"
    assert json.loads(meta["rdcd.export"])["format"] == "onnx"
    assert load_model(onnx_fp32).input_size == 64


@pytest.mark.slow
def test_torchscript_equals_pytorch(student_file, reference, tmp_path):
    path = export(student_file, tmp_path / "student.torchscript.pt", format="torchscript")
    model = load_model(path)
    assert isinstance(model, TorchScriptModel)
    assert (model.name, model.input_size, model.dim) == ("tiny-mnv3", 64, 32)
    assert model.mean == reference.mean and model.std == reference.std
    for batch, size in [(1, 64), (5, 96)]:
        images = pictures(30, batch, size)
        np.testing.assert_allclose(model.embed(images), reference.embed(images), atol=1e-5)


@pytest.mark.slow
def test_int8_close_to_fp32_and_keeps_neighbours(tmp_path):
    import torch

    # int8 on an ImageNet-initialised backbone, as `student:tf_efficientnet_lite0` builds (a random one
    # is too fragile for any precision change to mean much)
    torch.manual_seed(0)
    net = build_student("tf_efficientnet_lite0", dim=32, kd_dim=64, input_size=64, pretrained=True)
    student = save_student(net, tmp_path / "lite0.pt")
    calib = tmp_path / "calibration"
    calib.mkdir()
    for i in range(40):
        picture(200 + i, (120, 90)).save(calib / f"c{i:02d}.jpg", quality=90)
    (calib / "broken.jpg").write_bytes(b"not a jpeg")  # skipped, not fatal
    path = export(student, tmp_path / "lite0.int8.onnx", precision="int8", calibration=calib)
    graph = onnx.load(str(path))
    assert any(n.op_type == "DequantizeLinear" for n in graph.graph.node), "no quantised layer in the graph"
    assert {p.key: p.value for p in graph.metadata_props}["rdcd.precision"] == "int8"
    images = pictures(300, 24, 64)
    got, want = load_model(path).embed(images), load_model(student).embed(images)
    # An untrained head makes the descriptor very sensitive to any change of input or activations
    # (+-2 grey levels of pixel noise give a lower cosine than int8 does), so a trained model's 0.99
    # is out of reach here: measured mean 0.983 and 24 of 24 nearest neighbours kept with the default
    # float_layers=3 (0.953 and 21 of 24 with every layer quantised), 2026-11-27. The trained model:
    # test_int8_of_the_shipped_students_is_within_parity.
    assert cosines(got, want).mean() >= 0.95
    assert np.mean((got @ want.T).argmax(axis=1) == np.arange(len(images))) >= 0.9


@pytest.mark.slow
def test_fp16_close_to_fp32(student_file, reference, tmp_path):
    path = export(student_file, tmp_path / "student.fp16.onnx", precision="fp16")
    images = pictures(40, 5, 64)
    assert cosines(load_model(path).embed(images), reference.embed(images)).min() >= 0.999


def test_bad_requests_say_what_to_do(student_file, tmp_path):
    with pytest.raises(ValueError, match="--calibration"):
        export(student_file, tmp_path / "x.onnx", precision="int8")
    with pytest.raises(ValueError, match="fp32 only"):
        export(student_file, tmp_path / "x.pt", format="torchscript", precision="fp16")
    with pytest.raises(ValueError, match="only PyTorch models"):
        export("phash", tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="float_layers"):
        export(student_file, tmp_path / "x.onnx", precision="int8", calibration=str(tmp_path), float_layers=-1)
    assert not list(tmp_path.iterdir())


def test_int8_nodes_keep_the_first_weighted_layers_in_float(onnx_fp32):
    from rdcd.export import int8_nodes

    graph = onnx.load(str(onnx_fp32)).graph
    op = {n.name: n.op_type for n in graph.node}
    weighted = [n for n in int8_nodes(graph) if op[n] in ("Conv", "MatMul", "Gemm")]
    assert len(weighted) >= 4
    kept = int8_nodes(graph, float_layers=3)
    assert [n for n in kept if op[n] in ("Conv", "MatMul", "Gemm")] == weighted[3:]
    assert kept[0] == weighted[3]  # nothing before the 4th weighted layer (its activations included) is quantised
    with pytest.raises(ValueError, match="none left to quantise"):
        int8_nodes(graph, float_layers=len(weighted))


def test_tf_same_padding_exports_as_same_upper_convs_with_identical_outputs(tmp_path):
    """timm's dynamic TF "same" padding (Conv2dSame: Pad then Conv) exports as Conv(auto_pad=SAME_UPPER)
    with no Pad before it, and the outputs equal PyTorch's for even and odd sizes (where the padding
    differs: stride 2, kernels 3 and 5). A dilated one keeps its Pad (ONNX Runtime refuses auto_pad
    with dilation)."""
    import torch
    from timm.layers.conv2d_same import Conv2dSame

    from rdcd.export import ExportConfig, SourceModel, export_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(Conv2dSame(3, 8, 3, stride=2, bias=False), torch.nn.ReLU(),
                              Conv2dSame(8, 8, 5, stride=2, groups=8), torch.nn.ReLU(),
                              Conv2dSame(8, 6, 3, stride=1, dilation=2), torch.nn.Flatten(2)).eval()

    class Head(torch.nn.Module):  # keep positions: a border error must show in the output
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)[:, :, :4].flatten(1)

    src = SourceModel(Head().eval(), "same-test", 24, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), {})
    fused = export_onnx(src, tmp_path / "fused.onnx", ExportConfig())
    padded = export_onnx(src, tmp_path / "padded.onnx", ExportConfig(same_upper=False))
    ops = [n.op_type for n in onnx.load(str(fused)).graph.node]
    assert ops.count("Pad") == 1 and ops.count("Conv") == 3  # the dilated layer's
    auto_pad = [a.s for n in onnx.load(str(fused)).graph.node if n.op_type == "Conv"
                for a in n.attribute if a.name == "auto_pad"]
    assert auto_pad == [b"SAME_UPPER", b"SAME_UPPER"]
    assert "Pad" in [n.op_type for n in onnx.load(str(padded)).graph.node]  # timm's form, for comparison
    rng = np.random.default_rng(0)
    for h, w in [(32, 32), (33, 31), (17, 40), (9, 9)]:
        images = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
        with torch.no_grad():
            want = torch.nn.functional.normalize(src.network(x), dim=1).numpy()
        for path in (fused, padded):
            got = ort.InferenceSession(str(path)).run(None, {"image": images})[0]
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{path.name} at {h}x{w}")
    # the real backbone: every Conv2dSame of tf_efficientnet_lite0 becomes SAME_UPPER (timm builds 5)
    from rdcd.export import fuse_same_padding

    assert fuse_same_padding(build_student("tf_efficientnet_lite0", dim=8, kd_dim=16, input_size=64)) == 5


def test_interrupted_export_leaves_no_file(student_file, tmp_path, monkeypatch):
    def killed(graph, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"half a model")
        raise KeyboardInterrupt("simulated kill while writing")

    monkeypatch.setattr(onnx, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        export(student_file, tmp_path / "student.onnx")
    assert not list(tmp_path.iterdir()), "a partial or temporary file was left behind"


@pytest.mark.slow
def test_cli_export_then_extract(student_file, image_folder, tmp_path):
    out = tmp_path / "cli.onnx"
    run = [sys.executable, "-m", "rdcd"]
    res = subprocess.run(run + ["export", "--model", str(student_file), "--output", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run(run + ["extract", "--model", str(out), "--images", str(image_folder), "--output",
                                str(tmp_path / "d.npy")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    ids, vec = read_descriptors(tmp_path / "d.npy")
    want = load_model(student_file)
    from rdcd.images import load_image_array

    images = np.stack([load_image_array(image_folder / f"{i}.jpg", 64) for i in ids])
    assert cosines(vec, want.embed(images)).min() >= 0.9999


@pytest.mark.slow
def test_extract_runs_a_student_file_through_cached_onnx_runtime(student_file, image_folder, tmp_path, monkeypatch,
                                                                   capsys):
    from rdcd.extract import extract

    monkeypatch.setenv("RDCD_CACHE_DIR", str(tmp_path / "cache"))
    fast = extract(student_file, image_folder, size=64)
    assert "runs with ONNX Runtime" in capsys.readouterr().err
    cached = list((tmp_path / "cache" / "onnx").glob("*.onnx"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    again = extract(student_file, image_folder, size=64, progress=False)
    assert cached[0].stat().st_mtime_ns == stamp, "the cached export must be reused, not rewritten"
    slow = extract(student_file, image_folder, size=64, runtime="torch")
    assert "runs with PyTorch" in capsys.readouterr().err
    assert fast.ids == slow.ids == again.ids
    assert cosines(fast.vectors, slow.vectors).min() >= 0.9999
    np.testing.assert_allclose(fast.vectors, slow.vectors, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "train").is_dir() or not DEVBENCH.is_dir(), reason="shared images not available")
def test_int8_of_the_shipped_students_is_within_parity(tmp_path):
    """The target for int8 descriptors: a mean cosine to fp32 >= 0.99. What ships: every shipped
    int8 file against its fp32 weights on 48 devbench references (calibration never saw them).
    What `rdcd export` makes: the shallow student exported again with the settings its card records,
    but calibrated on the whole training pool instead of the training split, lands close to the
    shipped file. Measured 2026-11-27: shipped files 0.992-0.993 (the shallow default 0.9923); its
    re-export 0.9894 (MinMax calibration moves with the calibration set: 0.989-0.993 over the sets
    tried, docs/export.md); with 7-bit weights it was 0.9887."""
    from rdcd.export import ExportConfig, calibration_images
    from rdcd.models.runtime import resolve_runtime
    from rdcd.models.shipped import card_for, shipped_cards

    images = calibration_images(DEVBENCH / "references", 160, 48)
    students = [card for card in shipped_cards() if card.int8 is not None]  # projections ship no int8 file
    assert len(students) == 4
    for card in students:
        int8 = resolve_runtime(card.name, precision="int8").model
        got, want = int8.embed(images), load_model(card.name).embed(images)
        assert cosines(got, want).mean() >= 0.99, card.name
        assert np.mean((got @ want.T).argmax(axis=1) == np.arange(len(images))) >= 0.95, card.name
    shallow = "rdcd-tf_efficientnet_lite0-shallow-128"  # the fastest student, whose re-export is checked
    q = card_for(shallow).int8.data
    cfg = ExportConfig(precision="int8", calibration=str(SHARED / "train"), calibration_size=q["calibration"]["count"],
                       float_layers=q["export"]["float_layers"], weight_bits=q["export"].get("weight_bits", 7))
    path = export(shallow, tmp_path / "shallow.int8.onnx", cfg)
    want = load_model(shallow).embed(images)
    again = cosines(load_model(path).embed(images), want).mean()
    shipped = cosines(resolve_runtime(shallow, precision="int8").model.embed(images), want).mean()
    assert again >= 0.985 and abs(again - shipped) <= 0.005
    assert np.mean((load_model(path).embed(images) @ want.T).argmax(axis=1) == np.arange(len(images))) >= 0.95


def test_export_cache_key_follows_the_graph_settings(student_file, monkeypatch):
    """Cached ONNX exports are rebuilt when the graph rdcd would export changes."""
    import rdcd.export as ex

    src = ex.source_model(student_file)
    base = ex.weights_key(src, ex.ExportConfig())
    assert ex.weights_key(src, ex.ExportConfig()) == base
    assert ex.weights_key(src, ex.ExportConfig(same_upper=False)) != base
    monkeypatch.setattr(ex, "GRAPH_REVISION", ex.GRAPH_REVISION + 1)
    assert ex.weights_key(src, ex.ExportConfig()) != base


def test_a_student_with_dropped_blocks_exports_and_matches(student_file, tmp_path):
    """A shallower student (``drop_blocks``, made by ``rdcd train --init M --drop-blocks``) is saved
    with its architecture and exports like any other: the ONNX file gives PyTorch's descriptors."""
    import dataclasses

    from rdcd.models.student import StudentNet, load_student, transfer_weights

    full = load_student(student_file)
    net = StudentNet(dataclasses.replace(full.config, drop_blocks=("2.2", "5.1"), name="tiny-shallow")).eval()
    transfer_weights(full, net)
    path = save_student(net, tmp_path / "shallow.pt")
    onnx_path = export(path, tmp_path / "shallow.onnx")
    images = pictures(700, 4, 64)
    want = load_model(path).embed(images)
    assert np.min(cosines(load_model(onnx_path).embed(images), want)) >= 0.9999
    assert np.max(cosines(load_model(student_file).embed(images), want)) < 0.9999  # the blocks did matter


def test_int8_weight_bits_set_the_weight_range(student_file, tmp_path):
    """``weight_bits=7`` (the default, ORT's reduce_range) keeps int8 weights within +-64, so the
    u8 x s8 products cannot saturate without VNNI; ``weight_bits=8`` uses the full +-127 range."""
    from onnx import numpy_helper

    from rdcd.export import ExportConfig

    calib = tmp_path / "calibration"
    calib.mkdir()
    for i in range(8):
        picture(600 + i, (80, 80)).save(calib / f"c{i}.jpg", quality=90)
    largest = {}
    for bits in (7, 8):
        path = export(student_file, tmp_path / f"w{bits}.onnx", precision="int8", calibration=calib,
                      calibration_size=8, weight_bits=bits)
        model = onnx.load(str(path))
        weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert weights, "no int8 weights in the graph"
        largest[bits] = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
        assert json.loads({p.key: p.value for p in model.metadata_props}["rdcd.export"])["weight_bits"] == bits
    assert largest[7] <= 64 < largest[8]
    with pytest.raises(ValueError, match="weight_bits must be 7 or 8"):
        ExportConfig(precision="int8", calibration=str(calib), weight_bits=6).check()

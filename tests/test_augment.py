"""Augmentation recipes: output format, seeding, and that every step of the recipe really acts."""
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from rdcd.augly_assets import emoji_names, emoji_path, font_names, font_path
from rdcd.augment import (
    AUGMENTATIONS,
    RandomResizedCrop,
    OverlayText,
    TwoViews,
    advanced,
    augmentation_grid,
    build_augmentation,
    imagenet_normalize,
    light,
    view_seed,
)

torch.set_num_threads(1)

ADVANCED_ORDER = ["hflip", "rotate90", "text", "emoji", "rotate", "crop", "color_jitter", "grayscale", "blur", "jpeg"]


def scene(width=320, height=240, seed=0):
    """A photo-like test image: colour gradient, shapes and an edge-rich band, no symmetry."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / width, 255 * y / height, 128 + 60 * np.sin(x / 17.0)], axis=-1)
    pixels += rng.normal(0, 8, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.rectangle((30, 40, 120, 150), fill=(220, 30, 40))
    draw.ellipse((180, 60, 290, 200), fill=(20, 40, 200))
    draw.polygon([(140, 200), (200, 230), (110, 235)], fill=(250, 240, 10))
    for i in range(0, width, 12):
        draw.line((i, 0, i + 6, 25), fill=(0, 0, 0), width=2)
    return image


def only(name, recipe=advanced, **kwargs):
    """The recipe with every optional step off except ``name`` (the crop stays on)."""
    names = [s.name for s in recipe().steps]
    return recipe(probabilities={n: (1.0 if n in (name, "crop") else 0.0) for n in names}, **kwargs)


def recipe_ops():
    return {s.name: s.op for s in advanced().steps}


# ---------------------------------------------------------------- format


def test_recipe_order_and_probabilities_are_the_papers():
    steps = advanced().steps
    assert [s.name for s in steps] == ADVANCED_ORDER
    assert [s.p for s in steps] == [0.5, 0.05, 0.1, 0.2, 0.05, 1.0, 0.8, 0.2, 0.5, 0.2]
    ops = recipe_ops()
    assert (ops["text"].font_size, ops["text"].opacity) == ((0.1, 0.3), (0.1, 1.0))
    assert (ops["emoji"].size, ops["emoji"].opacity) == ((0.1, 0.5), (0.7, 1.0))
    assert (ops["crop"].size, ops["crop"].scale, ops["crop"].ratio) == (224, (0.08, 1.0), (3 / 4, 4 / 3))
    jitter = ops["color_jitter"]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (0.8, 0.8, 0.8, 0.2)
    assert ops["blur"].radius == (1.0, 5.0) and ops["jpeg"].quality == (0, 100)


@pytest.mark.parametrize("name", ["advanced", "light"])
def test_output_shape_dtype_and_normalisation(name):
    image = scene()
    normalised = build_augmentation(name, size=96)(image, 7)
    raw = build_augmentation(name, size=96, normalize=False)(image, 7)
    assert normalised.shape == raw.shape == (3, 96, 96)
    assert normalised.dtype == torch.float32 and raw.dtype == torch.uint8
    assert torch.allclose(imagenet_normalize(raw), normalised)
    assert torch.allclose(imagenet_normalize(raw[None].repeat(2, 1, 1, 1)), normalised[None].expand(2, -1, -1, -1))


def test_imagenet_normalisation_values_by_hand():
    white = Image.new("RGB", (50, 40), "white")
    x = only("crop", recipe=light, size=32)(white, 0)  # every pixel stays 255
    expected = [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]
    for channel, value in enumerate(expected):
        assert torch.allclose(x[channel], torch.full((32, 32), value))
    black = imagenet_normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    assert black[0, :, 0, 0].tolist() == pytest.approx([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225])


def test_registry_and_errors():
    assert {"advanced", "light"} <= set(AUGMENTATIONS)
    assert [s.name for s in light().steps] == ["crop", "hflip", "color_jitter"]
    assert recipe_ops()["crop"].size == 224 and light(size=160).steps[0].op.scale == (0.3, 1.0)
    with pytest.raises(ValueError, match="advanced"):
        build_augmentation("nope")
    with pytest.raises(ValueError, match="emoji"):
        build_augmentation("advanced", probabilities={"emojis": 1.0})


def test_augly_assets_are_installed():
    fonts = [font_path(name) for name in font_names()]
    assert len(fonts) > 100 and all(os.path.exists(p) and os.path.exists(p[:-4] + ".pkl") for p in fonts)
    emojis = emoji_names()
    assert len(emojis) > 100 and all(os.path.exists(emoji_path(e)) for e in emojis)


# ---------------------------------------------------------------- seeding


def test_same_seed_same_view_different_seed_different_view():
    image, aug = scene(), build_augmentation("advanced", size=96)
    assert torch.equal(aug(image, 3), aug(image, 3))
    assert torch.equal(aug(image, 3), aug(image, random.Random(3)))
    assert torch.equal(aug(image, np.random.default_rng(5)), aug(image, np.random.default_rng(5)))
    assert torch.equal(aug(image, torch.Generator().manual_seed(5)), aug(image, torch.Generator().manual_seed(5)))
    views = [aug(image, seed) for seed in range(6)]
    assert all(not torch.equal(views[i], views[j]) for i in range(6) for j in range(i + 1, 6))


def test_seeded_views_leave_global_rngs_alone():
    image, aug = scene(), build_augmentation("advanced", size=64, probabilities={"text": 1, "emoji": 1})
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    for seed in range(5):
        aug(image, seed)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_view_seed_is_deterministic_and_distinct():
    assert view_seed(0, 1, 2) == view_seed(0, 1, 2)
    seeds = {view_seed(b, e, i) for b in range(2) for e in range(3) for i in range(50)}
    assert len(seeds) == 300


def test_two_views_are_independent_and_reproducible():
    image, aug = scene(), build_augmentation("advanced", size=64)
    first, second = TwoViews(aug)(image, 11)
    again = TwoViews(aug)(image, 11)
    assert not torch.equal(first, second)
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])
    rng = random.Random(11)
    assert torch.equal(first, aug(image, rng)) and torch.equal(second, aug(image, rng))


class _SeededPairs(torch.utils.data.Dataset):
    def __init__(self, epoch):
        self.images = [scene(seed=i) for i in range(4)]
        self.views = TwoViews(build_augmentation("advanced", size=48))
        self.epoch = epoch

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.views(self.images[index], view_seed(1234, self.epoch, index))


def _load(num_workers, epoch=0):
    loader = torch.utils.data.DataLoader(_SeededPairs(epoch), batch_size=2, num_workers=num_workers)
    return [torch.cat(pair) for pair in loader]


def test_dataloader_workers_give_the_same_views_as_the_main_process():
    in_process = _load(num_workers=0)
    in_workers = _load(num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(in_process, in_workers))
    next_epoch = _load(num_workers=0, epoch=1)
    assert not any(torch.equal(a, b) for a, b in zip(in_process, next_epoch))


# ---------------------------------------------------------------- every step acts


@pytest.mark.parametrize("name", ADVANCED_ORDER)
def test_each_step_fires_when_its_probability_is_forced(name):
    for seed in range(3):
        _, applied = only(name).augment(scene(), random.Random(seed))
        assert applied == [n for n in ADVANCED_ORDER if n in (name, "crop")]
    _, applied = advanced(probabilities={n: 0.0 for n in ADVANCED_ORDER}).augment(scene(), random.Random(0))
    assert applied == []


@pytest.mark.parametrize("name", ADVANCED_ORDER)
def test_each_step_changes_the_image(name):
    op, image = recipe_ops()[name], scene()
    before = np.asarray(image)
    for seed in range(3):
        out = op(image, random.Random(seed))
        assert out.mode == "RGB"
        after = np.asarray(out)
        assert after.shape != before.shape or not np.array_equal(after, before), f"{name} left the image unchanged"
        if name == "hflip":
            assert np.array_equal(after, before[:, ::-1])
        elif name == "rotate90":
            assert any(np.array_equal(after, np.rot90(before, k)) for k in (1, 2, 3))
        elif name == "crop":
            assert after.shape == (224, 224, 3)
        elif name == "grayscale":
            assert np.array_equal(after[..., 0], after[..., 1]) and np.array_equal(after[..., 1], after[..., 2])
        elif name in ("text", "emoji"):  # a local overlay: most of the image is untouched
            changed = (after != before).any(axis=-1)
            assert 0 < changed.mean() < 0.5
        elif name == "blur":  # fewer sharp edges
            assert np.abs(np.diff(after.astype(int), axis=1)).mean() < np.abs(np.diff(before.astype(int), axis=1)).mean()
        else:
            assert after.shape == before.shape


def test_text_overlay_keeps_its_opacity():
    black = Image.new("RGB", (200, 150), "black")
    drawn = 0
    for seed in range(5):
        out = np.asarray(OverlayText(opacity=(0.5, 0.5))(black, random.Random(seed)))
        # composited over black at alpha <= 0.5, no channel can exceed 0.5 * 255
        assert out.max() <= 128
        drawn += out.any()
    assert drawn >= 4


def test_random_resized_crop_box_by_hand():
    full = RandomResizedCrop(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert full.box(100, 100, random.Random(0)) == (0, 0, 100, 100)
    # a 200 x 100 image cannot hold a square of area 20000: fall back to the central 100 x 100
    assert full.box(200, 100, random.Random(0)) == (0, 50, 100, 100)
    small = RandomResizedCrop(size=32, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    top, left, h, w = small.box(100, 100, random.Random(0))
    assert (h, w) == (50, 50) and 0 <= top <= 50 and 0 <= left <= 50


# ---------------------------------------------------------------- grid


def test_augmentation_grid_renders_to_png(tmp_path):
    images = [scene(seed=i) for i in range(4)]
    aug = build_augmentation("advanced", size=96, probabilities={"text": 1.0, "emoji": 1.0})
    grid = augmentation_grid(images, aug, views=8, seed=0, cell=48)
    path = tmp_path / "grid.png"
    grid.save(path)
    reloaded = Image.open(path)
    assert reloaded.size == (9 * (48 + 4) + 4, 4 * (48 + 26 + 4) + 4)
    assert np.array_equal(np.asarray(augmentation_grid(images, aug, views=8, seed=0, cell=48)), np.asarray(grid))
    # each view tile is different from its neighbour
    tiles = [np.asarray(reloaded.convert("RGB"))[4:52, x : x + 48] for x in range(4, 9 * 52, 52)]
    assert all(not np.array_equal(a, b) for a, b in zip(tiles, tiles[1:]))

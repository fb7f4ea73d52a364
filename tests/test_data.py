"""The data pipeline: bad images fail while the dataset is built (before any model loads), every image becomes
upright 8-bit RGB, SDXL micro-conditioning is per image, augmentation is a pure function of (seed, epoch,
index), and the step plan covers every sample and resumes exactly."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_pivotal.args import parse_args
from sdxl_pivotal.data import (
    DreamBoothDataset,
    ImageRecord,
    StepPlan,
    collate,
    iterate_steps,
    load_records,
    open_image,
)
from sdxl_pivotal.tiny import write_demo_images

RES = 32


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    return write_demo_images(tmp_path / "images", count=3)


def folder_args(tmp_path: Path, folder: Path, *extra: str) -> argparse.Namespace:
    """Flags as the trainer gets them (all flag checks passed) for a plain image folder."""
    return parse_args(
        [
            "--pretrained_model_name_or_path",
            "/nonexistent/sdxl-model",
            "--instance_prompt",
            "a photo of TOK toy",
            "--instance_data_dir",
            str(folder),
            "--output_dir",
            str(tmp_path / "out"),
            *extra,
        ]
    )


def dataset_args(tmp_path: Path, folder: Path, *extra: str) -> argparse.Namespace:
    """Flags for a local datasets ImageFolder (images + metadata.jsonl)."""
    return parse_args(
        [
            "--pretrained_model_name_or_path",
            "/nonexistent/sdxl-model",
            "--instance_prompt",
            "a photo of TOK toy",
            "--dataset_name",
            str(folder),
            "--cache_dir",
            str(tmp_path / "hf-cache"),
            "--output_dir",
            str(tmp_path / "out"),
            *extra,
        ]
    )


def dataset_of(records: list[ImageRecord], seed: int = 0, **flags) -> DreamBoothDataset:
    options = dict(
        repeats=1,
        resolution=RES,
        center_crop=False,
        random_flip=False,
        image_interpolation_mode="lanczos",
        shuffle_caption=False,
        keep_tokens=0,
        caption_dropout=0.0,
        aspect_ratio_bucketing=False,
    )
    return DreamBoothDataset(records, argparse.Namespace(**{**options, **flags}), seed)


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """Random RGB pixels: any shift or mirror of a crop changes them."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] back to [H, W, 3] uint8."""
    return ((pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) once the short side is `resolution`, keeping the aspect ratio."""
    if width <= height:
        return resolution, round(height * resolution / width)
    return round(width * resolution / height), resolution


# ---------------------------------------------------------------------------------------------- bad input


def test_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = folder_args(tmp_path, empty)  # the flags are fine; the folder's content is checked by load_records
    with pytest.raises(ValueError, match="holds no images") as error:
        load_records(args)
    assert str(empty) in str(error.value)


def test_folder_of_non_images_only(tmp_path, caplog):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    args = folder_args(tmp_path, folder)
    with caplog.at_level(logging.WARNING, logger="sdxl_pivotal.data"), pytest.raises(ValueError, match="no images"):
        load_records(args)
    assert "readme.txt" in caplog.text


def test_folder_removed_after_flag_check(tmp_path, image_dir):
    args = folder_args(tmp_path, image_dir)
    args.instance_data_dir = str(tmp_path / "gone")
    with pytest.raises(ValueError, match="is not a folder"):
        load_records(args)


def test_corrupt_image_is_named(tmp_path, image_dir):
    broken = image_dir / "zz_broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    args = folder_args(tmp_path, image_dir)
    with pytest.raises(ValueError, match="Cannot read image") as error:
        load_records(args)
    assert str(broken) in str(error.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_named(tmp_path, image_dir, fmt):
    truncated = image_dir / f"cut.{fmt.lower()}"
    noise_image(64, 48, seed=1).save(truncated, format=fmt)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with Image.open(truncated) as image:  # the header alone looks fine: only a full decode finds the problem
        assert image.size == (64, 48)
    args = folder_args(tmp_path, image_dir)
    with pytest.raises(ValueError, match="truncated") as error:
        load_records(args)
    assert str(truncated) in str(error.value)


def test_zero_size_image_is_named(tmp_path, image_dir):
    empty = image_dir / "empty.png"
    empty.write_bytes(b"")
    args = folder_args(tmp_path, image_dir)
    with pytest.raises(ValueError, match="Cannot read image") as error:
        load_records(args)
    assert str(empty) in str(error.value)


def test_non_image_files_are_named_in_a_warning(tmp_path, image_dir, caplog):
    (image_dir / "notes.txt").write_text("shot on a phone")
    (image_dir / "raw.cr2x").write_bytes(b"\x00" * 10)
    args = folder_args(tmp_path, image_dir)
    with caplog.at_level(logging.WARNING, logger="sdxl_pivotal.data"):
        records = load_records(args)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    for name in ("notes.txt", "raw.cr2x", "metadata.jsonl"):
        assert name in warnings[0]
    assert [r.path.name for r in records] == ["toy_00.png", "toy_01.png", "toy_02.png"]
    assert {r.caption for r in records} == {"a photo of TOK toy"}


def test_dataset_with_caption_column(tmp_path, image_dir):
    records = load_records(dataset_args(tmp_path, image_dir, "--caption_column", "text"))
    rows = [json.loads(line) for line in (image_dir / "metadata.jsonl").read_text().splitlines()]
    assert [r.caption for r in records] == [row["text"] for row in rows]
    assert [r.load().size for r in records] == [Image.open(image_dir / row["file_name"]).size for row in rows]


def test_dataset_without_caption_column_uses_instance_prompt(tmp_path, image_dir):
    records = load_records(dataset_args(tmp_path, image_dir))
    assert len(records) == 3 and {r.caption for r in records} == {"a photo of TOK toy"}


@pytest.mark.parametrize(("flag", "column"), [("--caption_column", "caption"), ("--image_column", "picture")])
def test_dataset_without_the_named_column(tmp_path, image_dir, flag, column):
    args = dataset_args(tmp_path, image_dir, flag, column)
    with pytest.raises(ValueError, match=f"{flag} '{column}' is not a column") as error:
        load_records(args)
    assert "its columns are: image, text" in str(error.value)


def test_dataset_with_a_truncated_image_is_named(tmp_path, image_dir):
    cut = image_dir / "toy_01.png"
    cut.write_bytes(cut.read_bytes()[:300])
    args = dataset_args(tmp_path, image_dir, "--caption_column", "text")
    with pytest.raises(ValueError, match="Cannot read image") as error:
        load_records(args)
    assert str(cut) in str(error.value)


def test_trainer_checks_data_before_loading_models(tmp_path, image_dir, monkeypatch):
    """A bad image stops `train` with the data error; the models are never loaded."""
    from accelerate.state import AcceleratorState, GradientState

    from sdxl_pivotal import train as train_module

    def must_not_load(args):
        raise AssertionError("models loaded before the data was checked")

    monkeypatch.setattr(train_module, "load_sdxl", must_not_load)
    (image_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    args = folder_args(tmp_path, image_dir, "--seed", "0", "--report_to", "none")
    try:
        with pytest.raises(ValueError, match="Cannot read image") as error:
            train_module.train(args)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert str(image_dir / "broken.png") in str(error.value)


# ---------------------------------------------------------------------------------------------- conversion to RGB


def saved(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 high: red top-left quarter, blue bottom-right quarter, grey elsewhere.
    stored = np.full((20, 40, 3), 128, dtype=np.uint8)
    stored[:10, :20] = (255, 0, 0)
    stored[10:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = saved(Image.fromarray(stored), tmp_path / "rotated.png", exif=exif)

    upright = open_image(path)
    assert upright.size == (20, 40)  # (width, height): portrait once upright
    pixels = np.asarray(upright)
    np.testing.assert_array_equal(pixels, np.rot90(stored, k=-1))
    assert tuple(pixels[0, -1]) == (255, 0, 0)  # the stored top-left is now the top-right
    assert tuple(pixels[-1, 0]) == (0, 0, 255)  # the stored bottom-right is now the bottom-left
    assert tuple(pixels[0, 0]) == (128, 128, 128)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.array([[[0, 0, 0, 0], [255, 0, 0, 255], [0, 0, 0, 128], [0, 0, 255, 64]]], dtype=np.uint8)
    rgb = np.asarray(open_image(saved(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))).astype(int)
    expected = [[255, 255, 255], [255, 0, 0], [127, 127, 127], [191, 191, 255]]
    np.testing.assert_allclose(rgb[0], expected, atol=1)


def test_la_is_composited_on_white(tmp_path):
    la = np.array([[[0, 0], [100, 255], [0, 128]]], dtype=np.uint8)
    rgb = np.asarray(open_image(saved(Image.fromarray(la, "LA"), tmp_path / "la.png"))).astype(int)
    np.testing.assert_allclose(rgb[0], [[255] * 3, [100] * 3, [127] * 3], atol=1)


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    palette = Image.new("P", (3, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    palette.putdata([0, 1, 2])
    path = saved(palette, tmp_path / "p.png", transparency=0)  # index 0 (black) is transparent
    with Image.open(path) as reopened:
        assert reopened.mode == "P" and "transparency" in reopened.info
    rgb = np.asarray(open_image(path))
    np.testing.assert_array_equal(rgb[0], [[255, 255, 255], [255, 0, 0], [0, 255, 0]])


def test_cmyk_is_converted(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 255, 0], [0, 0, 0, 255], [0, 0, 0, 128]]], np.uint8)
    path = saved(Image.fromarray(cmyk, "CMYK"), tmp_path / "c.tif")
    with Image.open(path) as reopened:
        assert reopened.mode == "CMYK"
    rgb = np.asarray(open_image(path)).astype(int)
    expected = [[255, 255, 255], [0, 255, 255], [255, 0, 0], [0, 0, 0], [127, 127, 127]]
    np.testing.assert_allclose(rgb[0], expected, atol=1)


def test_greyscale_is_converted(tmp_path):
    grey = np.array([[0, 77, 255]], dtype=np.uint8)
    rgb = np.asarray(open_image(saved(Image.fromarray(grey, "L"), tmp_path / "l.png")))
    assert rgb.shape == (1, 3, 3)
    np.testing.assert_array_equal(rgb[0], [[0] * 3, [77] * 3, [255] * 3])


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 4096, 32768, 65535]], dtype=np.uint16)
    path = saved(Image.fromarray(values), tmp_path / "deep.png")
    with Image.open(path) as reopened:
        assert reopened.mode == "I;16"
    rgb = np.asarray(open_image(path))
    expected = np.round(values[0] / 65535 * 255).astype(np.uint8)  # 0, 1, 16, 128, 255
    np.testing.assert_array_equal(rgb[0], np.stack([expected] * 3, axis=1))


# ---------------------------------------------------------------------------------------------- micro-conditioning


def test_micro_conditioning_per_image_with_center_crop(tmp_path):
    folder = write_demo_images(tmp_path / "sizes", count=6)  # square, landscape and portrait images
    args = folder_args(tmp_path, folder, "--resolution", str(RES), "--center_crop")
    dataset = DreamBoothDataset(load_records(args), args, seed=0)
    samples = [dataset[(0, i)] for i in range(len(dataset))]
    sources = [Image.open(r.path).convert("RGB") for r in dataset.records]
    assert len({s.size for s in sources}) >= 5

    for sample, source in zip(samples, sources, strict=True):
        width, height = resized_size(source.width, source.height, RES)
        top, left = sample.crop_top_left
        assert sample.original_size == (source.height, source.width)
        assert sample.target_size == (RES, RES)
        assert sample.pixel_values.shape == (3, RES, RES)
        assert sample.pixel_values.min() >= -1.0 and sample.pixel_values.max() <= 1.0
        # Centred: the margins either side differ by at most one pixel; the short side is not cropped.
        assert abs((height - RES) - 2 * top) <= 1 and abs((width - RES) - 2 * left) <= 1
        assert (top == 0) or (left == 0)
        # The reported offset is where the pixels were taken from in the resized image.
        resized = np.asarray(source.resize((width, height), Image.Resampling.LANCZOS))
        np.testing.assert_array_equal(to_uint8(sample.pixel_values), resized[top : top + RES, left : left + RES])

    batch = collate(samples)
    expected_ids = [[*s.original_size, *s.crop_top_left, RES, RES] for s in samples]
    assert batch.time_ids.tolist() == expected_ids
    assert batch.pixel_values.shape == (6, 3, RES, RES)


def test_random_crop_is_deterministic_per_seed_epoch_index():
    records = [ImageRecord("a", image=noise_image(160, 40, seed=0))]  # resized to 128 x 32: 97 crop positions
    dataset = dataset_of(records, seed=7, repeats=3)
    first = dataset[(0, 0)]
    again, fresh = dataset[(0, 0)], dataset_of(records, seed=7, repeats=3)[(0, 0)]
    for other in (again, fresh):
        assert other.crop_top_left == first.crop_top_left
        assert torch.equal(other.pixel_values, first.pixel_values)

    crops_by_epoch = [dataset[(epoch, 0)].crop_top_left for epoch in range(6)]
    assert len(set(crops_by_epoch)) > 1
    crops_by_index = [dataset[(0, index)].crop_top_left for index in range(3)]  # repeats: different crops
    assert len(set(crops_by_index)) > 1
    assert not torch.equal(dataset_of(records, seed=8)[(0, 0)].pixel_values, first.pixel_values)
    for top, left in crops_by_epoch:
        assert top == 0 and 0 <= left <= 128 - RES


def test_random_flip_mirrors_pixels_and_crop_left():
    source = noise_image(96, 40, seed=3)
    width, height = resized_size(96, 40, RES)  # 77 x 32
    resized = np.asarray(source.resize((width, height), Image.Resampling.LANCZOS))
    mirrored = resized[:, ::-1]
    records = [ImageRecord("a", image=source)]
    plain, flipping = dataset_of(records, seed=5), dataset_of(records, seed=5, random_flip=True)

    seen = set()
    for epoch in range(16):
        unflipped, sample = plain[(epoch, 0)], flipping[(epoch, 0)]
        top, left = unflipped.crop_top_left
        np.testing.assert_array_equal(to_uint8(unflipped.pixel_values), resized[top : top + RES, left : left + RES])
        flipped = not torch.equal(sample.pixel_values, unflipped.pixel_values)
        seen.add(flipped)
        if not flipped:
            assert sample.crop_top_left == (top, left)
            continue
        assert torch.equal(sample.pixel_values, unflipped.pixel_values.flip(-1))
        mirrored_left = width - left - RES
        assert sample.crop_top_left == (top, mirrored_left)
        np.testing.assert_array_equal(
            to_uint8(sample.pixel_values), mirrored[top : top + RES, mirrored_left : mirrored_left + RES]
        )
        assert flipping[(epoch, 0)].crop_top_left == sample.crop_top_left  # deterministic, flip included
    assert seen == {True, False}


# ---------------------------------------------------------------------------------------------- step plan


def indices(batches: list[list[tuple[int, int]]], epoch: int) -> list[int]:
    assert all(key[0] == epoch for batch in batches for key in batch)
    return [key[1] for batch in batches for key in batch]


def test_plan_one_process_sees_every_sample_once_per_epoch():
    plan = StepPlan(num_samples=10, batch_size=3, accumulation=2, seed=4)
    assert (plan.batches_per_epoch, plan.steps_per_epoch) == (4, 2)
    for epoch in range(3):
        batches = plan.epoch_batches(epoch)
        assert [len(b) for b in batches] == [3, 3, 3, 1]
        assert sorted(indices(batches, epoch)) == list(range(10))
        groups = plan.step_groups(epoch)
        assert [len(g) for g in groups] == [2, 2]
        assert [batch for group in groups for batch in group] == batches


def test_plan_accumulation_leaves_a_short_last_step():
    plan = StepPlan(num_samples=10, batch_size=2, accumulation=2, seed=0)
    groups = plan.step_groups(0)
    assert plan.steps_per_epoch == len(groups) == 3
    assert [len(g) for g in groups] == [2, 2, 1]
    assert sorted(indices([b for g in groups for b in g], 0)) == list(range(10))


@pytest.mark.parametrize("num_samples", [7, 8, 1])
def test_plan_two_processes_cover_all_samples_with_equal_batches(num_samples):
    plans = [StepPlan(num_samples, 2, 1, seed=3, num_processes=2, process_index=p) for p in (0, 1)]
    assert plans[0].batches_per_epoch == plans[1].batches_per_epoch
    for epoch in range(3):
        per_process = [plan.epoch_batches(epoch) for plan in plans]
        assert len(per_process[0]) == len(per_process[1]) == plans[0].batches_per_epoch
        assert [len(b) for b in per_process[0]] == [len(b) for b in per_process[1]]
        seen = [indices(batches, epoch) for batches in per_process]
        assert set(seen[0]) | set(seen[1]) == set(range(num_samples))
        assert len(seen[0]) + len(seen[1]) == num_samples + num_samples % 2  # only padding repeats a sample
        if num_samples % 2 == 0:
            assert not set(seen[0]) & set(seen[1])


def test_plan_order_depends_on_seed_and_epoch():
    order = [indices(StepPlan(12, 4, 1, seed=1).epoch_batches(e), e) for e in range(3)]
    assert order[0] == indices(StepPlan(12, 4, 1, seed=1).epoch_batches(0), 0)
    assert order[0] != order[1] and order[1] != order[2]
    assert order[0] != indices(StepPlan(12, 4, 1, seed=2).epoch_batches(0), 0)


# ---------------------------------------------------------------------------------------------- exact resume


@pytest.fixture
def captioned_dataset() -> DreamBoothDataset:
    sizes = [(64, 48), (40, 72), (56, 56), (90, 36), (48, 64)]
    records = [ImageRecord(f"caption {i}", image=noise_image(w, h, seed=i)) for i, (w, h) in enumerate(sizes)]
    return dataset_of(records, seed=11, repeats=2, random_flip=True, image_interpolation_mode="bilinear")


def take(dataset: DreamBoothDataset, plan: StepPlan, start: int, count: int, workers: int = 0) -> list:
    out = []
    for step, batches in iterate_steps(dataset, plan, start, workers):
        out.append((step, batches))
        if len(out) == count:
            return out
    raise AssertionError("iterate_steps ended")


@pytest.mark.parametrize(("start", "workers"), [(2, 0), (4, 0), (5, 2)])
def test_resume_yields_the_same_batches(captioned_dataset, start, workers):
    plan = StepPlan(len(captioned_dataset), batch_size=2, accumulation=2, seed=11)
    assert plan.steps_per_epoch == 3  # 10 samples, 5 batches: steps of 2, 2 and 1 batches
    full = take(captioned_dataset, plan, 0, start + 4)
    resumed = take(captioned_dataset, plan, start, 4, workers)
    assert [step for step, _ in full] == list(range(start + 4))
    for (step, expected), (resumed_step, got) in zip(full[start:], resumed, strict=True):
        assert resumed_step == step
        assert len(got) == len(expected)
        for a, b in zip(expected, got, strict=True):
            assert a.captions == b.captions
            assert torch.equal(a.pixel_values, b.pixel_values)
            assert torch.equal(a.time_ids, b.time_ids)
    # The comparison means something: the steps do differ from one another.
    captions = [tuple(c for b in batches for c in b.captions) for _, batches in full]
    assert len(set(captions)) > 2

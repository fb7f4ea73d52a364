"""Aspect-ratio buckets: sizes, assignment, batches from one bucket, micro-conditioning per image."""

from __future__ import annotations

import logging
from argparse import Namespace

import pytest
from PIL import Image

from sdxl_pivotal.buckets import assign_bucket, make_buckets
from sdxl_pivotal.data import DreamBoothDataset, ImageRecord, StepPlan, collate

PHOTOS = [(4032, 3024), (3024, 4032), (1920, 1080), (1080, 1920), (2000, 2000), (3000, 1000), (1200, 1600)]


def test_buckets_are_multiples_of_the_step_with_about_resolution_squared_pixels():
    buckets = make_buckets(1024, 512, 2048, 64)
    assert (1024, 1024) in buckets and len(buckets) > 10
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0 and min(width, height) >= 512 and max(width, height) <= 2048
        assert width * height <= 1024 * 1024, "never more pixels than the square"
        assert width * (height + 64) > 1024 * 1024 or height == 2048, "the tallest height that fits"


@pytest.mark.parametrize("photo", PHOTOS)
def test_assignment_preserves_aspect_ratio_within_one_step(photo):
    buckets = make_buckets(1024, 512, 2048, 64)
    width, height = assign_bucket(photo, buckets, 64, upscale=False)
    assert (width, height) in buckets, "large photos are never upscaled, so they get a full-size bucket"
    # The bucket's width is within one step of the photo's shape at the bucket's height.
    assert abs(width - height * photo[0] / photo[1]) <= 64, (photo, (width, height))


def test_small_images_are_not_upscaled_unless_asked():
    buckets = make_buckets(1024, 512, 2048, 64)
    width, height = assign_bucket((300, 200), buckets, 64, upscale=False)
    assert width <= 300 and height <= 200 and width % 64 == 0 and height % 64 == 0 and width > height
    assert assign_bucket((300, 200), buckets, 64, upscale=True) in buckets


def dataset_for(sizes: list[tuple[int, int]], resolution: int = 128, **flags) -> DreamBoothDataset:
    records = [ImageRecord(caption=f"img {i}", image=Image.new("RGB", size, (i * 30, 90, 160)), size=size)
               for i, size in enumerate(sizes)]  # fmt: skip
    options = dict(
        repeats=1, resolution=resolution, center_crop=True, random_flip=False, image_interpolation_mode="bilinear",
        shuffle_caption=False, keep_tokens=0, caption_dropout=0.0, aspect_ratio_bucketing=True,
        bucket_min_side=64, bucket_max_side=256, bucket_step=32, bucket_upscale=False,
    )  # fmt: skip
    return DreamBoothDataset(records, Namespace(**{**options, **flags}), seed=0)


def test_samples_carry_their_bucket_and_micro_conditioning(caplog):
    with caplog.at_level(logging.INFO):
        dataset = dataset_for([(400, 300), (300, 400), (500, 500), (640, 360)])
    assert "Aspect-ratio buckets" in caplog.text
    for i, (w, h) in enumerate([(400, 300), (300, 400), (500, 500), (640, 360)]):
        sample = dataset[(0, i)]
        bucket_w, bucket_h = dataset.sizes[i]
        assert sample.pixel_values.shape == (3, bucket_h, bucket_w)
        assert sample.original_size == (h, w) and sample.target_size == (bucket_h, bucket_w)
        scale = max(bucket_w / w, bucket_h / h)  # resized to cover the bucket, then centre-cropped
        resized_w, resized_h = max(bucket_w, round(w * scale)), max(bucket_h, round(h * scale))
        assert sample.crop_top_left == ((resized_h - bucket_h) // 2, (resized_w - bucket_w) // 2)
    assert dataset.sizes[0][0] > dataset.sizes[0][1] and dataset.sizes[1][0] < dataset.sizes[1][1]


@pytest.mark.parametrize("processes", [1, 2])
def test_no_batch_mixes_buckets_and_every_image_is_seen(processes):
    groups = ["wide"] * 5 + ["tall"] * 3 + ["square"] * 4
    plans = [StepPlan(len(groups), 2, 1, seed=3, num_processes=processes, process_index=p, groups=groups)
             for p in range(processes)]  # fmt: skip
    for epoch in range(3):
        per_process = [plan.epoch_batches(epoch) for plan in plans]
        assert len({len(b) for b in per_process}) == 1 and len(per_process[0]) == plans[0].batches_per_epoch
        seen = set()
        for batches in per_process:
            for batch in batches:
                assert len({groups[i] for _, i in batch}) == 1, "one bucket per batch"
                seen |= {i for _, i in batch}
        assert seen == set(range(len(groups)))
    assert plans[0].epoch_batches(0) != plans[0].epoch_batches(1)


def test_bucketed_batches_collate(tmp_path):
    dataset = dataset_for([(400, 300), (410, 300), (300, 400)])
    batch = collate([dataset[(0, 0)], dataset[(0, 1)]])
    assert batch.pixel_values.shape[2:] == (dataset.sizes[0][1], dataset.sizes[0][0])


def test_training_with_buckets(run_training, tmp_path, monkeypatch):
    from sdxl_pivotal import train as train_module

    shapes = []
    real_loss = train_module.batch_loss

    def recording_loss(parts, unet, encoder, batch, *args, **kwargs):
        shapes.append(tuple(batch.pixel_values.shape[2:]))
        return real_loss(parts, unet, encoder, batch, *args, **kwargs)

    monkeypatch.setattr(train_module, "batch_loss", recording_loss)
    run_training(
        tmp_path / "run",
        *("--aspect_ratio_bucketing", "--resolution", "128", "--bucket_step", "32", "--max_train_steps", "6"),
    )
    assert len(set(shapes)) > 1, "the demo images (4:3, 3:4, 1:1, ...) train in several buckets"
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in shapes)

"""Captions from sidecar files, tag shuffling with kept tokens, caption dropout."""

from __future__ import annotations

import logging
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from sdxl_pivotal.data import DreamBoothDataset, records_from_folder, transform_caption
from sdxl_pivotal.errors import InputError


@pytest.fixture
def captioned(tmp_path: Path, demo_images: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted(demo_images.glob("*.png"))[:3]:
        shutil.copy(path, folder / path.name)
    (folder / "toy_00.txt").write_text("TOK, red toy,\n  green background ")
    (folder / "toy_01.caption").write_text("TOK on a table")
    return folder


def test_sidecar_captions_with_prompt_fallback(captioned, caplog):
    with caplog.at_level(logging.INFO):
        records = records_from_folder(captioned, "a photo of TOK toy")
    assert [r.caption for r in records] == [
        "TOK, red toy, green background",
        "a photo of TOK toy",
        "a photo of TOK toy",
    ]
    assert "toy_00.txt" not in caplog.text, "a caption file is not an ignored file"
    assert "toy_01.caption" in caplog.text and "1 of 3 images have a .txt caption file" in caplog.text
    records = records_from_folder(captioned, "a photo of TOK toy", ".caption")
    assert [r.caption for r in records][:2] == ["a photo of TOK toy", "TOK on a table"]


def test_empty_and_undecodable_caption_files(captioned, caplog):
    (captioned / "toy_00.txt").write_text("  \n")
    with caplog.at_level(logging.WARNING):
        assert records_from_folder(captioned, "fallback")[0].caption == "fallback"
    assert "toy_00.txt is empty" in caplog.text
    (captioned / "toy_00.txt").write_bytes(b"\xff\xfe\xfa caption")
    with pytest.raises(InputError, match=r"toy_00.txt is not UTF-8"):
        records_from_folder(captioned, "fallback")


def test_shuffle_keeps_leading_tags_and_is_reproducible():
    caption = "TOK, a, b, c, d, e, f"
    outputs = {transform_caption(caption, np.random.default_rng([0, e]), True, 1, 0.0) for e in range(30)}
    assert len(outputs) > 10, "shuffling changes the order"
    for out in outputs:
        tags = out.split(", ")
        assert tags[0] == "TOK" and sorted(tags[1:]) == ["a", "b", "c", "d", "e", "f"]
    again = transform_caption(caption, np.random.default_rng([0, 3]), True, 1, 0.0)
    assert again == transform_caption(caption, np.random.default_rng([0, 3]), True, 1, 0.0)
    assert transform_caption(caption, np.random.default_rng(0), False, 0, 0.0) == caption


def test_caption_dropout_rate():
    rng = np.random.default_rng(0)
    dropped = sum(transform_caption("TOK toy", rng, False, 0, 0.3) == "" for _ in range(4000))
    assert 0.27 < dropped / 4000 < 0.33


def test_dataset_applies_caption_options_per_epoch(captioned):
    records = records_from_folder(captioned, "TOK, x, y, z, w")
    flags = dict(
        repeats=1, resolution=64, center_crop=True, random_flip=False, image_interpolation_mode="lanczos",
        shuffle_caption=True, keep_tokens=1, caption_dropout=0.0, aspect_ratio_bucketing=False,
    )  # fmt: skip
    dataset = DreamBoothDataset(records, Namespace(**flags), seed=0)
    by_epoch = [dataset[(epoch, 1)].caption for epoch in range(8)]
    assert len(set(by_epoch)) > 1 and all(c.startswith("TOK, ") for c in by_epoch)
    assert dataset[(3, 1)].caption == by_epoch[3], "same (seed, epoch, index), same caption"
    assert records[1].caption == "TOK, x, y, z, w", "the record itself is untouched"


def test_training_reads_sidecars_and_replaces_the_abstraction(run_training, captioned, tmp_path, monkeypatch):
    from sdxl_pivotal import train as train_module

    seen: list[str] = []
    real_loss = train_module.batch_loss

    def recording_loss(parts, unet, encoder, batch, *args, **kwargs):
        seen.extend(batch.captions)
        return real_loss(parts, unet, encoder, batch, *args, **kwargs)

    monkeypatch.setattr(train_module, "batch_loss", recording_loss)
    run_training(
        tmp_path / "run",
        *("--max_train_steps", "3", "--train_batch_size", "1", "--train_text_encoder_ti"),
        *("--shuffle_caption", "--keep_tokens", "1"),
        data=("--instance_data_dir", str(captioned)),
    )
    assert any(c.startswith("<s0><s1>, ") and "red toy" in c for c in seen), seen
    assert all("TOK" not in c for c in seen)

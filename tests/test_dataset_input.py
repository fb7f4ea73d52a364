"""Training images from `--dataset_name` and folders: rows without an image, images too small to learn from,
and datasets kept as files or encoded bytes rather than decoded pixels."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data import dataset_args, dataset_of, folder_args

from sdxl_pivotal.data import MIN_IMAGE_SIDE, ImageRecord, load_records
from sdxl_pivotal.tiny import write_demo_images


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    return write_demo_images(tmp_path / "images", count=3)


def test_metadata_row_without_file_name_is_named(tmp_path, image_dir):
    metadata = image_dir / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    del rows[1]["file_name"]
    metadata.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError) as error:
        load_records(dataset_args(tmp_path, image_dir, "--caption_column", "text"))
    message = str(error.value)
    assert f'Row 2 of {metadata} has no "file_name" field' in message
    assert "column 'image'" in message and "NoneType" not in message


def test_tiny_image_in_a_folder_is_refused_by_name(tmp_path, image_dir):
    tiny = image_dir / "speck.png"
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tiny)
    with pytest.raises(ValueError) as error:
        load_records(folder_args(tmp_path, image_dir))
    assert f"Image {tiny} is only 1x1 pixels" in str(error.value)
    assert f"at least {MIN_IMAGE_SIDE} px" in str(error.value)


def test_tiny_image_in_a_dataset_is_refused_by_row(tmp_path, image_dir):
    Image.new("RGB", (MIN_IMAGE_SIDE - 1, 400), (9, 9, 9)).save(image_dir / "toy_01.png")
    with pytest.raises(ValueError, match=rf"toy_01\.png \(row 2 of column 'image'\) is only {MIN_IMAGE_SIDE - 1}x400"):
        load_records(dataset_args(tmp_path, image_dir))


def test_smallest_accepted_image_is_named_when_upscaled(caplog):
    """An image at the minimum size trains, with one warning naming it as upscaled; a large one is not named."""
    small = ImageRecord("small", image=Image.new("RGB", (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE)), label="small.png")
    large = ImageRecord("large", image=Image.new("RGB", (512, 512)), label="large.png")
    with caplog.at_level(logging.WARNING, logger="sdxl_pivotal.data"):
        dataset_of([small, large], resolution=4 * MIN_IMAGE_SIDE)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"small.png ({MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE})" in warnings[0] and "large.png" not in warnings[0]


def embedded_dataset(tmp_path: Path, image_dir: Path) -> Path:
    """A parquet dataset with the image files' bytes inside, as Hub datasets are stored."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    rows = [json.loads(line) for line in (image_dir / "metadata.jsonl").read_text().splitlines()]
    images = [{"bytes": (image_dir / row["file_name"]).read_bytes(), "path": None} for row in rows]
    dataset = Dataset.from_dict({"image": images, "text": [row["text"] for row in rows]})
    folder = tmp_path / "parquet-dataset"
    (folder / "data").mkdir(parents=True)
    dataset.cast_column("image", ImageFeature()).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


@pytest.mark.parametrize("source", ["imagefolder", "parquet"])
def test_dataset_records_keep_files_or_bytes_not_pixels(tmp_path, image_dir, source):
    """Records of a dataset hold the image's path (a local ImageFolder) or its encoded bytes (parquet), never
    its decoded pixels, and decode to exactly the file's pixels."""
    folder = image_dir if source == "imagefolder" else embedded_dataset(tmp_path, image_dir)
    records = load_records(dataset_args(tmp_path, folder, "--caption_column", "text"))
    files = sorted(image_dir.glob("*.png"))
    assert len(records) == len(files)
    for record, file in zip(records, files, strict=True):
        assert record.image is None
        assert (record.path is not None) == (source == "imagefolder")
        assert (record.encoded == file.read_bytes()) == (source == "parquet")
        np.testing.assert_array_equal(np.asarray(record.load()), np.asarray(Image.open(file).convert("RGB")))

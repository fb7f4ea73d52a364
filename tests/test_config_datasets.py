"""Several folders in one run (`datasets:` in a config file): each folder is seen in the ratio of its repeats, with
its own prompt and size; regularisation (class) folders get the prior loss; bad entries fail before any model
loads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sdxl_pivotal import train as train_module
from sdxl_pivotal.args import parse_args
from sdxl_pivotal.data import load_entry_records
from sdxl_pivotal.errors import InputError
from sdxl_pivotal.tiny import write_demo_images

REPO = Path(__file__).resolve().parents[1]


def folder_with_captions(folder: Path, count: int, trigger: str) -> Path:
    """`count` demo images, each with a sidecar caption naming the trigger and the image: "TOK toy, A1"."""
    write_demo_images(folder, count=count)
    for i, image in enumerate(sorted(folder.glob("*.png"))):
        image.with_suffix(".txt").write_text(f"a photo of {trigger} toy, {folder.name}{i}")
    (folder / "metadata.jsonl").unlink(missing_ok=True)
    return folder


@pytest.fixture
def record_batches(monkeypatch):
    """Every batch the training loop computes a loss on: (captions, image size, number of class samples)."""
    seen = []
    real = train_module.batch_loss

    def recording(parts, unet, encode_prompts, batch, *args, **kwargs):
        size = tuple(batch.pixel_values.shape[-2:]) if batch.pixel_values is not None else None
        seen.append((list(batch.captions), size, batch.num_prior))
        return real(parts, unet, encode_prompts, batch, *args, **kwargs)

    monkeypatch.setattr(train_module, "batch_loss", recording)
    return seen


def datasets_flag(*entries: dict) -> tuple[str, str]:
    return ("--datasets", json.dumps(list(entries)))


def test_two_concepts_are_seen_in_the_ratio_of_their_repeats(run_training, tmp_path, record_batches):
    a = folder_with_captions(tmp_path / "A", 2, "TOK")
    b = folder_with_captions(tmp_path / "B", 3, "SKS")
    entries = datasets_flag({"image_dir": str(a), "repeats": 3}, {"image_dir": str(b), "repeats": 1})
    # Two concepts, each with its own new tokens: TOK -> <s0><s1>, SKS -> <s2><s3>.
    flags = ("--train_text_encoder_ti", "--token_abstraction", "TOK,SKS", "--train_batch_size", "3")
    epochs = 2
    run_training(tmp_path / "out", *flags, "--num_train_epochs", str(epochs), data=entries)

    captions = Counter(caption for captions, _, _ in record_batches for caption in captions)
    # Per epoch: each A image 3 times, each B image once (9 samples, 3 steps of 3).
    expected = {f"a photo of <s0><s1> toy, A{i}": 3 * epochs for i in range(2)}
    expected |= {f"a photo of <s2><s3> toy, B{i}": 1 * epochs for i in range(3)}
    assert captions == expected
    assert len(record_batches) == epochs * 3
    embeddings = load_file(tmp_path / "out" / "out_emb.safetensors")
    assert embeddings["clip_l"].shape[0] == 4  # both concepts' tokens trained and saved


def test_repeats_multiply_records_and_the_global_repeats_multiplies_all(tmp_path):
    a, b = write_demo_images(tmp_path / "A", count=2), write_demo_images(tmp_path / "B", count=3)
    config = {
        "pretrained_model_name_or_path": "/nonexistent/model",
        "instance_prompt": "a photo of TOK toy",
        "output_dir": str(tmp_path / "out"),
        "resolution": 64,
        "datasets": [
            {"image_dir": str(a), "repeats": 4, "instance_prompt": "a photo of TOK toy"},
            {"image_dir": str(b), "instance_prompt": "a photo of SKS toy", "resolution": 32},
        ],
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    args = parse_args(["--config", str(path)])
    records, sizes = load_entry_records(args, "instance")
    prompts = Counter(r.caption for r in records)
    assert prompts == {"a photo of TOK toy": 8, "a photo of SKS toy": 3}
    assert Counter(sizes) == {(64, 64): 8, (32, 32): 3}
    assert len(records) == len(sizes) == 11


def test_each_folder_trains_at_its_own_resolution(run_training, tmp_path, record_batches):
    a = folder_with_captions(tmp_path / "A", 2, "TOK")
    b = folder_with_captions(tmp_path / "B", 2, "SKS")
    entries = datasets_flag({"image_dir": str(a)}, {"image_dir": str(b), "resolution": 32})
    run_training(tmp_path / "out", "--max_train_steps", "4", data=entries)
    for captions, size, _ in record_batches:
        triggers = {"TOK" if "TOK" in c else "SKS" for c in captions}
        assert len(triggers) == 1, "a batch holds one size"
        assert size == ((64, 64) if triggers == {"TOK"} else (32, 32))
    assert {size for _, size, _ in record_batches} == {(64, 64), (32, 32)}


def test_regularisation_folder_gets_the_prior_loss(run_training, tmp_path, record_batches):
    a = folder_with_captions(tmp_path / "A", 2, "TOK")
    real = write_demo_images(tmp_path / "real-toys", count=3, seed=5)
    entries = datasets_flag(
        {"image_dir": str(a)},
        {"image_dir": str(real), "role": "class", "class_prompt": "a photo of a toy", "repeats": 2},
    )
    flags = ("--with_prior_preservation", "--max_train_steps", "3")
    out = run_training(tmp_path / "with-prior", *flags, data=entries)
    assert not list(real.glob("class-*")), "real class images are used as they are: nothing generated"
    for captions, _, num_prior in record_batches:
        assert num_prior == len(captions) // 2 > 0  # every instance sample is paired with a class sample
        assert captions[num_prior:] == ["a photo of a toy"] * num_prior
    # The class samples weigh in the loss: without their weight, other weights.
    run_training(tmp_path / "no-weight", *flags, "--prior_loss_weight", "0", data=entries)
    trained, unweighted = (
        load_file(out / "pytorch_lora_weights.safetensors"),
        load_file(tmp_path / "no-weight" / "pytorch_lora_weights.safetensors"),
    )
    assert any(not torch.equal(trained[k], unweighted[k]) for k in trained)


# ---------------------------------------------------------------------------------------------- bad entries


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    return write_demo_images(tmp_path / "A", count=2), write_demo_images(tmp_path / "R", count=2)


def parse_with(tmp_path: Path, datasets: list, **flags) -> None:
    config = {
        "pretrained_model_name_or_path": "/nonexistent/model",
        "instance_prompt": "a photo of TOK toy",
        "output_dir": str(tmp_path / "out"),
        "datasets": datasets,
        **flags,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    parse_args(["--config", str(path)])


def test_missing_folder(tmp_path, folders):
    with pytest.raises(InputError, match=r"entry 1: image_dir .*nope does not exist; give a folder of images"):
        parse_with(tmp_path, [{"image_dir": str(folders[0])}, {"image_dir": str(tmp_path / "nope")}])


def test_folder_both_instance_and_class(tmp_path, folders):
    entries = [{"image_dir": str(folders[0])}, {"image_dir": str(folders[0]), "role": "class"}]
    with pytest.raises(InputError, match=r"entries 0 and 1 use the folder .* both as training .* and as class"):
        parse_with(tmp_path, entries, with_prior_preservation=True, class_prompt="a toy")


@pytest.mark.parametrize(
    ("entries", "flags", "message"),
    [
        ([{"image_dir": "A", "role": "class"}], {}, "has only class entries"),
        ([{"image_dir": "A"}, {"image_dir": "R", "role": "class"}], {}, "set with_prior_preservation: true"),
        (
            [{"image_dir": "A"}, {"image_dir": "R", "role": "class"}],
            {"with_prior_preservation": True},
            "entry 1 (class images) needs a class_prompt",
        ),
        (
            [{"image_dir": "A"}, {"image_dir": "R", "role": "class", "class_prompt": "a toy"}],
            {"with_prior_preservation": True, "class_data_dir": "R"},
            "replace --class_data_dir",
        ),
        (
            [{"image_dir": "A"}, {"image_dir": "R", "role": "class", "resolution": 64}],
            {"with_prior_preservation": True, "class_prompt": "a toy"},
            "entry 1: resolution is for instance entries",
        ),
        ([{"image_dir": "A"}], {"instance_data_dir": "A"}, "drop --instance_data_dir"),
        ([{"image_dir": "A", "dataset_name": "x/y"}], {}, "exactly one of image_dir"),
        ([{"image_dir": "A", "caption_column": "text"}], {}, "apply to dataset_name entries"),
        ([{"image_dir": "A", "repeats": 0}], {}, "repeats must be at least 1"),
        ([{"image_dir": "A", "repeats": "2"}], {}, "key 'repeats' expects an integer, got '2'"),
        ([{"image_dir": "A", "resolution": 60}], {}, "resolution must be a positive multiple of 8"),
        ([{"image_dir": "A", "role": "reg"}], {}, "role must be instance or class"),
        ([{"imag_dir": "A"}], {}, "unknown key 'imag_dir'; did you mean 'image_dir'"),
        (["A"], {}, "entry 0 must be a mapping"),
        ([], {}, "non-empty list"),
    ],
)
def test_bad_entry(tmp_path, folders, monkeypatch, entries, flags, message):
    monkeypatch.chdir(tmp_path)  # "A" and "R" are the two image folders
    with pytest.raises(InputError, match=re.escape(message)):
        parse_with(tmp_path, entries, **flags)


def test_cli_bad_entry_fails_before_any_model_loads(tmp_path, folders):
    entries = json.dumps([{"image_dir": str(folders[0])}, {"image_dir": str(tmp_path / "nope")}])
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO / "train_dreambooth_lora_sdxl_advanced.py"), "--datasets", entries]
    command += ["--pretrained_model_name_or_path", "/nonexistent/model", "--instance_prompt", "x"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: --datasets entry 1: image_dir" in result.stderr and "does not exist" in result.stderr
    assert "/nonexistent/model" not in result.stderr


def test_bucketing_per_entry(tmp_path):
    from PIL import Image

    wide = tmp_path / "wide"
    wide.mkdir()
    Image.new("RGB", (256, 96), (200, 30, 30)).save(wide / "banner.png")
    square = write_demo_images(tmp_path / "square", count=1)
    entries = [{"image_dir": str(wide), "aspect_ratio_bucketing": True}, {"image_dir": str(square)}]
    flags = ["--pretrained_model_name_or_path", "m", "--instance_prompt", "p", "--output_dir", str(tmp_path / "o")]
    args = parse_args([*flags, "--resolution", "64", "--bucket_step", "16", "--datasets", json.dumps(entries)])
    _, sizes = load_entry_records(args, "instance")
    (width, height), square_size = sizes
    assert width > height and width % 16 == 0 and height % 16 == 0  # a wide bucket, not the square
    assert square_size == (64, 64)


def test_dataset_entry_with_a_caption_column_and_a_class_dataset(tmp_path):
    images = write_demo_images(tmp_path / "images", count=2)  # an ImageFolder: metadata.jsonl with "text"
    real = write_demo_images(tmp_path / "real", count=2, seed=3)
    entries = [
        {"dataset_name": str(images), "caption_column": "text", "repeats": 2},
        {"dataset_name": str(real), "role": "class", "class_prompt": "a photo of a toy"},
    ]
    flags = ["--pretrained_model_name_or_path", "m", "--instance_prompt", "p", "--output_dir", str(tmp_path / "o")]
    args = parse_args([*flags, "--with_prior_preservation", "--resolution", "64", "--datasets", json.dumps(entries)])
    records, sizes = load_entry_records(args, "instance")
    captions = [json.loads(line)["text"] for line in (images / "metadata.jsonl").read_text().splitlines()]
    assert [r.caption for r in records] == captions * 2 and sizes == [(64, 64)] * 4
    class_records, _ = load_entry_records(args, "class")
    assert [r.caption for r in class_records] == ["a photo of a toy"] * 2  # not the dataset's captions


def test_toml_array_of_tables(tmp_path):
    a, b = write_demo_images(tmp_path / "A", count=1), write_demo_images(tmp_path / "B", count=1)
    path = tmp_path / "run.toml"
    path.write_text(
        f"""pretrained_model_name_or_path = "m"
instance_prompt = "a photo of TOK toy"
output_dir = "{tmp_path / "out"}"

[[datasets]]
image_dir = "{a}"
repeats = 2

[[datasets]]
image_dir = "{b}"
instance_prompt = "a photo of SKS toy"
"""
    )
    args = parse_args(["--config", str(path)])
    assert [(e["image_dir"], e["repeats"], e["instance_prompt"]) for e in args.datasets] == [
        (str(a), 2, None),
        (str(b), 1, "a photo of SKS toy"),
    ]

"""Class-image generation for prior preservation, on the tiny SDXL at 64 px with 2 denoising steps."""

from __future__ import annotations

import shutil
import subprocess
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_pivotal.args import build_parser
from sdxl_pivotal.class_images import (
    class_image_name,
    ensure_class_images,
    generation_dtype,
    load_generation_pipeline,
    validate_prior_flags,
)
from sdxl_pivotal.errors import InputError

PROMPT = "a photo of a dog"
COUNT = 5
BATCH = 2
NAMES = [class_image_name(PROMPT, i) for i in range(COUNT)]


class Interrupted(Exception):
    """Stands for a crash or Ctrl-C during generation."""


class RecordingFactory:
    """A pipeline factory over the tiny model that counts loads, pipeline calls and saved images, and can
    interrupt the run while it writes its `interrupt_at_save`-th image (0-based), after writing part of it."""

    def __init__(self, model: Path, interrupt_at_save: int | None = None):
        self.model = model
        self.interrupt_at_save = interrupt_at_save
        self.loads = 0
        self.calls = 0
        self.saves = 0
        self.loaded: list[weakref.ref] = []

    def __call__(self) -> RecordingPipeline:
        from diffusers import StableDiffusionXLPipeline

        self.loads += 1
        pipeline = StableDiffusionXLPipeline.from_pretrained(self.model)
        self.loaded.append(weakref.ref(pipeline))
        return RecordingPipeline(pipeline, self)


@dataclass
class RecordingPipeline:
    pipeline: object
    factory: RecordingFactory

    def set_progress_bar_config(self, **kwargs) -> None:
        self.pipeline.set_progress_bar_config(**kwargs)

    def __call__(self, **kwargs):
        self.factory.calls += 1
        output = self.pipeline(**kwargs)
        output.images = [RecordingImage(image, self.factory) for image in output.images]
        return output


@dataclass
class RecordingImage:
    image: Image.Image
    factory: RecordingFactory

    def save(self, path: Path, format: str) -> None:
        if self.factory.saves == self.factory.interrupt_at_save:
            Path(path).write_bytes(b"\x89PNG\r\n\x1a\n half an image")
            raise Interrupted
        self.factory.saves += 1
        self.image.save(path, format=format)


def generate(folder: Path, factory, **overrides) -> list[Path]:
    options = dict(seed=0, resolution=64, batch_size=BATCH, num_inference_steps=2, progress=False)
    return ensure_class_images(folder, PROMPT, overrides.pop("count", COUNT), factory, **{**options, **overrides})


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_same_images(folder: Path, reference: Path, names: list[str]) -> None:
    for name in names:
        assert np.array_equal(pixels(folder / name), pixels(reference / name)), name


def entries(folder: Path) -> list[str]:
    """Everything in the folder, hidden files included."""
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and on a shared CPU thread barriers make it many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Reference:
    folder: Path
    factory: RecordingFactory
    paths: list[Path]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Reference:
    """An uninterrupted generation of COUNT images in batches of BATCH, into an empty folder."""
    folder = tmp_path_factory.mktemp("reference") / "class"
    factory = RecordingFactory(tiny_model)
    return Reference(folder, factory, generate(folder, factory))


def test_generates_the_missing_images_in_batches_and_frees_the_pipeline(reference):
    assert [p.name for p in reference.paths] == NAMES
    assert entries(reference.folder) == NAMES  # no temporary files left
    assert (reference.factory.loads, reference.factory.calls) == (1, 3)  # batches [0, 1], [2, 3], [4]
    for path in reference.paths:
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))
    assert reference.factory.loaded[0]() is None  # the pipeline was released
    # Different indices are very different images: the tolerances below are meaningful.
    assert np.abs(pixels(reference.paths[0]) - pixels(reference.paths[1])).max() > 50


def test_second_call_generates_nothing(reference, tiny_model, tmp_path):
    folder = tmp_path / "class"
    shutil.copytree(reference.folder, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    factory = RecordingFactory(tiny_model)
    paths = generate(folder, factory)
    assert [p.name for p in paths] == NAMES
    assert (factory.loads, factory.calls) == (0, 0)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("interrupt_at_save", [2, 3], ids=["between-batches", "inside-a-batch"])
def test_resumed_generation_writes_the_uninterrupted_images(reference, tiny_model, tmp_path, interrupt_at_save):
    folder = tmp_path / "class"
    with pytest.raises(Interrupted):
        generate(folder, RecordingFactory(tiny_model, interrupt_at_save=interrupt_at_save))
    # Finished images are kept; the one being written is absent, with no temporary file beside it.
    assert entries(folder) == NAMES[:interrupt_at_save]
    kept = {name: (folder / name).read_bytes() for name in NAMES[:interrupt_at_save]}

    factory = RecordingFactory(tiny_model)
    paths = generate(folder, factory)
    assert [p.name for p in paths] == NAMES
    assert entries(folder) == NAMES
    assert_same_images(folder, reference.folder, NAMES)
    assert all((folder / name).read_bytes() == data for name, data in kept.items())
    # The partly written batch [2, 3] is computed again whole (same companions), then [4].
    assert factory.calls == 2
    assert factory.saves == COUNT - interrupt_at_save


def test_batch_size_changes_images_only_by_rounding(reference, tiny_model, tmp_path):
    folder = tmp_path / "class"
    factory = RecordingFactory(tiny_model)
    generate(folder, factory, batch_size=COUNT)
    assert factory.calls == 1
    for name in NAMES:
        difference = np.abs(pixels(folder / name) - pixels(reference.folder / name))
        # Batched float computation is not bit-identical across batch sizes; 8-bit images differ by at most
        # a level or two in a handful of pixels.
        assert difference.max() <= 2, name
        assert (difference > 0).mean() < 0.01, name


def test_user_images_are_kept_counted_and_never_overwritten(reference, tiny_model, tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (80, 60), (200, 10, 10)).save(folder / "my_dog.jpg")
    # A user's image that happens to carry a generated name stands for that generated image.
    Image.new("RGB", (64, 64), (10, 200, 10)).save(folder / NAMES[0])
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"hidden")
    user_files = {name: (folder / name).read_bytes() for name in ("my_dog.jpg", NAMES[0])}

    factory = RecordingFactory(tiny_model)
    paths = generate(folder, factory)
    # my_dog.jpg counts as one image, so four generated names fill the five: batches [0, 1], [2, 3].
    assert [p.name for p in paths] == [*NAMES[:4], "my_dog.jpg"]
    assert {name: (folder / name).read_bytes() for name in user_files} == user_files
    assert factory.calls == 2 and factory.saves == 3
    assert_same_images(folder, reference.folder, NAMES[1:4])

    enough = RecordingFactory(tiny_model)
    assert len(generate(folder, enough, count=3)) == COUNT
    assert enough.loads == 0


def test_two_processes_write_exactly_what_one_process_writes(reference, tiny_model, tmp_path):
    folder = tmp_path / "class"
    barriers = []
    shares = []
    for process_index in (0, 1):
        before = set(entries(folder)) if folder.exists() else set()
        factory = RecordingFactory(tiny_model)
        generate(folder, factory, process_index=process_index, num_processes=2, barrier=lambda: barriers.append(1))
        shares.append(sorted(set(entries(folder)) - before))
    # Batches [0, 1] and [4] belong to process 0, [2, 3] to process 1.
    assert shares == [[NAMES[0], NAMES[1], NAMES[4]], [NAMES[2], NAMES[3]]]
    assert len(barriers) == 2
    assert entries(folder) == NAMES
    assert_same_images(folder, reference.folder, NAMES)


def test_class_folder_errors(tiny_model, tmp_path):
    factory = RecordingFactory(tiny_model)
    a_file = tmp_path / "a_file.png"
    a_file.write_bytes(b"x")
    with pytest.raises(InputError, match="is a file"):
        generate(a_file, factory)
    with pytest.raises(InputError, match="cannot be created"):
        generate(a_file / "class", factory)
    with pytest.raises(ValueError, match="batch_size"):
        generate(tmp_path / "class", factory, batch_size=0)
    assert factory.loads == 0


def parse(tmp_path: Path, *flags: str):
    instance_dir = tmp_path / "instance"
    instance_dir.mkdir(exist_ok=True)
    base = ["--pretrained_model_name_or_path", "m", "--instance_prompt", "a photo of TOK dog"]
    return build_parser().parse_args([*base, "--instance_data_dir", str(instance_dir), *flags])


def prior_flags(tmp_path: Path, *flags: str) -> list[str]:
    base = ["--with_prior_preservation", "--class_prompt", "a photo of a dog"]
    return [*base, "--class_data_dir", str(tmp_path / "class"), *flags]


def test_valid_prior_flags_pass(tmp_path):
    validate_prior_flags(parse(tmp_path, *prior_flags(tmp_path)))
    validate_prior_flags(parse(tmp_path, *prior_flags(tmp_path, "--prior_loss_weight", "0")))
    # Without --with_prior_preservation the class flags are ignored (args.py warns), not checked.
    validate_prior_flags(parse(tmp_path, "--num_class_images", "0", "--class_data_dir", str(tmp_path)))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--with_prior_preservation"], "needs --class_prompt"),
        (["--with_prior_preservation", "--class_prompt", " "], "needs --class_prompt"),
        (["--with_prior_preservation", "--class_prompt", "a dog"], "needs --class_data_dir"),
        (["--class_data_dir", "{file}"], "is a file"),
        (["--class_data_dir", "{file}/class"], "cannot be created"),
        (["--class_data_dir", "{instance}"], "is the instance image folder"),
        (["--num_class_images", "0"], "--num_class_images must be at least 1"),
        (["--sample_batch_size", "0"], "--sample_batch_size must be at least 1"),
        (["--prior_loss_weight", "-0.5"], "--prior_loss_weight must be 0 or more"),
    ],
)
def test_invalid_prior_flags(tmp_path, flags, message):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    places = dict(file=a_file, instance=tmp_path / "instance")
    flags = [flag.format(**places) for flag in flags]
    if flags[0] != "--with_prior_preservation":
        flags = prior_flags(tmp_path, *flags)  # later flags override the defaults
    with pytest.raises(InputError, match=message):
        validate_prior_flags(parse(tmp_path, *flags))


def test_validation_does_not_load_torch():
    """args.py calls validate_prior_flags before torch is imported, so a bad command line fails in a second."""
    code = "import sys, sdxl_pivotal.class_images; print(sorted({'torch', 'diffusers', 'numpy'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_generation_dtype_follows_the_reference():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [generation_dtype(p, cuda) for p in (None, "no", "fp32", "fp16", "bf16")] == [
        torch.float16,
        torch.float16,
        torch.float32,
        torch.float16,
        torch.bfloat16,
    ]
    assert [generation_dtype(p, cpu) for p in (None, "no", "bf16")] == [torch.float32, torch.float32, torch.bfloat16]


def test_load_generation_pipeline_is_the_base_model(tiny_model, tmp_path):
    args = parse(tmp_path, "--pretrained_model_name_or_path", str(tiny_model))
    args.pretrained_vae_model_name_or_path = str(tiny_model / "vae")
    pipeline = load_generation_pipeline(args, torch.device("cpu"), torch.bfloat16)
    assert pipeline.unet.dtype == pipeline.vae.dtype == torch.bfloat16
    assert pipeline.unet.device.type == "cpu"
    assert not getattr(pipeline.unet, "peft_config", None)
    assert len(pipeline.tokenizer) == pipeline.text_encoder.config.vocab_size  # no new tokens


def test_load_generation_pipeline_refuses_pickled_weights(tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model, model)
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    shutil.rmtree(model / "unet")
    unet.save_pretrained(model / "unet", safe_serialization=False)
    args = parse(tmp_path, "--pretrained_model_name_or_path", str(model))
    with pytest.raises((OSError, ValueError)):
        load_generation_pipeline(args, torch.device("cpu"), torch.float32)

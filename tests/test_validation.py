"""Validation images, the model card, and that neither changes what is trained."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from peft.tuners.lokr import LoKrLayer
from peft_layers import adapter_layers
from PIL import Image
from safetensors.torch import load_file

from sdxl_pivotal.validation import is_validation_step

VALIDATION = (
    *("--validation_prompt", "TOK toy on a beach", "--num_validation_images", "2"),
    *("--validation_inference_steps", "2", "--validation_steps", "2"),
)
TI = ("--train_text_encoder_ti", "--text_encoder_lr", "1e-2")


def tensorboard_image_tags(logs: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, list[int]] = {}
    for events in logs.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["images"]:
            tags.setdefault(tag, []).extend(event.step for event in accumulator.Images(tag))
    return tags


def test_validation_images_saved_logged_and_reproduced_from_files(run_training, tmp_path):
    out = run_training(tmp_path / "run", "--max_train_steps", "4", "--report_to", "tensorboard", *TI, *VALIDATION)
    for folder in ("step-2", "step-4", "final"):
        images = sorted((out / "validation" / folder).glob("*.png"))
        assert [p.name for p in images] == ["0.png", "1.png"], folder
        assert Image.open(images[0]).size == (64, 64)
    tags = tensorboard_image_tags(out / "logs")
    assert sorted(tags["validation"]) == [2, 4] and tags["final"] == [4]

    # The final images come from the saved files loaded as a user would; with the same seed they must
    # match the images of the trained modules at the last step.
    for i in range(2):
        live = np.asarray(Image.open(out / "validation" / "step-4" / f"{i}.png"), dtype=np.float32)
        reloaded = np.asarray(Image.open(out / "validation" / "final" / f"{i}.png"), dtype=np.float32)
        assert np.abs(live - reloaded).mean() < 1.0, "the saved LoRA and embeddings reproduce the trained model"
    different_seed = np.asarray(Image.open(out / "validation" / "step-2" / "0.png"), dtype=np.float32)
    assert np.abs(different_seed - np.asarray(Image.open(out / "validation" / "step-4" / "0.png"))).mean() > 0


@pytest.mark.parametrize(
    "flags",
    [("--use_dora", "--train_text_encoder"), ("--adapter", "loha"), ("--adapter", "lokr", *TI)],
    ids=["dora-text-encoders", "loha", "lokr-pivotal"],
)
def test_final_images_are_the_trained_model(run_training, tmp_path, flags):
    """The final images come from the saved files through `load_for_diffusers`: every adapter family loads (LoHa and
    LoKr used to stop the run with diffusers' "Invalid LoRA checkpoint"), and at the same seed they are the images
    of the trained modules at the last step, pixel for pixel (text-encoder DoRA magnitudes included)."""
    validation = (*VALIDATION[:-1], "1")  # images after steps 1 and 2
    out = run_training(tmp_path / "run", "--max_train_steps", "2", "--learning_rate", "1e-2", *flags, *validation)
    for i in range(2):
        live = np.asarray(Image.open(out / "validation" / "step-2" / f"{i}.png"))
        final = np.asarray(Image.open(out / "validation" / "final" / f"{i}.png"))
        earlier = np.asarray(Image.open(out / "validation" / "step-1" / f"{i}.png"))
        assert not np.array_equal(live, earlier), "the last step changed the images"
        np.testing.assert_array_equal(final, live)
    assert (out / "README.md").is_file()


def test_fp16_on_a_cpu_is_refused_before_any_model_loads(run_training, tmp_path, monkeypatch):
    """accelerate neither autocasts nor scales the loss in fp16 on a CPU; the run used to train and then fail in the
    first validation's VAE decode."""
    from sdxl_pivotal import train as train_module
    from sdxl_pivotal.errors import InputError

    def no_models(*_):
        raise AssertionError("models loaded before the mixed precision was checked")

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.setattr(train_module, "load_sdxl", no_models)
    with pytest.raises(InputError, match=r"fp16 needs a GPU.*bf16 or no"):
        run_training(tmp_path / "run", "--mixed_precision", "fp16", "--max_train_steps", "1", *VALIDATION)


def test_validation_does_not_change_training(run_training, tmp_path):
    flags = ("--max_train_steps", "4", "--lora_dropout", "0.1", *TI)
    plain = run_training(tmp_path / "plain", *flags)
    validated = run_training(tmp_path / "validated", *flags, *VALIDATION)
    for name in ("pytorch_lora_weights.safetensors",):
        a, b = load_file(plain / name), load_file(validated / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = load_file(plain / "plain_emb.safetensors"), load_file(validated / "validated_emb.safetensors")
    assert torch.equal(a["clip_l"], b["clip_l"]) and torch.equal(a["clip_g"], b["clip_g"])


def test_model_card_has_tokens_code_and_samples(run_training, tmp_path):
    out = run_training(tmp_path / "tok-toy", "--max_train_steps", "2", "--clip_skip", "1", *TI, *VALIDATION)
    card = (out / "README.md").read_text()
    assert "base_model: " in card and 'instance_prompt: "a photo of <s0><s1> toy"' in card
    assert 'tokens = ["<s0>", "<s1>"]' in card
    assert 'state = load_file("tok-toy/tok-toy_emb.safetensors")' in card
    assert "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2" in card
    assert 'image = pipe("a photo of <s0><s1> toy", clip_skip=1)' in card
    assert "url: validation/final/0.png" in card and "![sample 1](validation/final/1.png)" in card
    # AUTOMATIC1111 and ComfyUI load the kohya file of the run; the trigger is the embedding's name there.
    assert "copy `tok-toy.safetensors` into `models/Lora/`" in card
    assert "`a photo of tok-toy toy <lora:tok-toy:1>`" in card
    assert "Copy `tok-toy_emb.safetensors` into `models/embeddings/`" in card
    assert "`a photo of embedding:tok-toy_emb toy`" in card
    assert (out / "tok-toy.safetensors").is_file() and (out / "tok-toy_emb.safetensors").is_file()
    # The card's diffusers code is real code: run it (CPU, fp32, local paths) and get an image.
    namespace = run_card_code(card, out, 'pipe("a photo of <s0><s1> toy", clip_skip=1')
    assert namespace["image"].size == (64, 64)


def run_card_code(card: str, out: Path, call: str) -> dict:
    """Execute the card's diffusers code on the CPU in float32 from the output folder's parent, with `call` (the
    start of its pipeline call) made small; return its namespace."""
    import os

    code = card.split("```python\n")[1].split("```")[0]
    code = code.replace("dtype=torch.float16", "dtype=torch.float32").replace('.to("cuda")', "")
    code = code.replace(call, call + ", num_inference_steps=2, height=64, width=64")
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(out.parent)
    try:
        exec(compile(code, "model-card", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace


def test_model_card_code_loads_lokr_and_warns_a1111_users_off_dora(run_training, tmp_path):
    """diffusers' load_lora_weights reads no LoKr: the card loads it with PEFT, and the code runs."""
    out = run_training(tmp_path / "lokr", "--max_train_steps", "1", "--adapter", "lokr", "--train_text_encoder")
    card = (out / "README.md").read_text()
    assert "pipe.load_lora_weights(" not in card and "| `adapter` | `lokr` |" in card
    namespace = run_card_code(card, out, 'pipe("a photo of TOK toy"')
    assert namespace["image"].size == (64, 64)
    assert adapter_layers(namespace["pipe"].unet) and adapter_layers(namespace["pipe"].text_encoder_2)
    assert all(isinstance(layer, LoKrLayer) for layer in adapter_layers(namespace["pipe"].unet).values())

    dora = run_training(tmp_path / "dora", "--max_train_steps", "1", "--use_dora")
    card = (dora / "README.md").read_text()
    assert "- **AUTOMATIC1111:** **not for this model:**" in card and "apply this model's DoRA exactly" in card


@pytest.mark.parametrize(
    ("validation_steps", "validation_epochs", "expected"),
    [(None, 2, [3, 9, 15]), (None, 1, [3, 6, 9, 12, 15, 18]), (4, 50, [4, 8, 12, 16])],
)
def test_validation_schedule(validation_steps, validation_epochs, expected):
    """3 steps per epoch: epochs 0, N, 2N... end at steps 3, 3 + 3N, ... (the reference's `epoch % N == 0`)."""
    args = Namespace(validation_prompt="x", validation_steps=validation_steps, validation_epochs=validation_epochs)
    assert [done for done in range(1, 19) if is_validation_step(args, done, 3)] == expected
    assert not any(is_validation_step(Namespace(validation_prompt=None), d, 3) for d in range(1, 19))

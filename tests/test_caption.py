"""The captioner (`python -m sdxl_pivotal.caption`), with a tiny randomly initialised BLIP built from a config:
no download. Offline, the default model fails with a message that says what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from sdxl_pivotal.caption import DEFAULT_MODEL, Captioner, caption_folder, main, with_concept
from sdxl_pivotal.errors import InputError

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "red", "toy", "on", "blue"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    """A BLIP captioning model (1 layer, width 32, 13-word vocabulary) saved as a Hub model folder is."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    folder = tmp_path_factory.mktemp("tiny-blip")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(
        vision_config=dict(**layers, image_size=32, patch_size=16),
        text_config=dict(
            **layers, vocab_size=len(WORDS), encoder_hidden_size=32, bos_token_id=5, pad_token_id=0, sep_token_id=3
        ),
        projection_dim=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200), (30, 200, 30)]):
        Image.new("RGB", (48 + 8 * i, 40), colour).save(folder / f"p{i}.png")
    (folder / "p2.txt").write_text("kept by hand")
    (folder / "notes.md").write_text("not an image")
    return folder


def test_captions_are_words_of_the_model_and_deterministic(tiny_blip, photos):
    captioner = Captioner.load(str(tiny_blip), device="cpu")
    images = [Image.open(p).convert("RGB") for p in sorted(photos.glob("*.png"))]
    first, again = captioner.caption(images), captioner.caption(images)
    assert first == again and len(first) == 3
    vocabulary = set(WORDS[6:])
    for text in first:
        assert text and set(text.split()) <= vocabulary  # decoded from the model's own vocabulary


def test_folder_gets_sidecars_with_the_concept_and_keeps_existing_ones(tiny_blip, photos):
    written = caption_folder(photos, Captioner.load(str(tiny_blip), device="cpu"), "a photo of TOK")
    assert sorted(p.name for p in written) == ["p0.txt", "p1.txt"]
    assert (photos / "p0.txt").read_text().startswith("a photo of TOK, ")
    assert (photos / "p2.txt").read_text() == "kept by hand"
    assert not (photos / "notes.txt").exists()


def test_command_line(tiny_blip, photos, capsys):
    assert main([str(photos), "--model", str(tiny_blip), "--suffix", "in the style of TOK", "--overwrite"]) == 0
    assert (photos / "p2.txt").read_text().endswith(", in the style of TOK")
    assert "wrote 3 caption files" in capsys.readouterr().out


def test_offline_default_model_fails_clearly(monkeypatch, capsys, photos):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"Could not load the captioning model .*write the captions by hand"):
        Captioner.load(DEFAULT_MODEL)
    assert main([str(photos)]) == 2
    assert "error: Could not load" in capsys.readouterr().out


def test_concept_position():
    assert with_concept("a red toy", "a photo of TOK") == "a photo of TOK, a red toy"
    assert with_concept("a red toy", "in the style of TOK", "after") == "a red toy, in the style of TOK"
    assert with_concept("", "TOK") == "TOK"

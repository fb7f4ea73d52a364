"""The model card's diffusers code is the recipe of our one loader (`load_for_diffusers`): run it for every adapter
family, with and without text-encoder training and pivotal tuning, and compare the pipeline it builds with the
trained modules and with `load_for_diffusers`."""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch
from test_formats import assert_outputs_equal, fresh_pipeline, outputs, trained_parts
from test_validation import run_card_code

from sdxl_pivotal.card import ui_instructions
from sdxl_pivotal.formats import load_for_diffusers
from sdxl_pivotal.tokens import PivotalTokens

FAMILIES = {
    "lora": (),
    "dora": ("--use_dora",),
    "loha": ("--adapter", "loha"),
    "lokr": ("--adapter", "lokr"),
    "ia3": ("--adapter", "ia3"),
}
TEXT = {"unet only": (), "text encoders": ("--train_text_encoder",), "pivotal": ("--train_text_encoder_ti",)}
STEP = ("--max_train_steps", "1", "--checkpointing_steps", "1", "--learning_rate", "1e-2", "--text_encoder_lr", "1e-1")


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXT)
@pytest.mark.parametrize("family", FAMILIES)
def test_card_code_loads_the_trained_model(run_training, tiny_model, demo_images, tmp_path, family, text):
    flags = (*FAMILIES[family], *TEXT[text])
    out = run_training(tmp_path / "tok-toy", *flags, *STEP)
    card = (out / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    # diffusers' own calls where they load exactly what our loader loads; our loader itself where they do not.
    diffusers_exact = family == "lora" or (family == "dora" and text != "text encoders")
    assert ("pipe.load_lora_weights(" in code) == diffusers_exact
    assert ("load_for_diffusers(pipe, " in code) == (not diffusers_exact)
    assert ("load_textual_inversion" in code) == (diffusers_exact and text == "pivotal")

    prompt = "a photo of <s0><s1> toy" if text == "pivotal" else "a photo of TOK toy"
    namespace = run_card_code(card, out, f'pipe("{prompt}"')
    assert namespace["image"].size == (64, 64)
    from_card = outputs(namespace["pipe"], prompt)

    parts, _ = trained_parts(tiny_model, demo_images, out, 1, *flags)
    trained = outputs(parts, prompt)
    base = outputs(fresh_pipeline(tiny_model), prompt)
    assert not torch.allclose(trained[0], base[0], atol=1e-4), "the UNet adapter has an effect"
    if text != "unet only":
        assert not torch.allclose(trained[1], base[1], atol=1e-4), "the text-encoder training has an effect"
    ours = fresh_pipeline(tiny_model)
    load_for_diffusers(ours, out)
    assert_outputs_equal(outputs(ours, prompt), trained)
    assert_outputs_equal(from_card, trained)


def ui_section(tokens: bool = True, **flags) -> dict[str, str]:
    """The card's line for each UI, for a run `runs/tok-toy` with `flags`."""
    args = dict(output_dir="runs/tok-toy", instance_prompt="a photo of TOK toy", use_dora=False, adapter="lora")
    args |= dict(bundle_embeddings=True, use_effective_conv2d=False, conv_rank=None) | flags
    pivotal = PivotalTokens.from_flags("TOK", 2) if tokens else None
    text = ui_instructions(Namespace(**args), pivotal)
    return {ui: text.split(f"- **{ui}:** ")[1].split("\n")[0] for ui in ("AUTOMATIC1111", "Forge", "ComfyUI")}


def test_card_says_what_each_ui_does_with_bundled_embeddings():
    lines = ui_section()
    # A1111 reads `bundle_emb.tok-toy.*` as the embedding `tok-toy`; Forge ignores it, so its trigger is the
    # `_emb` file's name in `embeddings/`; ComfyUI reports the two bundled keys as not loaded.
    assert "register as the embedding `tok-toy`" in lines["AUTOMATIC1111"]
    assert lines["AUTOMATIC1111"].endswith("Prompt: `a photo of tok-toy toy <lora:tok-toy:1>`")
    assert "Forge does not load the bundled embeddings" in lines["Forge"]
    assert "copy `tok-toy_emb.safetensors` into `embeddings/`" in lines["Forge"]
    assert lines["Forge"].endswith("Prompt: `a photo of tok-toy_emb toy <lora:tok-toy:1>`")
    assert '"lora key not loaded"' in lines["ComfyUI"] and "`bundle_emb.tok-toy.clip_l`" in lines["ComfyUI"]
    assert (
        "into `models/embeddings/`" in lines["ComfyUI"]
        and "`a photo of embedding:tok-toy_emb toy`" in lines["ComfyUI"]
    )

    unbundled = ui_section(bundle_embeddings=False)
    assert "into `embeddings/`: it registers as the embedding `tok-toy_emb`" in unbundled["AUTOMATIC1111"]
    assert "bundled" not in unbundled["Forge"] and "lora key not loaded" not in unbundled["ComfyUI"]
    plain = ui_section(tokens=False)
    assert "embedding" not in " ".join(plain.values()) and "`a photo of TOK toy <lora:tok-toy:1>`" in plain["Forge"]


def test_card_warns_a1111_users_off_dora_and_promises_lokr_tucker_everywhere():
    dora = ui_section(use_dora=True)
    assert "not for this model" in dora["AUTOMATIC1111"] and "input channels" in dora["AUTOMATIC1111"]
    assert "<lora:tok-toy:1>" in dora["Forge"] and "Load LoRA" in dora["ComfyUI"]
    text = ui_instructions(
        Namespace(
            output_dir="tok-toy",
            instance_prompt="TOK",
            use_dora=False,
            adapter="lokr",
            bundle_embeddings=True,
            use_effective_conv2d=True,
            conv_rank=4,
        ),
        None,
    )
    # The kohya file writes Tucker-form 3x3 convolutions untucked, which all three UIs apply (test_adapters).
    assert "all three apply the trained weights" in text


@pytest.mark.slow
def test_example_script_generates_with_every_file_family(run_training, tiny_model, tmp_path):
    """examples/generate.py loads through `load_for_diffusers`: a LoKr run with pivotal tuning (which diffusers'
    `load_lora_weights` refuses) gives an image and its tokens."""
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    out = run_training(tmp_path / "tok-toy", "--adapter", "lokr", "--train_text_encoder_ti", *STEP)
    script = Path(__file__).resolve().parent.parent / "examples" / "generate.py"
    sample = tmp_path / "sample.png"
    argv = ["--model", str(tiny_model), "--lora", str(out), "--prompt", "a photo of <s0><s1> toy"]
    argv += ["--output", str(sample), "--steps", "2", "--resolution", "64"]
    done = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "new tokens: <s0> <s1>" in done.stdout
    assert Image.open(sample).size == (64, 64)

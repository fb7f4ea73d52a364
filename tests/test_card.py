"""The model card's diffusers code is the recipe of our one loader (`load_for_diffusers`): run it for every adapter
family, with and without text-encoder training and pivotal tuning, and compare the pipeline it builds with the
trained modules and with `load_for_diffusers`."""

from __future__ import annotations

import pytest
import torch
from test_formats import assert_outputs_equal, fresh_pipeline, outputs, trained_parts
from test_validation import run_card_code

from sdxl_pivotal.formats import load_for_diffusers

FAMILIES = {
    "lora": (),
    "dora": ("--use_dora",),
    "loha": ("--adapter", "loha"),
    "lokr": ("--adapter", "lokr"),
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

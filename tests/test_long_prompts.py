"""--max_token_length 150|225 on the tiny SDXL: the long encoding equals a reference built by hand with kohya's
sd-scripts' rules, 75 is today's 77-token encoding, words past token 77 reach training and the validation
images, and caching, resume, the config file and the model card keep it."""

from __future__ import annotations

import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from run_helpers import assert_same_tensors, lora_file, train_until_first_checkpoint
from test_validation import run_card_code

from sdxl_pivotal.args import parse_args
from sdxl_pivotal.data import DreamBoothDataset, collate, load_records
from sdxl_pivotal.errors import InputError
from sdxl_pivotal.models import load_sdxl
from sdxl_pivotal.prompts import PromptEncoder, pipeline_embeddings, tokenize, warn_if_truncated
from sdxl_pivotal.space.results import TryIt
from sdxl_pivotal.tokens import PivotalTokens, add_new_tokens, new_token_rows
from sdxl_pivotal.train import batch_loss
from sdxl_pivotal.validation import generate

# Words of one token each in the tiny vocabulary.
WORDS = "a photo of the dog cat man face style painting portrait red blue yellow toy figure".split()


def caption(tokens: int, last: str | None = None) -> str:
    """A caption of exactly `tokens` tokens; `last` replaces its last word."""
    words = [WORDS[i % len(WORDS)] for i in range(tokens)]
    if last is not None:
        words[-1] = last
    return " ".join(words)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def encoder_of(pipe, max_token_length: int | None, cache: bool = True) -> PromptEncoder:
    return PromptEncoder(
        [pipe.tokenizer, pipe.tokenizer_2],
        [pipe.text_encoder, pipe.text_encoder_2],
        None,
        cache=cache,
        max_token_length=max_token_length,
    )


def kohya_chunks(tokenizer, text: str, max_token_length: int) -> list[list[int]]:
    """kohya's sd-scripts (strategy_base._get_input_ids), written out: tokenize to max_token_length + 2 with
    padding, then take `[first id] + 75 ids + [last id]` windows; for a tokenizer whose pad is not its EOS
    (SDXL's second), a window ending in text ends in EOS, and an empty window starts with EOS."""
    ids = tokenizer(text, padding="max_length", truncation=True, max_length=max_token_length + 2).input_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for start in range(1, max_token_length + 2 - 77 + 2, 75):
        chunk = [ids[0], *ids[start : start + 75], ids[-1]]
        if pad != eos:
            if chunk[-2] not in (eos, pad):
                chunk[-1] = eos
            if chunk[1] == pad:
                chunk[1] = eos
        chunks.append(chunk)
    return chunks


def kohya_reference(pipe, text: str, max_token_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [75 n + 2, C], pooled [C]) of one caption: every chunk through each encoder on its own, the
    penultimate hidden states joined as kohya joins them (the first BOS, each chunk's 75 inner positions, the last
    chunk's final position), the pooled output of the first chunk."""
    joined = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        states = []
        for chunk in kohya_chunks(tokenizer, text, max_token_length):
            output = encoder(torch.tensor([chunk]), output_hidden_states=True)
            states.append(output.hidden_states[-2][0])
            if len(states) == 1:
                pooled = output[0][0]  # the first chunk's; for encoder 2 this is the projected pooled output
        joined.append(torch.cat([states[0][:1], *[s[1:76] for s in states], states[-1][76:]]))
    return torch.cat(joined, dim=-1), pooled


@pytest.mark.parametrize("max_token_length", [150, 225])
def test_long_encoding_equals_kohya_built_by_hand(pipe, max_token_length):
    lengths = [4, 74, 75, 76, 149, 150, 151, 224, 225, 300]  # around every chunk edge, and truncated
    captions = [caption(n) for n in lengths]
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        assert len(tokenizer(captions[-1], add_special_tokens=False).input_ids) == 300
        ids = tokenize(tokenizer, captions, max_token_length)
        expected = torch.tensor([kohya_chunks(tokenizer, c, max_token_length) for c in captions])
        assert torch.equal(ids, expected)
    with torch.no_grad():
        embeds, pooled = encoder_of(pipe, max_token_length, cache=False)(captions, trainable=False)
        assert embeds.shape == (len(captions), max_token_length + 2, 32 + 32)
        for i, text in enumerate(captions):
            expected_embeds, expected_pooled = kohya_reference(pipe, text, max_token_length)
            torch.testing.assert_close(embeds[i], expected_embeds, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(pooled[i], expected_pooled, rtol=1e-5, atol=1e-5)


def test_75_and_the_default_are_diffusers_encoding(pipe):
    """Up to 77 tokens nothing changes: the default and 75 give diffusers' own `encode_prompt`, bit for bit (longer
    captions are truncated alike). At 150 a short caption keeps its first 76 positions and its pooled output, and
    gains 76 more (the second chunk, empty: BOS, EOS, padding) in place of its last position."""
    captions = ["a photo of TOK toy", "", caption(75), caption(120)]
    with torch.no_grad():
        reference, _, reference_pooled, _ = pipe.encode_prompt(
            captions, device="cpu", do_classifier_free_guidance=False
        )
        for max_token_length in (None, 75):
            embeds, pooled = encoder_of(pipe, max_token_length, cache=False)(captions, trainable=False)
            assert torch.equal(embeds, reference) and torch.equal(pooled, reference_pooled)
        long_embeds, long_pooled = encoder_of(pipe, 150, cache=False)(captions, trainable=False)
    assert long_embeds.shape[1] == 152
    torch.testing.assert_close(long_embeds[:3, :76], reference[:3, :76], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(long_pooled, reference_pooled, rtol=1e-5, atol=1e-6)


def test_late_words_count_only_with_long_prompts(pipe):
    """Two captions of 100 tokens that differ in the last word only: the same conditioning at the default
    (truncated), a different one at 150, from the 100th position on."""
    first, second = caption(100, "dog"), caption(100, "cat")
    with torch.no_grad():
        short = encoder_of(pipe, None, cache=False)([first, second], trainable=False)[0]
        long = encoder_of(pipe, 150, cache=False)([first, second], trainable=False)[0]
    assert torch.equal(short[0], short[1])
    changed = (long[0] - long[1]).abs().amax(dim=-1) > 1e-4
    assert not changed[:100].any() and changed[100], "causal CLIP: only the changed word and what follows it"


def test_training_reaches_a_new_token_past_token_77(tiny_model, demo_images, tmp_path):
    """The loss of a caption whose TOK sits at tokens 90-91 gives the new embeddings a gradient at 150, none at
    the default (the token is truncated away)."""
    gradients = {}
    for max_token_length in (None, 150):
        extra = ["--max_token_length", str(max_token_length)] if max_token_length else []
        args = parse_args(
            [
                *("--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(demo_images)),
                *("--instance_prompt", f"{caption(89)} TOK", "--output_dir", str(tmp_path / "unused")),
                *("--resolution", "64", "--train_text_encoder_ti", *extra),
            ]
        )
        parts = load_sdxl(args)
        encoders = [parts.text_encoder, parts.text_encoder_2]
        tokens = PivotalTokens.from_flags("TOK", 2)
        add_new_tokens([parts.tokenizer, parts.tokenizer_2], encoders, tokens, None)
        batch = collate([DreamBoothDataset(load_records(args), args, seed=0)[(0, 0)]])
        batch.captions = [tokens.substitute(c) for c in batch.captions]
        encode = PromptEncoder([parts.tokenizer, parts.tokenizer_2], encoders, None, max_token_length=max_token_length)
        batch_loss(parts, parts.unet, encode, batch, torch.Generator().manual_seed(0), args, True).backward()
        gradients[max_token_length] = [rows.grad.abs().sum().item() for rows in new_token_rows(encoders)]
    assert gradients[None] == [0.0, 0.0]
    assert all(g > 0 for g in gradients[150])


def test_trainer_uses_words_past_token_77(run_training, tmp_path, caplog):
    """Runs whose captions differ only in their 100th token train the same LoRA at the default (the word is cut
    off, and the run says so), different ones at 150."""
    for max_token_length, differ in ((None, False), (150, True)):
        extra = ("--max_token_length", str(max_token_length)) if max_token_length else ()
        files = []
        for word in ("dog", "cat"):
            out = tmp_path / f"{max_token_length}-{word}"
            caplog.clear()
            run_training(out, *extra, "--instance_prompt", caption(100, word), "--max_train_steps", "1")
            files.append(lora_file(out))
            truncated = [r for r in caplog.records if "have more than 75 tokens" in r.getMessage()]
            assert len(truncated) == (0 if differ else 1)
        assert any(not torch.equal(files[0][k], files[1][k]) for k in files[0]) == differ, max_token_length


@pytest.mark.parametrize(
    ("max_token_length", "message"),
    [
        (None, r"2 of 3 distinct captions have more than 75 tokens \(the longest 200\); .* --max_token_length 225 "),
        (150, "1 of 3 distinct captions have more than 150 tokens .* --max_token_length 225 "),
        (225, None),
    ],
)
def test_captions_longer_than_read_are_named_once(pipe, caplog, max_token_length, message):
    captions = [caption(100), caption(100), caption(200), caption(3)]
    warn_if_truncated(pipe.tokenizer, captions, max_token_length)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if message is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and re.search(message, warnings[0]), warnings


def test_cached_embeddings_equal_live_encoding(pipe):
    captions = [caption(130), "", caption(40), caption(260)]
    cached = encoder_of(pipe, 225)
    cached.encode_all_then_offload(captions)
    embeds, pooled = cached(captions[::-1], trainable=False)
    with torch.no_grad():
        live_embeds, live_pooled = encoder_of(pipe, 225, cache=False)(captions[::-1], trainable=False)
    assert embeds.shape == (4, 227, 64)
    torch.testing.assert_close(embeds, live_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, live_pooled, rtol=0, atol=1e-6)


def validation_args(max_token_length: int | None) -> Namespace:
    return Namespace(
        max_token_length=max_token_length,
        clip_skip=None,
        num_validation_images=1,
        validation_inference_steps=2,
        resolution=64,
    )


def test_validation_images_see_words_past_token_77(pipe):
    """Validation gives the pipeline the long embeddings: images of two prompts that differ past token 77 differ at
    150 and are identical at the default (diffusers truncates the strings)."""
    first, second = caption(100, "dog"), caption(100, "cat")
    for max_token_length, differ in ((None, False), (150, True)):
        args = validation_args(max_token_length)
        images = [torch.tensor(list(generate(pipe, args, p, seed=3)[0].getdata())) for p in (first, second)]
        assert (not torch.equal(*images)) == differ, max_token_length


def test_negative_prompts_are_encoded_alike(pipe):
    """With a negative prompt (sample prompts' --n), it is encoded the long way too, to the same length; without one,
    zeros as diffusers gives SDXL base (force_zeros_for_empty_prompt)."""
    inputs = pipeline_embeddings(pipe, caption(100), caption(160), 225, None)
    with torch.no_grad():
        expected = encoder_of(pipe, 225, cache=False)([caption(160)], trainable=False)
    assert inputs["negative_prompt_embeds"].shape == inputs["prompt_embeds"].shape == (1, 227, 64)
    assert torch.equal(inputs["negative_prompt_embeds"], expected[0])
    assert torch.equal(inputs["negative_pooled_prompt_embeds"], expected[1])
    zeros = pipeline_embeddings(pipe, caption(100), None, 150, None)
    assert not zeros["negative_prompt_embeds"].any() and not zeros["negative_pooled_prompt_embeds"].any()
    image = pipe(**inputs, num_inference_steps=2, height=64, width=64, guidance_scale=5.0).images[0]
    assert image.size == (64, 64)


LONG = (
    *("--max_token_length", "150", "--instance_prompt", f"{caption(80)} TOK", "--train_text_encoder_ti"),
    *("--text_encoder_lr", "1e-2", "--train_text_encoder_ti_frac", "0.5"),
)


def test_resume_is_exact_with_long_prompts(run_training, tmp_path, monkeypatch):
    """Stop after checkpoint-2 of a 4-step pivotal run on a caption longer than 77 tokens, resume: the same files
    as the uninterrupted run (the embeddings train past the pivot on cached long embeddings)."""
    from safetensors.torch import load_file

    flags = (*LONG, "--max_train_steps", "4", "--checkpointing_steps", "2")
    full = run_training(tmp_path / "full", *flags)
    train_until_first_checkpoint(run_training, monkeypatch, tmp_path / "resumed", *flags)
    resumed = run_training(tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest")
    assert_same_tensors(lora_file(resumed), lora_file(full))
    assert_same_tensors(load_file(resumed / "resumed_emb.safetensors"), load_file(full / "full_emb.safetensors"))


@pytest.mark.slow
def test_config_file_model_card_and_example(run_training, tiny_model, demo_images, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"max_token_length": 225, "instance_data_dir": str(demo_images)}))
    base = ["--pretrained_model_name_or_path", "m", "--instance_prompt", "p", "--config", str(config)]
    assert parse_args(base).max_token_length == 225
    config.write_text(yaml.safe_dump({"max_token_length": 100, "instance_data_dir": str(demo_images)}))
    with pytest.raises(InputError, match=r"max_token_length.*must be one of 75, 150, 225; got 100"):
        parse_args(base)
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 100 (choose from 75, 150, 225)"
        parse_args([*base[:4], "--instance_data_dir", str(demo_images), "--max_token_length", "100"])

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{caption(90)} TOK --n {caption(100)} --d 1\n{caption(120)}\n")
    validation = (*("--validation_prompt", f"{caption(100)} TOK", "--validation_steps", "1"),)
    validation += (*("--num_validation_images", "1", "--validation_inference_steps", "2"),)
    samples = ("--sample_prompts", str(prompts), "--sample_every_n_steps", "1")
    out = run_training(tmp_path / "long", *LONG, "--max_train_steps", "1", *validation, *samples)
    # The final images (from the saved files) are the live ones: both encoded the long validation prompt alike.
    live, final = (np.asarray(Image.open(out / "validation" / f / "0.png")) for f in ("step-1", "final"))
    np.testing.assert_array_equal(final, live)
    assert [p.name for p in sorted((out / "samples" / "step-1").glob("*.png"))] == ["0.png", "1.png"]
    # examples/generate.py with --max_token_length gives the final validation image (same seed, steps, sampler).
    script = Path(__file__).resolve().parent.parent / "examples" / "generate.py"
    argv = ["--model", str(tiny_model), "--lora", str(out), "--prompt", f"{caption(100)} <s0><s1>", "--seed", "0"]
    argv += [
        "--output",
        str(tmp_path / "sample.png"),
        "--steps",
        "2",
        "--resolution",
        "64",
        "--max_token_length",
        "150",
    ]
    done = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "sample.png")), final)
    # So does the Space's "try it" (TOK written as in the run's captions).
    flags = Namespace(train_text_encoder_ti=True, token_abstraction="TOK", num_new_tokens_per_abstraction=2)
    flags.__dict__.update(resolution=64, clip_skip=None, max_token_length=150)
    image, _ = TryIt().generate(str(tiny_model), out, flags, f"{caption(100)} TOK", seed=0, steps=2)
    np.testing.assert_array_equal(np.asarray(image), final)
    saved = yaml.safe_load((out / "training_config.yaml").read_text())
    assert saved["max_token_length"] == 150
    card = (out / "README.md").read_text()
    assert "| `max_token_length` | `150` |" in card
    assert "Trained on captions of up to 150 tokens" in card and "diffusers' pipeline cuts" in card
    prompt = f"{caption(80)} <s0><s1>"
    namespace = run_card_code(card, out, "pipe(**pipeline_embeddings(pipe, " + f'"{prompt}", None, 150, None)')
    assert namespace["image"].size == (64, 64)


@pytest.mark.slow
def test_memory_planner_counts_the_longer_text_activations(tiny_model):
    """The planner's fake run encodes the chunks too: with the text encoders trained, a longer context costs more
    activation memory at the peak; the weights stay the same."""
    from sdxl_pivotal.plan import estimate, parse_plan_args

    argv = ["--pretrained_model_name_or_path", str(tiny_model), "--instance_prompt", "a photo of TOK dog"]
    argv += ["--resolution", "64", "--train_batch_size", "2", "--train_text_encoder"]
    default = estimate(parse_plan_args(argv)[1])
    long = estimate(parse_plan_args([*argv, "--max_token_length", "225"])[1])
    assert long.weights == default.weights and long.peak > default.peak

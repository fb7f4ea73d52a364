"""Pivotal tuning on the tiny SDXL: new tokens in both encoders, only their rows trained, a step-exact pivot,
embeddings that diffusers' load_textual_inversion turns into exactly the trainer's prompt embeddings."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdxl_pivotal import train as train_module
from sdxl_pivotal.args import parse_args
from sdxl_pivotal.checkpoints import OPTIMIZER_FILE, PARAMS_FILE
from sdxl_pivotal.data import DreamBoothDataset, collate, load_records
from sdxl_pivotal.errors import InputError
from sdxl_pivotal.models import load_sdxl
from sdxl_pivotal.optim import create_optimizer, parameter_groups
from sdxl_pivotal.prompts import PromptEncoder
from sdxl_pivotal.tokens import PivotalTokens, add_new_tokens, new_token_rows
from sdxl_pivotal.train import batch_loss

TI = ("--train_text_encoder_ti", "--text_encoder_lr", "1e-2")


def emb_file(folder: Path, name: str = "run") -> dict[str, torch.Tensor]:
    return load_file(folder / f"{name}_emb.safetensors")


def pivotal_args(tiny_model: Path, images: Path, tmp_path: Path, *extra: str):
    return parse_args(
        [
            *("--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(images)),
            *("--instance_prompt", "a photo of TOK toy", "--output_dir", str(tmp_path / "unused")),
            *("--resolution", "64", "--text_encoder_lr", "1e-2", "--train_text_encoder_ti", *extra),
        ]
    )


def test_only_new_rows_train_and_optimizer_holds_only_them(tiny_model, demo_images, tmp_path):
    """Three real optimizer steps on the trainer's pieces: the old vocabulary stays bit-identical."""
    args = pivotal_args(tiny_model, demo_images, tmp_path)
    parts = load_sdxl(args)
    encoders = [parts.text_encoder, parts.text_encoder_2]
    original = [e.get_input_embeddings().weight.detach().clone() for e in encoders]
    tokens = PivotalTokens.from_flags("TOK", 2)
    add_new_tokens([parts.tokenizer, parts.tokenizer_2], encoders, tokens, None)
    start = [r.detach().clone() for r in new_token_rows(encoders)]

    parts.unet.requires_grad_(False)
    text_params = [p for e in encoders for p in e.parameters() if p.requires_grad]
    assert [tuple(p.shape) for p in text_params] == [(2, 32), (2, 32)], "only the new rows are trainable"
    optimizer = create_optimizer(
        args, parameter_groups(args, {1.0: [torch.nn.Parameter(torch.zeros(1))]}, text_params)
    )
    dataset = DreamBoothDataset(load_records(args), args, seed=0)
    batch = collate([dataset[(0, i)] for i in range(2)])
    batch.captions = [tokens.substitute(c) for c in batch.captions]
    encoder = PromptEncoder([parts.tokenizer, parts.tokenizer_2], encoders, None)
    for step in range(3):
        loss = batch_loss(parts, parts.unet, encoder, batch, torch.Generator().manual_seed(step), args, True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for enc, before, rows, first in zip(encoders, original, new_token_rows(encoders), start, strict=True):
        after = enc.get_input_embeddings().weight
        assert after.shape[0] == before.shape[0] + 2
        assert torch.equal(after[: before.shape[0]], before), "old rows bit-identical"
        assert not torch.equal(rows, first), "new rows trained"
    # AdamW keeps two moments per trained number: 2 x new tokens x (hidden_1 + hidden_2) for the embeddings.
    text_state = [optimizer.state[p] for p in text_params]
    assert sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in text_state) == 2 * 2 * (32 + 32)


def test_trainer_checkpoints_hold_only_new_rows(run_training, tmp_path):
    out = run_training(tmp_path / "run", "--max_train_steps", "2", "--checkpointing_steps", "2", *TI)
    state = load_file(out / "checkpoint-2" / PARAMS_FILE)
    text = {k: tuple(v.shape) for k, v in state.items() if k.startswith("text_encoder")}
    assert sorted(text.values()) == [(2, 32), (2, 32)] and all(k.endswith("new_rows") for k in text)
    optimizer_numbers = sum(
        t.numel() for k, t in load_file(out / "checkpoint-2" / OPTIMIZER_FILE).items() if "exp_avg" in k
    )
    unet_numbers = sum(v.numel() for k, v in state.items() if k.startswith("unet"))
    assert optimizer_numbers == 2 * (unet_numbers + 2 * (32 + 32))
    emb = emb_file(out)
    assert set(emb) == {"clip_l", "clip_g"} and emb["clip_l"].shape == (2, 32) and emb["clip_g"].shape == (2, 32)
    assert torch.equal(emb_file(out / "checkpoint-2")["clip_l"], emb["clip_l"])


def test_embeddings_stop_changing_at_the_pivot_step(run_training, tmp_path):
    """6 steps, --train_text_encoder_ti_frac 0.5: steps 1-3 update the embeddings, steps 4-6 never do."""
    out = run_training(
        tmp_path / "run",
        "--max_train_steps",
        "6",
        "--checkpointing_steps",
        "1",
        "--train_text_encoder_ti_frac",
        "0.5",
        *TI,
    )
    embs = [emb_file(out / f"checkpoint-{n}") for n in range(1, 7)]
    for earlier, later in itertools.pairwise(embs[:3]):
        assert not torch.equal(earlier["clip_l"], later["clip_l"]) and not torch.equal(
            earlier["clip_g"], later["clip_g"]
        )
    for later in [*embs[3:], emb_file(out)]:
        assert torch.equal(embs[2]["clip_l"], later["clip_l"]) and torch.equal(embs[2]["clip_g"], later["clip_g"])
    unet = [load_file(out / f"checkpoint-{n}" / PARAMS_FILE) for n in (3, 6)]
    assert any(not torch.equal(unet[0][k], unet[1][k]) for k in unet[0] if k.startswith("unet")), "UNet trains on"


def test_one_epoch_run_still_trains_tokens(run_training, tmp_path):
    """The reference pivots at int(frac x epochs) = 0 for a one-epoch run and never trains the tokens."""
    out = run_training(tmp_path / "run", "--num_train_epochs", "1", "--checkpointing_steps", "1", *TI)
    assert not torch.equal(
        emb_file(out / "checkpoint-1")["clip_l"], emb_file(out / "checkpoint-2")["clip_l"]
    ) or not torch.equal(emb_file(out / "checkpoint-1")["clip_g"], emb_file(out / "checkpoint-2")["clip_g"])


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_load_textual_inversion_reproduces_trainer_prompt_embeddings(
    run_training, tiny_model, demo_images, tmp_path, clip_skip
):
    from diffusers import StableDiffusionXLPipeline

    extra = ("--clip_skip", str(clip_skip)) if clip_skip is not None else ()
    out = run_training(tmp_path / "run", "--max_train_steps", "2", "--checkpointing_steps", "2", *TI, *extra)
    prompt = "a photo of <s0><s1> toy, close up"

    # The trainer's view: our encoders with the checkpoint's exact trained rows.
    args = pivotal_args(tiny_model, demo_images, tmp_path)
    parts = load_sdxl(args)
    encoders = [parts.text_encoder, parts.text_encoder_2]
    add_new_tokens([parts.tokenizer, parts.tokenizer_2], encoders, PivotalTokens.from_flags("TOK", 2), None)
    state = load_file(out / "checkpoint-2" / PARAMS_FILE)
    for name, encoder in zip(("text_encoder", "text_encoder_2"), encoders, strict=True):
        [key] = [k for k in state if k.startswith(name + ".") and k.endswith("new_rows")]
        encoder.get_input_embeddings().new_rows.data.copy_(state[key])
    with torch.no_grad():
        expected, expected_pooled = PromptEncoder([parts.tokenizer, parts.tokenizer_2], encoders, clip_skip)(
            [prompt], False
        )

    # The user's view: the base pipeline plus the exported embeddings file, loaded by diffusers.
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    emb = emb_file(out)
    pipe.load_textual_inversion(
        emb["clip_l"], token=["<s0>", "<s1>"], text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        emb["clip_g"], token=["<s0>", "<s1>"], text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, clip_skip=clip_skip)
    torch.testing.assert_close(embeds, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=1e-6)
    # and the tokens matter: without them, the prompt encodes differently
    plain, _, _, _ = StableDiffusionXLPipeline.from_pretrained(tiny_model).encode_prompt(
        "a photo of toy, close up", do_classifier_free_guidance=False
    )
    assert not torch.allclose(plain, embeds)


def test_clip_skip_matches_diffusers_for_both_encoders(tiny_model):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    encoder = PromptEncoder([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], 2)
    ours, ours_pooled = encoder(["a red toy"], False)
    theirs, _, pooled, _ = pipe.encode_prompt("a red toy", do_classifier_free_guidance=False, clip_skip=2)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(ours_pooled, pooled, rtol=0, atol=0)
    no_skip, _ = PromptEncoder([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], None)(
        ["a red toy"], False
    )
    assert not torch.allclose(ours[..., :32], no_skip[..., :32]) and not torch.allclose(
        ours[..., 32:], no_skip[..., 32:]
    )


def test_frozen_prompts_are_encoded_once(tiny_model):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    calls = []
    pipe.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    encoder = PromptEncoder([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], None)
    first = encoder(["a", "b", "a"], trainable=False)
    second = encoder(["b", "a"], trainable=False)
    assert len(calls) == 1, "both distinct prompts encoded in one call, then served from the cache"
    torch.testing.assert_close(second[0], first[0][[1, 0]])
    encoder(["a"], trainable=True)
    encoder(["a"], trainable=True)
    assert len(calls) == 3, "while the encoders train, nothing is cached"


def test_resume_across_the_pivot_is_exact(run_training, tmp_path, monkeypatch):
    flags = ["--max_train_steps", "6", "--checkpointing_steps", "2", "--train_text_encoder_ti_frac", "0.5", *TI]
    full = run_training(tmp_path / "full", *flags)

    real_save = train_module.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_training(tmp_path / "resumed", *flags)  # stops after checkpoint-2, before the pivot at 3
    monkeypatch.undo()
    resumed = run_training(tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest")
    for name in ("pytorch_lora_weights.safetensors", "full_emb.safetensors"):
        a = load_file(full / name)
        b = load_file(resumed / (name if name.startswith("pytorch") else "resumed_emb.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_several_abstractions(run_training, tmp_path, demo_images):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i, path in enumerate(sorted(demo_images.glob("*.png"))[:4]):
        (images / path.name).write_bytes(path.read_bytes())
        rows.append({"file_name": path.name, "text": "TOK toy" if i % 2 else "SKS style painting of TOK toy"})
    (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_training(
        tmp_path / "run",
        *("--max_train_steps", "2", "--token_abstraction", "TOK,SKS", "--num_new_tokens_per_abstraction", "3"),
        *TI,
        data=("--dataset_name", str(images), "--caption_column", "text"),
    )
    emb = emb_file(out)
    assert emb["clip_l"].shape == (6, 32) and emb["clip_g"].shape == (6, 32)
    card = (out / "README.md").read_text()
    assert '"<s0>", "<s1>", "<s2>", "<s3>", "<s4>", "<s5>"' in card and "`SKS` → `<s3><s4><s5>`" in card


def test_tokens_substitute_and_initializer(tiny_model, demo_images, tmp_path):
    tokens = PivotalTokens.from_flags("TOK, SKS", 2)
    assert tokens.substitute("TOK in SKS style") == "<s0><s1> in <s2><s3> style"
    args = pivotal_args(tiny_model, demo_images, tmp_path)
    parts = load_sdxl(args)
    encoders = [parts.text_encoder, parts.text_encoder_2]
    dog = [
        e.get_input_embeddings().weight[t("dog", add_special_tokens=False).input_ids[0]].clone()
        for e, t in zip(encoders, [parts.tokenizer, parts.tokenizer_2], strict=True)
    ]
    add_new_tokens([parts.tokenizer, parts.tokenizer_2], encoders, tokens, "dog")
    for rows, word in zip(new_token_rows(encoders), dog, strict=True):
        assert rows.shape == (4, 32) and all(torch.equal(row, word) for row in rows)
    ids = parts.tokenizer(tokens.substitute("a TOK"), add_special_tokens=False).input_ids
    assert parts.tokenizer.convert_ids_to_tokens(ids)[-2:] == ["<s0>", "<s1>"]


def test_token_clash_is_an_error(tiny_model, demo_images, tmp_path):
    args = pivotal_args(tiny_model, demo_images, tmp_path)
    parts = load_sdxl(args)
    parts.tokenizer_2.add_tokens(["<s1>"])
    with pytest.raises(InputError, match=r"Tokenizer 2 already has the token\(s\) <s1>"):
        add_new_tokens(
            [parts.tokenizer, parts.tokenizer_2],
            [parts.text_encoder, parts.text_encoder_2],
            PivotalTokens.from_flags("TOK", 2),
            None,
        )


def test_abstraction_missing_from_prompts_warns_once(run_training, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        run_training(tmp_path / "run", "--max_train_steps", "1", "--token_abstraction", "TOK,ZQX", *TI)
    warnings = [r.getMessage() for r in caplog.records if "appears in no prompt or caption" in r.getMessage()]
    assert len(warnings) == 1 and "ZQX" in warnings[0] and "TOK," not in warnings[0]


@pytest.fixture
def model_with_sdxl_eos(tiny_model, tmp_path) -> Path:
    """The tiny model with SDXL's own text-encoder configs' `eos_token_id: 2` (an old placeholder value)."""
    import shutil

    folder = tmp_path / "eos-2"
    shutil.copytree(tiny_model, folder)
    for name in ("text_encoder", "text_encoder_2"):
        config_file = folder / name / "config.json"
        config = json.loads(config_file.read_text())
        config["eos_token_id"] = 2
        config_file.write_text(json.dumps(config))
    return folder


def test_new_tokens_keep_the_pooled_embedding_at_the_end_of_text(model_with_sdxl_eos, demo_images, tmp_path):
    """With `eos_token_id: 2` transformers pools at the highest token id, which new tokens take over. The trainer
    and `load_for_diffusers` pool at the end-of-text token (as the UIs do), the same as before for plain prompts;
    plain diffusers needs the one line the model card shows."""
    from diffusers import StableDiffusionXLPipeline

    from sdxl_pivotal.formats.load import load_embeddings
    from sdxl_pivotal.tokens import embeddings_state

    prompt = "a photo of <s0><s1> toy, close up"
    args = pivotal_args(model_with_sdxl_eos, demo_images, tmp_path)
    parts = load_sdxl(args)
    tokenizers, encoders = [parts.tokenizer, parts.tokenizer_2], [parts.text_encoder, parts.text_encoder_2]
    encode = PromptEncoder(tokenizers, encoders, None)
    with torch.no_grad():
        _, plain_before = encode(["a photo of toy"], False)
        add_new_tokens(tokenizers, encoders, PivotalTokens.from_flags("TOK", 2), None)
        _, plain_after = encode(["a photo of toy"], False)
        _, pooled = encode([prompt], False)
        # By hand: encoder 2's final hidden states, read at the first end-of-text token, then projected.
        ids = parts.tokenizer_2(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        hidden = encoders[1](ids).last_hidden_state[0]
        at_end = encoders[1].text_projection(hidden[int((ids[0] == parts.tokenizer_2.eos_token_id).nonzero()[0])])
        at_highest = encoders[1].text_projection(hidden[int(ids[0].argmax())])  # `<s1>`
    torch.testing.assert_close(plain_after, plain_before, rtol=0, atol=0)
    torch.testing.assert_close(pooled[0], at_end, rtol=0, atol=1e-6)
    assert not torch.allclose(at_end, at_highest, atol=1e-3)

    # Users: our loader pools as the trainer did; diffusers alone pools at `<s1>` until the card's line.
    rows, tokens = embeddings_state(encoders), ["<s0>", "<s1>"]
    ours = StableDiffusionXLPipeline.from_pretrained(model_with_sdxl_eos)
    load_embeddings(ours, rows, tokens)
    torch.testing.assert_close(
        ours.encode_prompt(prompt, do_classifier_free_guidance=False)[2], pooled, atol=1e-6, rtol=0
    )
    theirs = StableDiffusionXLPipeline.from_pretrained(model_with_sdxl_eos)
    theirs.load_textual_inversion(
        rows["clip_l"], token=tokens, text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer
    )
    theirs.load_textual_inversion(
        rows["clip_g"], token=tokens, text_encoder=theirs.text_encoder_2, tokenizer=theirs.tokenizer_2
    )
    assert not torch.allclose(theirs.encode_prompt(prompt, do_classifier_free_guidance=False)[2], pooled, atol=1e-3)
    theirs.text_encoder_2.text_model.eos_token_id = theirs.tokenizer_2.eos_token_id  # the card's line
    torch.testing.assert_close(
        theirs.encode_prompt(prompt, do_classifier_free_guidance=False)[2], pooled, atol=1e-6, rtol=0
    )

"""End-to-end training on the tiny SDXL (CPU): learning, determinism, exact resume, crash safety, and
LoRA files that diffusers loads with the trained behaviour."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from run_helpers import Interrupted, assert_same_tensors, lora_file, train_until_first_checkpoint
from safetensors import SafetensorError
from safetensors.torch import load_file

from sdxl_pivotal import checkpoints as checkpoints_module
from sdxl_pivotal import train as train_module
from sdxl_pivotal.adapters import add_adapters
from sdxl_pivotal.args import parse_args
from sdxl_pivotal.checkpoints import OPTIMIZER_FILE, PARAMS_FILE, checkpoint_problem, complete_checkpoints
from sdxl_pivotal.data import DreamBoothDataset, collate, load_records
from sdxl_pivotal.errors import InputError, WriteError
from sdxl_pivotal.export import LORA_WEIGHTS_NAME
from sdxl_pivotal.models import SDXLParts, load_sdxl
from sdxl_pivotal.prompts import PromptEncoder
from sdxl_pivotal.train import batch_loss


def pipeline_parts(model: Path):
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    parts = SDXLParts(
        pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, pipe.vae, pipe.unet, scheduler
    )
    return pipe, parts


def base_args(model: Path, images: Path, output_dir: Path, *extra: str):
    return parse_args(
        [
            *("--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images)),
            *("--instance_prompt", "a photo of TOK toy", "--output_dir", str(output_dir), "--resolution", "64"),
            *extra,
        ]
    )


def eval_loss(parts: SDXLParts, args, draws: int = 8) -> float:
    """Loss over all training images with fixed noise and timesteps (one fixed generator)."""
    dataset = DreamBoothDataset(load_records(args), args, seed=0)
    batch = collate([dataset[(0, i)] for i in range(len(dataset))])
    encoder = PromptEncoder([parts.tokenizer, parts.tokenizer_2], [parts.text_encoder, parts.text_encoder_2], None)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        return sum(batch_loss(parts, parts.unet, encoder, batch, generator, args).item() for _ in range(draws)) / draws


def test_training_changes_lora_and_lowers_loss(run_training, tiny_model, demo_images, tmp_path):
    out = run_training(tmp_path / "run", "--max_train_steps", "40", "--learning_rate", "1e-2", "--rank", "8")
    ups = [w for key, w in lora_file(out).items() if ".lora_B." in key]
    assert ups and all(w.abs().max() > 0 for w in ups), "LoRA up-projections start at zero and must move"

    pipe, parts = pipeline_parts(tiny_model)
    args = base_args(tiny_model, demo_images, tmp_path / "eval")
    before = eval_loss(parts, args)
    pipe.load_lora_weights(out)
    after = eval_loss(parts, args)
    assert after < 0.98 * before, (before, after)


def test_same_seed_gives_same_weights(run_training, tmp_path):
    flags = ("--max_train_steps", "3", "--lora_dropout", "0.1", "--random_flip")
    assert_same_tensors(
        lora_file(run_training(tmp_path / "a", *flags)), lora_file(run_training(tmp_path / "b", *flags))
    )
    other = lora_file(run_training(tmp_path / "c", *flags[:-1], "--seed", "1"))
    assert any(not torch.equal(w, lora_file(tmp_path / "a")[k]) for k, w in other.items())


@pytest.mark.parametrize("optimizer", ["adamw", "prodigy"])
def test_resume_after_interruption_is_exact(run_training, tmp_path, monkeypatch, optimizer):
    """Stop right after checkpoint-3 of a 6-step run, resume with "latest": the same weights as without the stop.

    Every source of randomness is on: shuffling, random crops and flips, dropout, offset noise, a
    decaying schedule, gradient accumulation.
    """
    flags = [
        *("--max_train_steps", "6", "--checkpointing_steps", "3", "--optimizer", optimizer),
        *("--learning_rate", "1.0" if optimizer == "prodigy" else "1e-3", "--lr_scheduler", "cosine"),
        *("--gradient_accumulation_steps", "2", "--train_batch_size", "1", "--random_flip", "--lora_dropout", "0.1"),
        *("--noise_offset", "0.1", "--snr_gamma", "5"),
    ]
    uninterrupted = run_training(tmp_path / "full", *flags)

    train_until_first_checkpoint(run_training, monkeypatch, tmp_path / "resumed", *flags)
    assert [p.name for p in complete_checkpoints(tmp_path / "resumed")] == ["checkpoint-3"]
    assert_same_tensors(
        lora_file(tmp_path / "resumed" / "checkpoint-3"), lora_file(tmp_path / "full" / "checkpoint-3")
    )

    run_training(tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest")
    assert_same_tensors(lora_file(tmp_path / "resumed"), lora_file(uninterrupted))
    assert_same_tensors(
        load_file(tmp_path / "resumed" / "checkpoint-6" / PARAMS_FILE),
        load_file(tmp_path / "full" / "checkpoint-6" / PARAMS_FILE),
    )


def test_crash_while_writing_checkpoint_leaves_none(run_training, tmp_path, monkeypatch):
    real_save_file = checkpoints_module.save_file

    def fail_on_optimizer(tensors, path, *args, **kwargs):
        if Path(path).name == checkpoints_module.OPTIMIZER_FILE:
            raise Interrupted("disk full")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints_module, "save_file", fail_on_optimizer)
    with pytest.raises(Interrupted):
        run_training(tmp_path / "run", "--max_train_steps", "2", "--checkpointing_steps", "1")
    leftovers = [p.name for p in (tmp_path / "run").iterdir() if "checkpoint" in p.name]
    assert leftovers == [], "a checkpoint that failed to write must not exist, not even half of it"

    # A half-written folder (e.g. from a killed process) is never chosen by "latest".
    (tmp_path / "run" / "checkpoint-9").mkdir()
    assert complete_checkpoints(tmp_path / "run") == []


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def no_models(*args, **kwargs):
    raise AssertionError("the models were loaded before the check")


def test_a_full_disk_while_checkpointing_is_one_clear_error(run_training, tmp_path, monkeypatch):
    """safetensors reports a full disk as a Rust error; the user gets the file, the reason and what is intact."""
    real_save_file = checkpoints_module.save_file

    def full_at_step_2(tensors, path, *args, **kwargs):
        if Path(path).name == OPTIMIZER_FILE and Path(path).parent.name.startswith(".checkpoint-2."):
            raise SafetensorError(
                "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                '"No space left on device" })'
            )
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints_module, "save_file", full_at_step_2)
    out = tmp_path / "run"
    with pytest.raises(WriteError) as error:
        run_training(out, "--max_train_steps", "3", "--checkpointing_steps", "1")
    message = str(error.value)
    assert re.fullmatch(
        rf"Cannot write {out}/checkpoint-2: No space left on device\. Free some disk space .*"
        r"checkpoint-2 was not saved; checkpoint-1 is intact\. "
        r"Once fixed, rerun with --resume_from_checkpoint latest\.",
        message,
    ), message
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1"]
    assert checkpoint_problem(out / "checkpoint-1") is None and hidden(out) == []


def test_overwrite_output_dir_leaves_no_earlier_checkpoint(run_training, tmp_path):
    """Overwriting removes the earlier run's checkpoints and results, so "latest" cannot continue it; files
    that are not ours stay, and a checkpoint folder holding one is refused rather than deleted."""
    out = tmp_path / "run"
    run_training(out, "--max_train_steps", "4", "--checkpointing_steps", "2")
    (out / "notes.txt").write_text("the user's")
    run_training(out, "--max_train_steps", "1", "--checkpointing_steps", "3", "--overwrite_output_dir")
    assert complete_checkpoints(out) == [] and (out / "notes.txt").read_text() == "the user's"
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == [
        LORA_WEIGHTS_NAME,
        "run.safetensors",
    ]

    run_training(out, "--max_train_steps", "2", "--checkpointing_steps", "1", "--overwrite_output_dir", "--seed", "1")
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    (out / "checkpoint-1" / "my-notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"checkpoint-1 holds files this trainer does not write \(my-notes.txt\)"):
        run_training(out, "--max_train_steps", "1", "--overwrite_output_dir")
    assert (out / "checkpoint-1" / "my-notes.txt").exists() and (out / "checkpoint-2").is_dir()


def test_a_damaged_checkpoint_is_skipped_by_latest_and_named_when_asked_for(
    run_training, tmp_path, monkeypatch, caplog
):
    flags = ("--max_train_steps", "4", "--checkpointing_steps", "2")
    uninterrupted = run_training(tmp_path / "full", *flags)
    out = run_training(tmp_path / "run", *flags)
    damaged = out / "checkpoint-4" / PARAMS_FILE
    damaged.write_bytes(damaged.read_bytes()[:-100])  # a truncated write

    monkeypatch.setattr(train_module, "load_sdxl", no_models)
    with pytest.raises(InputError, match=f"Cannot resume from {out}/checkpoint-4: {damaged} is damaged or truncated"):
        run_training(out, *flags, "--resume_from_checkpoint", str(out / "checkpoint-4"))
    monkeypatch.undo()

    with caplog.at_level(logging.INFO):
        run_training(out, *flags, "--resume_from_checkpoint", "latest")
    assert f"Skipping checkpoint {out}/checkpoint-4: {damaged} is damaged or truncated" in caplog.text
    assert f"Resumed from {out}/checkpoint-2 at step 2" in caplog.text
    assert_same_tensors(lora_file(out), lora_file(uninterrupted))
    assert checkpoint_problem(out / "checkpoint-4") is None, "written again, whole"


def test_a_kill_before_the_final_set_is_complete_leaves_no_lora_and_resume_finishes_it(
    run_training, tmp_path, monkeypatch
):
    """The final LoRA, embeddings, kohya file and card appear together; a kill before (here: while writing
    the card) leaves no LoRA file that looks finished, and resuming writes the whole set."""
    flags = ("--max_train_steps", "2", "--checkpointing_steps", "2", "--train_text_encoder_ti")

    def killed(*args, **kwargs):
        raise Interrupted("killed while writing the model card")

    monkeypatch.setattr(train_module, "write_model_card", killed)
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run_training(out, *flags)
    monkeypatch.undo()
    assert not (out / LORA_WEIGHTS_NAME).exists() and not (out / "run_emb.safetensors").exists()
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    run_training(out, *flags, "--resume_from_checkpoint", "latest")
    names = {p.name for p in out.iterdir()}
    assert {LORA_WEIGHTS_NAME, "run.safetensors", "run_emb.safetensors", "README.md"} <= names
    assert_same_tensors(lora_file(out), lora_file(out / "checkpoint-2"))
    assert hidden(out) == []


def test_temporaries_of_killed_runs_are_removed_at_start(run_training, tmp_path):
    out = tmp_path / "run"
    no_such_pid = 2**22 + 1  # above Linux's PID_MAX_LIMIT
    leftovers = [
        out / f".checkpoint-3.partial-{no_such_pid}-abc",
        out / ".write-q1w2e3",
        out / "validation" / "step-1" / f".0.png.partial-{no_such_pid}-xyz",
    ]
    for leftover in leftovers:
        leftover.mkdir(parents=True)
        (leftover / "half").write_text("x")
    (out / ".user-settings").write_text("the user's")
    run_training(out, "--max_train_steps", "1", "--overwrite_output_dir")
    assert hidden(out) == [".user-settings"] and not any(p.exists() for p in leftovers)


def test_checkpoints_total_limit_keeps_newest(run_training, tmp_path):
    out = run_training(
        tmp_path / "run", "--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2"
    )
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    state = json.loads((out / "checkpoint-6" / "training_state.json").read_text())
    assert state["step"] == 6 and state["seed"] == 0
    # Each checkpoint holds the LoRA in the final output's format.
    assert lora_file(out / "checkpoint-6").keys() == lora_file(out).keys()


def test_lora_file_loads_in_diffusers_with_trained_behaviour(run_training, tiny_model, demo_images, tmp_path):
    """alpha != rank and text-encoder LoRA: diffusers' load_lora_weights must reproduce the trained model."""
    flags = ("--max_train_steps", "3", "--learning_rate", "1e-2", "--rank", "4", "--lora_alpha", "16")
    out = run_training(
        tmp_path / "run", *flags, "--train_text_encoder", "--text_encoder_lr", "1e-2", "--checkpointing_steps", "3"
    )
    keys = lora_file(out).keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}

    # The trained model, rebuilt from the checkpoint's exact parameters.
    args = base_args(tiny_model, demo_images, tmp_path / "x", *flags, "--train_text_encoder")
    trained = load_sdxl(args)
    add_adapters(trained, args)
    saved = load_file(out / "checkpoint-3" / PARAMS_FILE)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(trained, name)
        missing = model.load_state_dict(
            {k.split(".", 1)[1]: v for k, v in saved.items() if k.startswith(name + ".")}, strict=False
        )
        assert not missing.unexpected_keys

    pipe, _ = pipeline_parts(tiny_model)
    ids = pipe.tokenizer(["a photo of TOK toy"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = dict(
        encoder_hidden_states=torch.randn(1, 77, 64),
        added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])},
    )
    with torch.no_grad():
        base_unet = pipe.unet(latents, 500, **cond).sample
        base_text = pipe.text_encoder(ids).last_hidden_state
        pipe.load_lora_weights(out)
        loaded_unet = pipe.unet(latents, 500, **cond).sample
        loaded_text = pipe.text_encoder(ids).last_hidden_state
        loaded_text_2 = pipe.text_encoder_2(ids).text_embeds
        expected_unet = trained.unet(latents, 500, **cond).sample
        expected_text = trained.text_encoder(ids).last_hidden_state
        expected_text_2 = trained.text_encoder_2(ids).text_embeds
    assert not torch.allclose(loaded_unet, base_unet, atol=1e-4), "the LoRA must change the UNet's output"
    assert not torch.allclose(loaded_text, base_text, atol=1e-4)
    torch.testing.assert_close(loaded_unet, expected_unet, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded_text, expected_text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded_text_2, expected_text_2, rtol=1e-5, atol=1e-5)


def test_text_encoder_lora_stops_at_its_fraction(run_training, tmp_path):
    """--train_text_encoder_frac 0.5 of 4 steps: text-encoder LoRA changes in steps 1-2, never after."""
    out = run_training(
        tmp_path / "run",
        *(
            "--max_train_steps",
            "4",
            "--checkpointing_steps",
            "1",
            "--train_text_encoder",
            "--train_text_encoder_frac",
            "0.5",
        ),
        *("--text_encoder_lr", "1e-2", "--adam_weight_decay_text_encoder", "0.1"),
    )
    states = [load_file(out / f"checkpoint-{n}" / PARAMS_FILE) for n in (1, 2, 3, 4)]
    text_keys = [k for k in states[0] if k.startswith("text_encoder") and "lora_B" in k]
    unet_keys = [k for k in states[0] if k.startswith("unet") and "lora_B" in k]
    assert text_keys and unet_keys
    assert any(not torch.equal(states[0][k], states[1][k]) for k in text_keys), "trained before the pivot"
    for later in states[2:]:
        assert all(torch.equal(states[1][k], later[k]) for k in text_keys), "frozen after the pivot"
        assert any(not torch.equal(states[1][k], later[k]) for k in unet_keys), "the UNet keeps training"


def test_gradient_checkpointing_gives_the_same_weights(run_training, tmp_path):
    flags = ("--max_train_steps", "2", "--train_text_encoder_ti", "--text_encoder_lr", "1e-2")
    plain = lora_file(run_training(tmp_path / "plain", *flags))
    checkpointed = lora_file(run_training(tmp_path / "gc", *flags, "--gradient_checkpointing"))
    for key in plain:
        torch.testing.assert_close(plain[key], checkpointed[key], rtol=1e-4, atol=1e-6)


def test_bf16_mixed_precision_trains_with_float32_lora(run_training, tmp_path):
    """bf16 autocast (the CPU supports it): frozen weights in bf16, LoRA and new embeddings kept in float32."""
    flags = ("--max_train_steps", "2", "--checkpointing_steps", "2", "--mixed_precision", "bf16")
    out = run_training(tmp_path / "run", *flags, "--train_text_encoder_ti")
    state = load_file(out / "checkpoint-2" / PARAMS_FILE)
    assert any(k.endswith("new_rows") for k in state) and all(t.dtype == torch.float32 for t in state.values())
    assert all(torch.isfinite(t).all() for t in lora_file(out).values())


def test_edm_style_training_lowers_its_loss_and_resumes_exactly(run_training, tiny_model, demo_images, tmp_path):
    """--do_edm_style_training: Euler sigmas, input/output preconditioning, x0 target weighted by 1/sigma^2."""
    from sdxl_pivotal.formats.load import load_for_diffusers
    from sdxl_pivotal.validation import sdxl_pipeline

    flags = ("--do_edm_style_training", "--learning_rate", "1e-2", "--checkpointing_steps", "3")
    out = run_training(tmp_path / "run", *flags, "--max_train_steps", "24")
    args = base_args(tiny_model, demo_images, tmp_path / "eval", "--do_edm_style_training")
    parts = load_sdxl(args)
    assert type(parts.noise_scheduler).__name__ == "EulerDiscreteScheduler"
    before = eval_loss(parts, args)
    load_for_diffusers(sdxl_pipeline(parts, parts.unet, [parts.text_encoder, parts.text_encoder_2]), out)
    after = eval_loss(parts, args)
    assert after < 0.98 * before, (before, after)

    run_training(tmp_path / "resumed", *flags, "--max_train_steps", "3")
    run_training(tmp_path / "resumed", *flags, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    uninterrupted = run_training(tmp_path / "six", *flags, "--max_train_steps", "6")
    assert_same_tensors(lora_file(tmp_path / "resumed"), lora_file(uninterrupted))


def test_a_model_with_an_edm_scheduler_trains_edm_style(run_training, tiny_model, demo_images, tmp_path, monkeypatch):
    """As the reference: a model whose scheduler is an EDM one (Playground v2.5) trains EDM-style and validates
    with an EDM sampler; --snr_gamma is refused for it."""
    import shutil

    from diffusers import EDMEulerScheduler

    model = tmp_path / "edm-model"
    shutil.copytree(tiny_model, model)
    EDMEulerScheduler(sigma_data=0.5).save_pretrained(model / "scheduler")
    data = ("--instance_data_dir", str(demo_images))
    parts = load_sdxl(base_args(model, demo_images, tmp_path / "x"))
    assert isinstance(parts.noise_scheduler, EDMEulerScheduler)
    out = run_training(
        tmp_path / "run",
        "--pretrained_model_name_or_path",
        str(model),
        *("--max_train_steps", "2", "--validation_prompt", "a photo of TOK toy", "--num_validation_images", "1"),
        *("--validation_inference_steps", "2"),
        data=data,
    )
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert list((out / "validation").rglob("*.png"))
    import diffusers

    def no_weights(*args, **kwargs):
        raise AssertionError("the flag check must come before any weights load")

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", no_weights)
    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", no_weights)
    with pytest.raises(InputError, match="has an EDM scheduler"):
        load_sdxl(base_args(model, demo_images, tmp_path / "y", "--snr_gamma", "5"))

"""What kohya's sd-scripts users expect, checked against kohya's own rules: block-weight presets of
--unet_block_lr over SDXL's SAI blocks; saving by epoch; starting from an existing LoRA file (--network_weights);
sample prompts files; kohya's svd-merge tool."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdxl_pivotal.adapters import unet_adapter_plan
from sdxl_pivotal.args import parse_args
from sdxl_pivotal.checkpoints import complete_checkpoints
from sdxl_pivotal.errors import InputError
from sdxl_pivotal.formats.names import kohya_module_names
from sdxl_pivotal.models import load_sdxl
from sdxl_pivotal.monitor import TrainingMonitor, request


def flags_for(tiny_model: Path, demo_images: Path, tmp_path: Path, *extra: str):
    return parse_args(
        [
            *("--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(demo_images)),
            *("--instance_prompt", "a photo of TOK toy", "--output_dir", str(tmp_path / "out"), *extra),
        ]
    )


# kohya's presets over the 9 blocks of a side, written out from their definitions (networks/lora.py):
# sine_i = sin(pi/2 * i/8), cosine the same reversed, linear_i = i/8, reverse_linear reversed, zeros.
SINE = [math.sin(math.pi * i / 16) for i in range(9)]
EXPECTED = {
    "sine": SINE,
    "cosine": SINE[::-1],
    "linear": [i / 8 for i in range(9)],
    "reverse_linear": [(8 - i) / 8 for i in range(9)],
    "zeros": [0.0] * 9,
}


def kohya_block_index(kohya_name: str) -> int:
    """kohya's get_block_index for SDXL, from a LoRA module's kohya (SAI) name: 1 + N for input_blocks_N,
    10 + N for middle_block_N, 13 + N for output_blocks_N."""
    name = kohya_name.removeprefix("lora_unet_")
    number = int(name.split("_")[2])
    if name.startswith("input_blocks_"):
        return 1 + number
    if name.startswith("middle_block_"):
        return 10 + number
    assert name.startswith("output_blocks_"), kohya_name
    return 13 + number


def kohya_lr_weight(down: str | None, up: str | None) -> list[float]:
    """kohya's 23 block weights for SDXL (time embedding, 9 down, 3 mid, 9 up, out), from the table above."""

    def side(spec: str | None) -> list[float]:
        if spec is None:
            return [1.0] * 9
        name, _, offset = spec.partition("+")
        return [w + float(offset or 0) if w + float(offset or 0) > 0 else 0.0 for w in EXPECTED[name]]

    return [1.0, *side(down), 1.0, 1.0, 1.0, *side(up), 1.0]


@pytest.mark.parametrize(
    ("down", "up"),
    [
        ("sine", "cosine"),
        ("linear", "reverse_linear+0.5"),
        ("cosine+0.25", None),
        (None, "zeros+1"),
        ("zeros", "sine"),
    ],
)
def test_block_lr_presets_match_kohyas_weights_per_sai_block(tiny_model, demo_images, tmp_path, down, up):
    spec = ",".join(f"{key}={value}" for key, value in (("down", down), ("up", up)) if value)
    flags = ("--lora_target", "all_linear", "--conv_rank", "2")
    args = flags_for(tiny_model, demo_images, tmp_path, *flags, "--unet_block_lr", spec)
    unet = load_sdxl(args).unet
    plan = unet_adapter_plan(unet, args)
    weights = kohya_lr_weight(down, up)
    names = kohya_module_names("unet", unet)
    candidates = unet_adapter_plan(unet, flags_for(tiny_model, demo_images, tmp_path / "all", *flags))
    assert len(candidates) > 100
    for path in candidates:
        expected = weights[kohya_block_index(names[path])]
        if expected == 0:
            assert path not in plan, f"{path}: kohya's weight 0 leaves the block without an adapter"
        else:
            assert plan[path].lr_scale == pytest.approx(expected, rel=1e-12), path
    blocks = {kohya_block_index(names[path]) for path in candidates}
    assert {2, 5, 8, 13, 17, 20} <= blocks, "resnets, attentions, down/upsamplers of both sides are covered"


def test_presets_combine_with_numbers_and_single_blocks(tiny_model, demo_images, tmp_path):
    spec = "down=linear,mid=0.5,down_blocks.2=3"
    args = flags_for(tiny_model, demo_images, tmp_path, "--unet_block_lr", spec)
    plan = unet_adapter_plan(load_sdxl(args).unet, args)
    assert {m.lr_scale for p, m in plan.items() if p.startswith("down_blocks.2.")} == {3.0}, "longest prefix wins"
    assert {m.lr_scale for p, m in plan.items() if p.startswith("down_blocks.1.attentions.1.")} == {5 / 8}
    assert {m.lr_scale for p, m in plan.items() if p.startswith("mid_block.")} == {0.5}
    assert {m.lr_scale for p, m in plan.items() if p.startswith("up_blocks.")} == {1.0}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("down=triangle", "non-negative number per block, or for down/up one of sine"),
        ("mid=sine", "weigh the down or up blocks"),
        ("up_blocks.0=cosine", "weigh the down or up blocks"),
        ("down=sine-0.5", "non-negative number"),
    ],
)
def test_bad_block_lr_presets_fail_before_loading(tiny_model, demo_images, tmp_path, spec, message):
    with pytest.raises(InputError, match=message):
        flags_for(tiny_model, demo_images, tmp_path, "--unet_block_lr", spec)


def test_presets_are_for_learning_rates_only(tiny_model, demo_images, tmp_path):
    with pytest.raises(InputError, match="non-negative number per block, as in"):
        flags_for(tiny_model, demo_images, tmp_path, "--unet_block_ranks", "down=sine")


def test_training_with_presets_uses_their_learning_rates_and_resumes_exactly(run_training, tmp_path):
    flags = ("--unet_block_lr", "down=sine,up=cosine+0.5", "--learning_rate", "1e-3", "--checkpointing_steps", "1")
    out = run_training(tmp_path / "run", *flags, "--max_train_steps", "2")
    state = json.loads((out / "checkpoint-1" / "training_state.json").read_text())
    unet_lrs = {round(group["initial_lr"] / 1e-3, 12) for group in state["optimizer"]["param_groups"]}
    # attention modules only (the default target): SAI blocks 4, 5, 7, 8 down; 0-5 up.
    expected = {round(SINE[i], 12) for i in (4, 5, 7, 8)} | {round(SINE[::-1][i] + 0.5, 12) for i in range(6)}
    assert unet_lrs == expected
    finished = load_file(out / "pytorch_lora_weights.safetensors")
    run_training(out, *flags, "--max_train_steps", "2", "--resume_from_checkpoint", "checkpoint-1")
    resumed = load_file(out / "pytorch_lora_weights.safetensors")
    assert resumed.keys() == finished.keys() and all(torch.equal(resumed[k], finished[k]) for k in finished)


def request_at_step(monkeypatch, output_dir: Path, step: int, what: str) -> None:
    """Touch the run's control file `what` once optimizer step `step` is done, as the Space's buttons do."""
    original = TrainingMonitor.step_done

    def step_done(self, done, *args, **kwargs):
        values = original(self, done, *args, **kwargs)
        if done == step:
            request(output_dir, what)
        return values

    monkeypatch.setattr(TrainingMonitor, "step_done", step_done)


def checkpoint_names(folder: Path) -> list[str]:
    return [p.name for p in complete_checkpoints(folder)]


def test_epoch_saves_keep_the_last_n_and_resume_exactly(run_training, tmp_path, monkeypatch):
    # 6 demo images, batch 2: 3 optimizer steps per epoch; 6 epochs = 18 steps.
    flags = ("--num_train_epochs", "6", "--checkpointing_steps", "1000", "--save_every_n_epochs", "2")
    every = run_training(tmp_path / "every", *flags)
    assert checkpoint_names(every) == ["checkpoint-6", "checkpoint-12", "checkpoint-18"]

    out = tmp_path / "last"
    request_at_step(monkeypatch, out, 4, "save")  # "save now", as the Space asks it
    run_training(out, *flags, "--save_last_n_epochs", "2")
    monkeypatch.undo()
    # Epoch 6's save removes epoch 2's (kohya's rule: e - N x K); the save on request stays.
    assert checkpoint_names(out) == ["checkpoint-4", "checkpoint-12", "checkpoint-18"]

    finished = load_file(out / "pytorch_lora_weights.safetensors")
    run_training(out, *flags, "--save_last_n_epochs", "2", "--resume_from_checkpoint", "checkpoint-12")
    resumed = load_file(out / "pytorch_lora_weights.safetensors")
    assert resumed.keys() == finished.keys() and all(torch.equal(resumed[k], finished[k]) for k in finished)
    expected = load_file(every / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(resumed[k], expected[k]) for k in expected), "saving changes no weight"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--save_every_n_epochs", "0"), "--save_every_n_epochs must be at least 1"),
        (("--save_last_n_epochs", "2"), "needs --save_every_n_epochs"),
        (("--save_every_n_epochs", "1", "--save_last_n_epochs", "0"), "--save_last_n_epochs must be at least 1"),
    ],
)
def test_bad_epoch_save_flags_fail_before_loading(tiny_model, demo_images, tmp_path, flags, message):
    with pytest.raises(InputError, match=message):
        flags_for(tiny_model, demo_images, tmp_path, *flags)


# ---------------------------------------------------------------------------------------------- --network_weights

STARTS = {
    "lora_conv_text": ("--conv_rank", "2", "--unet_block_ranks", "down=2", "--train_text_encoder"),
    "lokr": ("--adapter", "lokr", "--conv_rank", "2"),
}


def loaded_and_saved(tiny_model, demo_images, tmp_path, *flags: str) -> Path:
    """Build the models as training does with `flags` (--network_weights among them), train 0 steps, and write
    the run's output files into a folder; return it."""
    from sdxl_pivotal.models import trained_models
    from sdxl_pivotal.train import output_writer, prepare_models

    args = flags_for(tiny_model, demo_images, tmp_path, *flags)
    parts = load_sdxl(args)
    prepare_models(parts, args, None, 0, torch.device("cpu"), torch.float32)
    folder = tmp_path / "saved"
    output_writer(tmp_path / "out", trained_models(parts, args), None, args)(folder)
    return folder


@pytest.mark.parametrize("start", STARTS)
def test_network_weights_loaded_then_saved_give_the_same_files(run_training, tiny_model, demo_images, tmp_path, start):
    from sdxl_pivotal.formats.kohya import kohya_file_name

    first = run_training(tmp_path / "first", *STARTS[start], "--max_train_steps", "1", "--learning_rate", "1e-2")
    for name in ("pytorch_lora_weights.safetensors", kohya_file_name("first")):
        # The other flags are the defaults: family, ranks and targets come from the file.
        extra = ("--train_text_encoder",) if "--train_text_encoder" in STARTS[start] else ()
        saved = loaded_and_saved(
            tiny_model, demo_images, tmp_path / name, "--network_weights", str(first / name), *extra
        )
        again = load_file(saved / "pytorch_lora_weights.safetensors")
        original = load_file(first / "pytorch_lora_weights.safetensors")
        assert again.keys() == original.keys()
        assert all(torch.equal(again[k], original[k]) for k in original), name
        kohya_again = load_file(saved / kohya_file_name("out"))
        kohya_original = load_file(first / kohya_file_name("first"))
        assert kohya_again.keys() == kohya_original.keys()
        assert all(torch.equal(kohya_again[k], kohya_original[k]) for k in kohya_original), name


def test_network_weights_training_continues_and_resumes_exactly(run_training, tmp_path):
    first = run_training(tmp_path / "first", "--max_train_steps", "1", "--learning_rate", "1e-2", "--rank", "2")
    flags = ("--network_weights", str(first / "pytorch_lora_weights.safetensors"), "--max_train_steps", "2")
    flags += ("--learning_rate", "1e-2", "--checkpointing_steps", "1")
    out = run_training(tmp_path / "continued", *flags)
    start, continued = (
        load_file(first / "pytorch_lora_weights.safetensors"),
        load_file(out / "pytorch_lora_weights.safetensors"),
    )
    assert continued.keys() == start.keys(), "the file's modules, at its rank (2, not the default 4)"
    assert all(continued[k].shape == start[k].shape for k in start)
    assert any(not torch.equal(continued[k], start[k]) for k in start), "training changed them"
    run_training(out, *flags, "--resume_from_checkpoint", "checkpoint-1")
    resumed = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(resumed[k], continued[k]) for k in continued)


# kohya's key rules for SDXL, written out for the modules below (sd-scripts' SAI names): diffusers path -> SAI.
FOREIGN_MODULES = {
    # down_blocks.1.attentions.0 is input_blocks.4.1; its first transformer block's self-attention query.
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (
        "unet",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        4,
    ),
    # mid_block.attentions.0 is middle_block.1.
    "lora_unet_middle_block_1_proj_in": ("unet", "mid_block.attentions.0.proj_in", 2),
    # up_blocks.0's upsampler is output_blocks.2.2 (a 3x3 convolution: LoCon).
    "lora_unet_output_blocks_2_2_conv": ("unet", "up_blocks.0.upsamplers.0.conv", 2),
    # up_blocks.1.resnets.0's first convolution is output_blocks.3.0.in_layers.2.
    "lora_unet_output_blocks_3_0_in_layers_2": ("unet", "up_blocks.1.resnets.0.conv1", 3),
    # CLIP-L's and CLIP-G's layers under text_model.
    "lora_te2_text_model_encoder_layers_1_self_attn_out_proj": (
        "text_encoder_2",
        "encoder.layers.1.self_attn.out_proj",
        4,
    ),
    "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": ("text_encoder", "encoder.layers.0.self_attn.k_proj", 2),
}


def foreign_kohya_file(path: Path, parts) -> dict[str, torch.Tensor]:
    """A kohya LoRA as another trainer writes it: kohya's names, lora_down/lora_up/alpha, per-module ranks."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, (part, module_path, rank) in FOREIGN_MODULES.items():
        module = getattr(parts, part).get_submodule(
            module_path
            if part == "unet" or not hasattr(getattr(parts, part), "text_model")
            else "text_model." + module_path
        )
        if isinstance(module, torch.nn.Conv2d):
            down_shape, up_shape = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
        else:
            down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
        state[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=generator)
        state[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=generator)
        state[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(state, path)
    return state


def test_a_kohya_file_of_another_trainer_loads_with_its_ranks(tiny_model, demo_images, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sdxl_pivotal.formats.kohya import kohya_file_name

    args = flags_for(tiny_model, demo_images, tmp_path)
    foreign = foreign_kohya_file(tmp_path / "other.safetensors", load_sdxl(args))
    from_file = ("--network_weights", str(tmp_path / "other.safetensors"), "--train_text_encoder")
    saved = loaded_and_saved(tiny_model, demo_images, tmp_path, *from_file)
    again = load_file(saved / kohya_file_name("out"))
    assert again.keys() == foreign.keys()
    assert all(torch.equal(again[k], foreign[k]) for k in foreign), "saved as loaded"

    # The modules kohya's names point to, at the file's ranks and scales (alpha / rank).
    args = flags_for(tiny_model, demo_images, tmp_path, *from_file)
    parts = load_sdxl(args)
    from sdxl_pivotal.adapters import add_adapters

    plan = add_adapters(parts, args)
    assert set(plan) == {p for part, p, _ in FOREIGN_MODULES.values() if part == "unet"}
    for part, module_path, rank in FOREIGN_MODULES.values():
        model = getattr(parts, part)
        layers = {p.removeprefix("text_model."): m for p, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
        assert layers[module_path].r["default"] == rank
        assert layers[module_path].scaling["default"] == pytest.approx(1.0 / rank)
        assert len(layers) == sum(1 for pa, _, _ in FOREIGN_MODULES.values() if pa == part)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "pass an existing LoRA .safetensors file"),
        (b"not a safetensors file", "not a readable safetensors file"),
        ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, "holds no LoRA"),  # an embeddings file
    ],
)
def test_bad_network_weights_fail_before_loading(tiny_model, demo_images, tmp_path, content, message):
    path = tmp_path / "weights.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        save_file(content, path)
    with pytest.raises(InputError, match=message):
        flags_for(tiny_model, demo_images, tmp_path, "--network_weights", str(path))


def test_network_weights_warn_about_the_flags_they_replace(run_training, tiny_model, demo_images, tmp_path):
    first = run_training(tmp_path / "first", "--max_train_steps", "1")
    weights = ("--network_weights", str(first / "pytorch_lora_weights.safetensors"))
    with pytest.warns(UserWarning, match=r"--conv_rank, --unet_block_ranks have no effect"):
        flags_for(tiny_model, demo_images, tmp_path, *weights, "--conv_rank", "2", "--unet_block_ranks", "down=2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flags_for(tiny_model, demo_images, tmp_path, *weights, "--rank", "8")  # the UNet-only file: encoders' rank


def test_network_weights_with_text_encoders_need_train_text_encoder(run_training, tiny_model, demo_images, tmp_path):
    first = run_training(tmp_path / "first", "--train_text_encoder", "--max_train_steps", "1")
    with pytest.raises(InputError, match="pass --train_text_encoder to continue them"):
        flags_for(
            tiny_model, demo_images, tmp_path, "--network_weights", str(first / "pytorch_lora_weights.safetensors")
        )


# ---------------------------------------------------------------------------------------------- --sample_prompts


def test_sample_prompt_lines_read_as_kohya_reads_them(tmp_path):
    from sdxl_pivotal.sample_prompts import SamplePrompt, read_sample_prompts

    path = tmp_path / "prompts.txt"
    path.write_text(
        "# a comment\n\n"
        "a TOK toy, on a beach --n blurry, low quality --w 1024 --h 768 --d 42 --l 5.5 --s 30\n"
        "TOK toy in the snow\n"
    )
    assert read_sample_prompts(path) == [
        SamplePrompt("a TOK toy, on a beach", "blurry, low quality", 1024, 768, 30, 5.5, 42),
        SamplePrompt("TOK toy in the snow"),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a toy --x 3", "line 1: unknown option --x"),
        ("a toy --w wide", "--w needs one value"),
        ("a toy --w 100", "positive multiple of 8"),
        ("a toy --d 1 --d 2", "--d needs one value"),
        (" --w 64", "no prompt"),
    ],
)
def test_bad_sample_prompt_lines_fail_before_loading(tiny_model, demo_images, tmp_path, line, message):
    path = tmp_path / "prompts.txt"
    path.write_text(line + "\n")
    with pytest.raises(InputError, match=message):
        flags_for(tiny_model, demo_images, tmp_path, "--sample_prompts", str(path), "--sample_every_n_steps", "2")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--sample_every_n_steps", "2"), "needs --sample_prompts"),
        (("--sample_prompts", "missing.txt"), "no such file"),
    ],
)
def test_bad_sample_flags_fail_before_loading(tiny_model, demo_images, tmp_path, flags, message):
    with pytest.raises(InputError, match=message):
        flags_for(tiny_model, demo_images, tmp_path, *flags)


def test_sample_images_per_step_with_their_options_and_on_request(run_training, tmp_path, monkeypatch):
    from sdxl_pivotal.sample_prompts import SamplePrompt, with_tokens
    from sdxl_pivotal.tokens import PivotalTokens

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "TOK toy --w 64 --h 32 --s 2 --d 5 --l 3\n"
        "TOK toy --w 64 --h 32 --s 2 --d 5 --l 3 --n blurry\n"
        "TOK toy --w 64 --h 32 --s 2 --d 5 --l 3\n"
        "TOK toy --w 64 --h 32 --s 2 --d 6 --l 3\n"
        "a photo of TOK toy --s 2\n"
    )
    out = tmp_path / "run"
    request_at_step(monkeypatch, out, 1, "sample")  # "sample now", as the Space asks it
    flags = ("--max_train_steps", "4", "--checkpointing_steps", "100", "--train_text_encoder_ti")
    run_training(
        out, *flags, "--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--report_to", "tensorboard"
    )
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-1", "step-2", "step-4"]

    images = [np.asarray(Image.open(out / "samples" / "step-4" / f"{i}.png"), dtype=np.float32) for i in range(5)]
    assert [im.shape for im in images] == [(32, 64, 3)] * 4 + [(64, 64, 3)], "--w/--h; the training resolution"
    assert np.array_equal(images[0], images[2]), "the same line, the same image (--d seeds it)"
    assert np.abs(images[0] - images[3]).mean() > 0, "another --d, another image"
    assert np.abs(images[0] - images[1]).mean() > 0, "--n changes the image"
    from test_validation import tensorboard_image_tags

    tags = tensorboard_image_tags(out / "logs")
    assert all(sorted(tags[f"samples/{i}"]) == [1, 2, 4] for i in range(5))

    tokens = PivotalTokens.from_flags("TOK", 2)
    assert with_tokens([SamplePrompt("TOK toy", "not TOK")], tokens) == [SamplePrompt("<s0><s1> toy", "not <s0><s1>")]

    # Sampling changes no weight.
    plain = run_training(tmp_path / "plain", *flags)
    sampled, expected = (
        load_file(out / "pytorch_lora_weights.safetensors"),
        load_file(plain / "pytorch_lora_weights.safetensors"),
    )
    assert all(torch.equal(sampled[k], expected[k]) for k in expected)

    # --overwrite_output_dir removes the earlier run's sample images too.
    run_training(out, "--max_train_steps", "1", "--overwrite_output_dir")
    assert list((out / "samples").iterdir()) == []


# ---------------------------------------------------------------------------------------------- tools svd-merge


def test_svd_merge_at_full_rank_equals_both_loras_loaded_at_their_ratios(
    run_training, tiny_model, demo_images, tmp_path, capsys
):
    from test_formats import assert_outputs_equal, fresh_pipeline, outputs

    from sdxl_pivotal.formats import load_for_diffusers
    from sdxl_pivotal.tools.cli import main

    # Ours (diffusers file; LoCon, text encoders, alpha != rank) and another trainer's kohya file, partly overlapping.
    flags = ("--conv_rank", "2", "--lora_alpha", "2", "--train_text_encoder", "--max_train_steps", "1")
    ours = run_training(tmp_path / "ours", *flags, "--learning_rate", "1e-2", "--text_encoder_lr", "1e-2")
    args = flags_for(tiny_model, demo_images, tmp_path)
    other = tmp_path / "other.safetensors"
    foreign_kohya_file(other, load_sdxl(args))
    first = ours / "pytorch_lora_weights.safetensors"

    merged = tmp_path / "merged.safetensors"
    argv = [first, other, "--ratios", 0.7, 0.3, "--rank", 64, "--base", tiny_model, "--output", merged]
    assert main(["svd-merge", *map(str, argv)]) == 0
    assert "overall retained energy: 1.000000" in capsys.readouterr().out

    together = fresh_pipeline(tiny_model)
    load_for_diffusers(together, first, adapter_name="a")
    load_for_diffusers(together, other, adapter_name="b")
    together.set_adapters(["a", "b"], [0.7, 0.3])
    single = fresh_pipeline(tiny_model)
    load_for_diffusers(single, merged)
    assert_outputs_equal(outputs(single), outputs(together), atol=1e-5)
    only_ours = fresh_pipeline(tiny_model)
    load_for_diffusers(only_ours, first)
    for merged_output, ours_output in zip(outputs(single), outputs(only_ours), strict=True):
        assert not torch.allclose(merged_output, ours_output, atol=1e-4), "both LoRAs count"

    # At a lower rank: each module at most that rank, in kohya's form when asked (--to kohya).
    low = tmp_path / "low.safetensors"
    argv = [first, other, "--ratios", 0.7, 0.3, "--rank", 1, "--base", tiny_model, "--output", low, "--to", "kohya"]
    assert main(["svd-merge", *map(str, argv)]) == 0
    state = load_file(low)
    downs = [v for k, v in state.items() if k.endswith("lora_down.weight")]
    assert downs and all(v.shape[0] == 1 for v in downs)
    assert all(
        float(state[k.replace("lora_down.weight", "alpha")]) == 1.0 for k in state if k.endswith("lora_down.weight")
    )


def test_svd_merge_bad_input_is_one_line(tiny_model, demo_images, tmp_path, capsys):
    from sdxl_pivotal.tools.cli import main

    args = flags_for(tiny_model, demo_images, tmp_path)
    other = tmp_path / "other.safetensors"
    foreign_kohya_file(other, load_sdxl(args))
    argv = [
        "svd-merge",
        str(other),
        str(other),
        "--ratios",
        "1",
        "--rank",
        "4",
        "--output",
        str(tmp_path / "o.safetensors"),
    ]
    assert main([*argv, "--base", str(tiny_model)]) == 2
    assert "2 LoRA files" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- two processes


@pytest.mark.slow
def test_two_processes_with_kohya_options_resume_exactly(run_training, tiny_model, demo_images, tmp_path):
    """--network_weights, block-weight presets, epoch saves and sample prompts under DDP (2 CPU processes)."""
    from test_multiprocess import torchrun_and_resume

    start = run_training(tmp_path / "start", "--max_train_steps", "1", "--rank", "2", "--learning_rate", "1e-2")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("TOK toy --w 32 --h 32 --s 1 --d 3\n")
    flags = ("--network_weights", str(start / "pytorch_lora_weights.safetensors"), "--unet_block_lr", "up=cosine+0.5")
    flags += ("--save_every_n_epochs", "1", "--sample_prompts", str(prompts), "--sample_every_n_steps", "2")
    full, resumed = torchrun_and_resume(tmp_path, tiny_model, demo_images, *flags)
    assert sorted(p.name for p in (full / "samples").iterdir()) == ["step-2", "step-4"]
    left, right = (
        load_file(full / "pytorch_lora_weights.safetensors"),
        load_file(resumed / "pytorch_lora_weights.safetensors"),
    )
    assert left.keys() == load_file(start / "pytorch_lora_weights.safetensors").keys()
    assert all(torch.equal(left[k], right[k]) for k in left)


def test_sample_and_save_schedules_by_step_and_epoch():
    from argparse import Namespace

    from sdxl_pivotal.checkpoints import checkpoint_due
    from sdxl_pivotal.sample_prompts import is_sample_step

    by_epoch = Namespace(sample_every_n_steps=None, sample_every_n_epochs=2)
    assert [s for s in range(1, 13) if is_sample_step(by_epoch, s, 3)] == [6, 12]
    by_step = Namespace(sample_every_n_steps=4, sample_every_n_epochs=None)
    assert [s for s in range(1, 13) if is_sample_step(by_step, s, 3)] == [4, 8, 12]
    assert not any(
        is_sample_step(Namespace(sample_every_n_steps=None, sample_every_n_epochs=None), s, 3) for s in range(1, 13)
    )
    saves = Namespace(checkpointing_steps=5, save_every_n_epochs=3)
    assert [s for s in range(1, 19) if checkpoint_due(saves, s, 2)] == [5, 6, 10, 12, 15, 18]

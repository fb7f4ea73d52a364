"""The Space's command builder: every setting becomes the flag the trainer documents, and the built command is
accepted by the trainer's own parser (`sdxl_pivotal.args.parse_args`, its checks included)."""

from __future__ import annotations

import argparse

import pytest

from sdxl_pivotal.args import build_parser, parse_args
from sdxl_pivotal.space import command as cmd
from sdxl_pivotal.space.presets import PRESETS, preset_settings, repeats


def non_default_value(action: argparse.Action):
    """A valid value of `action` that differs from its default."""
    if cmd.is_bool(action):
        return not action.default
    if action.choices:
        return next(c for c in action.choices if c != cmd.coerce(action, action.default))
    if action.type is int:
        return (action.default or 0) + 3
    if action.type is float:
        return (action.default or 0.0) + 0.25
    return f"value-of-{action.dest}"


def shown_settings() -> list[argparse.Action]:
    """Every flag the app lets the user set: the common ones and the advanced sections."""
    actions = cmd.trainer_actions()
    return [actions[d] for d in cmd.COMMON] + [a for _, group in cmd.advanced_sections() for a in group]


def test_every_trainer_flag_is_shown_once_or_set_by_the_app():
    shown = [a.dest for a in shown_settings()]
    assert len(shown) == len(set(shown))
    assert set(shown) | set(cmd.APP_OWNED) == set(cmd.trainer_actions())
    assert not set(shown) & set(cmd.APP_OWNED)
    assert "hub_token" in cmd.APP_OWNED  # never a setting of the command line


@pytest.mark.parametrize("action", shown_settings(), ids=lambda a: a.dest)
def test_each_setting_maps_to_its_documented_flag(action):
    value = non_default_value(action)
    words = cmd.trainer_arguments({action.dest: value})
    assert words[0] == action.option_strings[0]  # the flag the trainer's --help documents
    others = {"pretrained_model_name_or_path": "m", "instance_prompt": "p"}
    required = [w for dest, v in others.items() if dest != action.dest for w in (f"--{dest}", v)]
    parsed = build_parser().parse_args([*required, *words])
    assert getattr(parsed, action.dest) == cmd.coerce(action, value)


@pytest.mark.parametrize("action", shown_settings(), ids=lambda a: a.dest)
def test_default_values_add_no_flag(action):
    assert cmd.trainer_arguments({action.dest: action.default}) == []


def test_false_booleans_are_spelled_out_when_the_default_is_true():
    assert cmd.trainer_arguments({"bundle_embeddings": False}) == ["--bundle_embeddings", "False"]
    assert cmd.trainer_arguments({"train_text_encoder_ti": True}) == ["--train_text_encoder_ti"]


def test_widget_values_are_typed_as_the_parser_types_them():
    actions = cmd.trainer_actions()
    assert cmd.trainer_arguments({"rank": 16.0, "checkpoints_total_limit": ""}) == ["--rank", "16"]
    assert cmd.coerce(actions["optimizer"], "Prodigy") == "prodigy"
    assert cmd.coerce(actions["snr_gamma"], "5") == 5.0


def test_unknown_settings_are_refused():
    with pytest.raises(KeyError, match="not flags of the trainer: bogus"):
        cmd.trainer_arguments({"bogus": 1})


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_built_command_passes_the_trainers_own_checks(preset, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    settings = {
        "pretrained_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0",
        **preset_settings(preset, 12),
        "instance_data_dir": str(images),
        "output_dir": str(tmp_path / "output" / "my-lora"),
        "validation_prompt": "a photo of TOK",
        "mixed_precision": "bf16",
    }
    if PRESETS[preset].prior_preservation:
        settings["class_data_dir"] = str(tmp_path / "class-images")
    command = cmd.launch_command(cmd.trainer_arguments(settings), num_gpus=1, mixed_precision="bf16", cpu_threads=2)
    assert command[:2] == ["accelerate", "launch"]
    assert command[command.index("--mixed_precision") + 1] == "bf16"
    args = parse_args(cmd.split_launch(command))
    assert args.instance_prompt == PRESETS[preset].concept
    assert args.max_train_steps == PRESETS[preset].steps(12)
    assert args.rank == PRESETS[preset].rank
    assert args.repeats == repeats(12)
    assert args.train_text_encoder_ti
    assert args.with_prior_preservation == PRESETS[preset].prior_preservation
    assert cmd.shell_text(command).startswith("accelerate launch --num_machines 1")


def test_cpu_launch_sets_threads_and_several_gpus_use_multi_gpu():
    cpu = cmd.launch_command([], num_gpus=0, mixed_precision=None, cpu_threads=2)
    assert cpu[cpu.index("--num_cpu_threads_per_process") + 1] == "2" and "--cpu" in cpu
    multi = cmd.launch_command([], num_gpus=4, mixed_precision="fp16", cpu_threads=2)
    assert "--multi_gpu" in multi and multi[multi.index("--num_processes") + 1] == "4"


def test_preset_steps_scale_with_images_and_are_clamped():
    face = PRESETS["face"]
    assert face.steps(2) == face.min_steps
    assert face.steps(10) == 10 * face.steps_per_image
    assert face.steps(150) == face.max_steps
    assert repeats(2) > repeats(30) == 1

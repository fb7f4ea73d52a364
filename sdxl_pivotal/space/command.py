"""Settings -> the exact `accelerate launch train_dreambooth_lora_sdxl_advanced.py ...` command the app runs.

Everything comes from the trainer's own parser (`sdxl_pivotal.args.build_parser`): the flag names, types, defaults,
choices, help texts and groups, so the app's settings cannot drift from the trainer. A setting is keyed by its
parser `dest` and becomes the flag the parser documents; settings at their default are left out.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..args import build_parser, str_to_bool

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAINER_SCRIPT = "train_dreambooth_lora_sdxl_advanced.py"

# Set by the app from the run folder, never by the user: data source, output folder, resume, Hub (the app pushes
# itself, so the trainer never sees a token), and the launcher's own rank.
APP_OWNED = (
    "instance_data_dir",
    "dataset_name",
    "dataset_config_name",
    "image_column",
    "caption_column",
    "caption_extension",
    "class_data_dir",
    "output_dir",
    "overwrite_output_dir",
    "resume_from_checkpoint",
    "logging_dir",
    "push_to_hub",
    "hub_token",
    "hub_model_id",
    "local_rank",
    "datasets",  # several folders come from a config file; the app trains the images uploaded here
    "config",
    "print_config",
)
# Shown in view; every other flag goes in the advanced sections.
COMMON = (
    "pretrained_model_name_or_path",
    "instance_prompt",
    "max_train_steps",
    "rank",
    "learning_rate",
    "text_encoder_lr",
    "resolution",
    "train_batch_size",
    "repeats",
    "train_text_encoder_ti",
    "with_prior_preservation",
    "class_prompt",
    "num_class_images",
    "validation_prompt",
    "validation_steps",
    "num_validation_images",
    "checkpointing_steps",
    "mixed_precision",
    "seed",
)


def trainer_actions() -> dict[str, argparse.Action]:
    """The trainer's flags by `dest` (no --help)."""
    return {a.dest: a for a in build_parser()._actions if a.option_strings and a.dest != "help"}


def advanced_sections() -> list[tuple[str, list[argparse.Action]]]:
    """The parser's groups with the flags that are neither common nor set by the app, in parser order."""
    sections = []
    for group in build_parser()._action_groups:
        actions = [
            a
            for a in group._group_actions
            if a.option_strings and a.dest not in COMMON and a.dest not in APP_OWNED and a.dest != "help"
        ]
        if actions:
            sections.append((group.title, actions))
    return sections


def is_bool(action: argparse.Action) -> bool:
    return action.type is str_to_bool


def coerce(action: argparse.Action, value):
    """A UI widget's value as the parser's type (empty -> None)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if is_bool(action):
        return str_to_bool(value)
    if action.type is int:
        return int(value)
    if action.type is float:
        return float(value)
    return action.type(value) if callable(action.type) else str(value)


def flag_arguments(action: argparse.Action, value) -> list[str]:
    """The command-line words for one setting; none when it is the trainer's default."""
    if value is None or value == coerce(action, action.default):
        return []
    flag = action.option_strings[0]
    if is_bool(action):
        return [flag] if value else [flag, "False"]
    return [flag, str(value)]


def trainer_arguments(settings: dict) -> list[str]:
    """`{dest: value}` -> the trainer's flags, in the parser's order."""
    actions = trainer_actions()
    unknown = sorted(set(settings) - set(actions))
    if unknown:
        raise KeyError(f"not flags of the trainer: {', '.join(unknown)}")
    words = []
    for dest, action in actions.items():
        if dest in settings:
            words += flag_arguments(action, coerce(action, settings[dest]))
    return words


def launch_command(trainer_args: list[str], num_gpus: int, mixed_precision: str | None, cpu_threads: int) -> list[str]:
    """`accelerate launch` with every launcher setting explicit (no accelerate config file is read)."""
    launcher = ["accelerate", "launch", "--num_machines", "1", "--dynamo_backend", "no"]
    launcher += ["--num_processes", str(max(1, num_gpus)), "--mixed_precision", mixed_precision or "no"]
    if num_gpus == 0:
        launcher += ["--cpu", "--num_cpu_threads_per_process", str(cpu_threads)]
    elif num_gpus > 1:
        launcher += ["--multi_gpu"]
    return [*launcher, TRAINER_SCRIPT, *trainer_args]


def shell_text(command: list[str]) -> str:
    """The command as one copyable shell line."""
    return shlex.join(command)


def split_launch(command: list[str]) -> list[str]:
    """The trainer's own flags of a `launch_command`."""
    return command[command.index(TRAINER_SCRIPT) + 1 :]

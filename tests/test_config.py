"""Config files: `--config` (YAML, TOML, JSON) means what the same flags on the command line mean, the command
line wins, bad keys and values fail early and clearly, and `--print_config` gives a file that parses back to the
same arguments, for every flag of the parser."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from sdxl_pivotal.args import build_parser, parse_args
from sdxl_pivotal.config import changed_flags, config_text, save_run_config
from sdxl_pivotal.errors import InputError
from sdxl_pivotal.tiny import write_demo_images

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_dreambooth_lora_sdxl_advanced.py"
HUB_TOKEN = "hf_secretsecretsecret"


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    return write_demo_images(tmp_path / "images", count=2)


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def base_config(image_dir: Path, tmp_path: Path) -> dict:
    return {
        "pretrained_model_name_or_path": "/nonexistent/model",
        "instance_prompt": "a photo of TOK toy",
        "instance_data_dir": str(image_dir),
        "output_dir": str(tmp_path / "out"),
    }


def write(path: Path, values: dict) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        path.write_text(yaml.safe_dump(values))
    return path


def parse_quietly(argv: list[str]) -> argparse.Namespace:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. Prodigy with a small learning rate: accepted, with a warning
        return parse_args(argv)


def printed_config(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_quietly([*argv, "--print_config"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def comparable(args: argparse.Namespace) -> dict:
    """The parsed arguments, less the two that name where they came from or are never written."""
    return {k: v for k, v in vars(args).items() if k not in ("config", "hub_token")}


# ---------------------------------------------------------------------------------------------- round trip

# Valid values (different from the defaults) the generic rule below would get wrong.
SPECIAL = {
    "resolution": "64",
    "text_encoder_lr": "1.5e-07",  # written by YAML in exponent form
    "bucket_step": "32",
    "bucket_min_side": "64",
    "bucket_max_side": "128",
    "caption_extension": ".caption",
    "token_abstraction": "TOK,SKS",
    "lora_unet_blocks": "unet.up_blocks.0.attentions.0, unet.mid_block.attentions.0",
    "unet_block_ranks": "down=2,up_blocks.0=16",
    "unet_block_conv_ranks": "mid=1",
    "unet_block_lr": "down=sine+0.5,mid=0.5",  # a kohya preset too
    "lr_step_rules": "1:10,0.1",
    "optimizer": "Prodigy",
    "resume_from_checkpoint": "latest",
    "report_to": "none",  # --hub_token is refused with wandb
    "hub_token": HUB_TOKEN,
    "local_rank": "0",
    "adapter": "lokr",
    "dylora_unit": "2",  # divides the default --rank 4
    "validation_prompt": "a photo of TOK toy: on the beach, #1",  # YAML-special characters
    "instance_prompt": "yes",  # a string YAML would read as a boolean unless quoted
}
# Flags that contradict some of the others: they get a command line of their own (with a dataset source).
SECOND_COMMAND_LINE = {
    "use_blora",  # vs --lora_unet_blocks
    "train_text_encoder",  # vs --train_text_encoder_ti
    "train_text_encoder_frac",
    "do_edm_style_training",  # vs --snr_gamma
    "dataset_name",  # vs --instance_data_dir
    "dataset_config_name",
    "image_column",
    "caption_column",
    "adapter",  # LoKr, vs --use_dora and --lora_dropout
    "rank_dropout",
    "module_dropout",
    "use_effective_conv2d",
    "lokr_factor",
    "decompose_both",
    "lora_target_regex",  # vs --lora_target
    "overwrite_output_dir",  # vs --resume_from_checkpoint
    "sample_every_n_epochs",  # vs --sample_every_n_steps (with a --sample_prompts file of its own)
}
# Flags that need another one on their command line: that one's flag, then its value (None: its generic value).
COMPANIONS = {"sample_every_n_epochs": ("--sample_prompts", None), "dylora_unit": ("--adapter", "dylora")}
# --datasets replaces both image sources: a command line of its own (also DyLoRA's, vs LoKr's --adapter).
THIRD_COMMAND_LINE = {"datasets", "dylora_unit"}
# How every flag's source is named: these two are what the round trip exercises.
MECHANISM = {"config", "print_config"}


def flag_text(action: argparse.Action, tmp_path: Path, image_dir: Path) -> str:
    """A valid command-line value of a flag, different from its default."""
    dest = action.dest
    if dest in SPECIAL:
        return SPECIAL[dest]
    if dest in ("instance_data_dir", "dataset_name"):
        return str(image_dir)
    if dest == "sample_prompts":
        path = tmp_path / "prompts.txt"
        path.write_text("a photo of TOK toy --w 64 --h 64 --d 3\n")
        return str(path)
    if dest == "network_weights":  # an existing LoRA file (its keys are all that parsing reads)
        path = tmp_path / "start.safetensors"
        save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(1, 1)}, path)
        return str(path)
    if dest == "datasets":
        entries = [
            {"image_dir": str(image_dir), "repeats": 3, "instance_prompt": "a TOK toy", "resolution": 32},
            {"dataset_name": str(image_dir), "caption_column": "text", "aspect_ratio_bucketing": True},
        ]
        return json.dumps(entries)
    if action.nargs == "?":
        return "False" if action.default else "True"
    if dest.endswith("_dir"):
        return str(tmp_path / dest)
    if action.choices:
        return next(str(c) for c in action.choices if c != action.default)
    if action.type is int:
        return "1234567"  # long, so a value cut or rounded on the way would show
    if action.type is float:
        return "0.123456789012345"
    return f"x-{dest}"


def parser_action(dest: str) -> argparse.Action:
    return next(a for a in build_parser()._actions if a.dest == dest)


def every_flag_command_lines(tmp_path: Path, image_dir: Path) -> list[list[str]]:
    actions = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    base = ["--pretrained_model_name_or_path", "m", "--instance_prompt", "p"]
    first, second, third = [], [*base, "--output_dir", "o2"], [*base, "--output_dir", "o3"]
    for action in actions:
        if action.dest in MECHANISM:
            continue
        target = first
        if action.dest in SECOND_COMMAND_LINE:
            target = second
        elif action.dest in THIRD_COMMAND_LINE:
            target = third
        target += [action.option_strings[0], flag_text(action, tmp_path, image_dir)]
        if action.dest in COMPANIONS:
            flag, value = COMPANIONS[action.dest]
            target += [flag, value or flag_text(parser_action(flag.removeprefix("--")), tmp_path, image_dir)]
    return [first, second, third]


@pytest.mark.usefixtures("gpu_packages")
def test_round_trip_over_every_flag(tmp_path, image_dir, capsys):
    """command line -> --print_config -> --config: the same parsed arguments, for every flag of the parser."""
    parser = build_parser()
    defaults = {a.dest: a.default for a in parser._actions if a.option_strings}
    covered = set()
    for i, argv in enumerate(every_flag_command_lines(tmp_path, image_dir)):
        from_command_line = parse_quietly(argv)
        dests = {parser._option_string_actions[t].dest for t in argv if t in parser._option_string_actions}
        covered |= dests
        for dest in dests:  # every flag really is set away from its default, so losing it would show
            assert getattr(from_command_line, dest) != defaults[dest], dest
        text = printed_config(argv, capsys)
        assert HUB_TOKEN not in text and "hub_token" not in text
        config = tmp_path / f"printed-{i}.yaml"
        config.write_text(text)
        from_file = parse_quietly(["--config", str(config)])
        assert comparable(from_file) == comparable(from_command_line)
        assert from_file.config == str(config)
        # The file as JSON (what a JSON config holds) reads back the same too.
        as_json = write(tmp_path / f"printed-{i}.json", yaml.safe_load(text))
        assert comparable(parse_quietly(["--config", str(as_json)])) == comparable(from_command_line)
    assert covered | MECHANISM == set(defaults) - {"help"}


def test_printed_config_holds_every_flag_after_defaults(tmp_path, image_dir, capsys):
    config = base_config(image_dir, tmp_path)
    argv = [f"--{k}={v}" for k, v in config.items()]
    printed = yaml.safe_load(printed_config([*argv, "--hub_token", HUB_TOKEN], capsys))
    dests = [a.dest for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert list(printed) == [d for d in dests if d not in ("hub_token", "config", "print_config")]
    assert printed["rank"] == 4 and printed["learning_rate"] == 1e-4 and printed["center_crop"] is False
    # The flags as given, not the values derived from them later (alpha = rank, bucket sides).
    assert printed["lora_alpha"] is None and printed["bucket_max_side"] is None


# ---------------------------------------------------------------------------------------------- meaning of keys


def test_file_values_mean_what_the_command_line_means(tmp_path, image_dir):
    values = {
        **base_config(image_dir, tmp_path),
        "rank": 8,
        "learning_rate": 3e-4,
        "lr_warmup_steps": "0",  # a string, as on the command line
        "center_crop": True,
        "random_flip": "yes",
        "prodigy_decouple": False,
        "optimizer": "Prodigy",
        "token_abstraction": ["TOK", "SKS"],
        "lokr_factor": -1,
        "train_text_encoder_ti": True,
    }
    from_file = parse_quietly(["--config", str(write(tmp_path / "run.yaml", values))])
    command_line = [
        *(f"--{k}={v}" for k, v in base_config(image_dir, tmp_path).items()),
        *("--rank", "8", "--learning_rate", "3e-4", "--lr_warmup_steps", "0", "--center_crop", "--random_flip"),
        *("--prodigy_decouple", "False", "--optimizer", "Prodigy", "--token_abstraction", "TOK,SKS"),
        "--train_text_encoder_ti",
    ]
    assert comparable(from_file) == comparable(parse_quietly(command_line))
    assert from_file.prodigy_decouple is False and from_file.random_flip is True and from_file.optimizer == "prodigy"


def test_command_line_wins_over_the_file(tmp_path, image_dir):
    values = {**base_config(image_dir, tmp_path), "rank": 8, "center_crop": True, "seed": 1}
    path = write(tmp_path / "run.yaml", values)
    args = parse_args(["--rank", "16", "--config", str(path), "--center_crop", "False"])
    assert args.rank == 16 and args.center_crop is False and args.seed == 1


def test_toml_file(tmp_path, image_dir):
    path = tmp_path / "run.toml"
    path.write_text(
        "\n".join(
            [
                'pretrained_model_name_or_path = "/nonexistent/model"',
                'instance_prompt = "a photo of TOK toy"',
                f'instance_data_dir = "{image_dir}"',
                f'output_dir = "{tmp_path / "out"}"',
                "rank = 8",
                "learning_rate = 2e-4",
                "random_flip = true",
                'token_abstraction = ["TOK", "SKS"]',
            ]
        )
    )
    args = parse_args(["--config", str(path)])
    assert (args.rank, args.learning_rate, args.random_flip, args.token_abstraction) == (8, 2e-4, True, "TOK,SKS")


def test_paths_are_relative_to_the_working_directory_as_on_the_command_line(tmp_path, image_dir, monkeypatch):
    (tmp_path / "configs").mkdir()
    values = {**base_config(image_dir, tmp_path), "instance_data_dir": "images", "output_dir": "out"}
    path = write(tmp_path / "configs" / "run.yaml", values)
    monkeypatch.chdir(tmp_path)
    args = parse_args(["--config", "configs/run.yaml"])
    assert args.instance_data_dir == "images" and args.output_dir == "out"
    monkeypatch.chdir(tmp_path / "configs")  # "images" is not beside the file's folder
    with pytest.raises(InputError, match="--instance_data_dir images does not exist"):
        parse_args(["--config", str(path)])


def test_required_flags_may_come_from_the_file(tmp_path, image_dir):
    args = parse_args(["--config", str(write(tmp_path / "run.json", base_config(image_dir, tmp_path)))])
    assert args.pretrained_model_name_or_path == "/nonexistent/model" and args.instance_prompt == "a photo of TOK toy"


# ---------------------------------------------------------------------------------------------- bad files


def test_unknown_key_names_the_closest_flag(tmp_path, image_dir):
    path = write(tmp_path / "run.yaml", {**base_config(image_dir, tmp_path), "learnig_rate": 1e-4})
    with pytest.raises(InputError, match=r"unknown key 'learnig_rate'; did you mean 'learning_rate'"):
        parse_args(["--config", str(path)])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("rank", "four", "key 'rank' (--rank) expects an integer, got 'four'"),
        ("rank", 2.5, "key 'rank' (--rank) expects an integer, got 2.5 (float)"),
        ("learning_rate", True, "key 'learning_rate' (--learning_rate) expects a number, got True (bool)"),
        ("center_crop", "maybe", "key 'center_crop' (--center_crop) expects a boolean (true/false), got 'maybe'"),
        ("center_crop", 1.5, "key 'center_crop' (--center_crop) expects a boolean"),
        ("instance_prompt", 5, "key 'instance_prompt' (--instance_prompt) expects a string"),
        ("validation_prompt", ["a", "b"], "key 'validation_prompt' (--validation_prompt) expects a string"),
        ("adapter", "lorax", "key 'adapter' (--adapter) must be one of lora, dylora, loha, lokr, ia3; got 'lorax'"),
        ("resolution", None, "key 'resolution' is empty (null); give a value or remove the key (its default is 1024)"),
        ("instance_prompt", None, "key 'instance_prompt' is empty (null); give a value or remove the key (it is"),
        ("config", "other.yaml", "a config file cannot name another one"),
    ],
)
def test_wrong_value_names_the_key_and_the_type(tmp_path, image_dir, key, value, message):
    path = write(tmp_path / "run.yaml", {**base_config(image_dir, tmp_path), key: value})
    with pytest.raises(InputError) as error:
        parse_args(["--config", str(path)])
    assert message in str(error.value) and str(path) in str(error.value)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("run.yaml", "rank: [4", "is not valid YAML"),
        ("run.json", "{rank: 4}", "is not valid JSON"),
        ("run.toml", "rank = = 4", "is not valid TOML"),
        ("run.yaml", "- rank\n- 4\n", "must hold key: value pairs"),
        ("run.ini", "rank=4", "use a .yaml, .yml, .toml or .json file"),
    ],
)
def test_unreadable_file(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        parse_args(["--config", str(path)])


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])


def test_cli_bad_key_fails_cleanly_before_anything_loads(tmp_path, image_dir):
    path = write(tmp_path / "run.yaml", {**base_config(image_dir, tmp_path), "rnak": 4})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(path)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 1
    assert "unknown key 'rnak'; did you mean 'rank' (--rank)?" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_print_config_prints_yaml_and_exits(tmp_path, image_dir):
    argv = [f"--{k}={v}" for k, v in base_config(image_dir, tmp_path).items()]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(SCRIPT), *argv, "--rank", "12", "--hub_token", HUB_TOKEN, "--print_config"]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["rank"] == 12
    assert HUB_TOKEN not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()  # nothing trained or written


def test_saved_file_leaves_resume_unset_and_reads_back(tmp_path, image_dir):
    args = parse_args(
        [*(f"--{k}={v}" for k, v in base_config(image_dir, tmp_path).items()), "--resume_from_checkpoint", "latest"]
    )
    path = save_run_config(args.effective_config, tmp_path / "saved")
    saved = yaml.safe_load(path.read_text())
    assert saved["resume_from_checkpoint"] is None
    assert path.read_text().endswith(config_text({**args.effective_config, "resume_from_checkpoint": None}))
    again = parse_args(["--config", str(path), "--resume_from_checkpoint", "latest"])
    assert comparable(again) == comparable(args)


# ---------------------------------------------------------------------------------------------- example presets

PRESET_FILES = sorted((REPO / "examples" / "configs").glob("*.yaml"))


def test_one_example_per_preset_and_gpu_size():
    names = {p.stem for p in PRESET_FILES}
    assert names == {
        f"{preset}-{size}" for preset in ("object", "style", "character", "face") for size in ("24gb", "16gb")
    }


@pytest.mark.parametrize("path", PRESET_FILES, ids=[p.stem for p in PRESET_FILES])
@pytest.mark.usefixtures("gpu_packages")
def test_example_config_is_accepted_by_the_parser(path, tmp_path, image_dir):
    args = parse_quietly(["--config", str(path), "--instance_data_dir", str(image_dir), "--output_dir", str(tmp_path)])
    assert args.pretrained_model_name_or_path == "stabilityai/stable-diffusion-xl-base-1.0"
    assert args.train_text_encoder_ti and "TOK" in args.instance_prompt and "TOK" in args.validation_prompt
    assert args.gradient_checkpointing and args.cache_latents and args.resolution == 1024
    if path.stem.endswith("16gb"):  # fits a T4: fp16 (no bf16 there), batch 1, 8-bit AdamW unless Prodigy
        assert args.mixed_precision == "fp16" and args.train_batch_size == 1
        assert args.use_8bit_adam or args.optimizer == "prodigy"
    else:
        assert args.mixed_precision == "bf16"
    # Every key is written as the parser reads it (no value the parser would turn into something else).
    written = yaml.safe_load(path.read_text())
    overridden = ("instance_data_dir", "output_dir")
    assert {k: v for k, v in written.items() if k not in overridden} == {
        k: args.effective_config[k] for k in written if k not in overridden
    }


def test_resume_names_the_flags_that_differ_from_the_checkpoint(tmp_path, image_dir):
    argv = [f"--{k}={v}" for k, v in base_config(image_dir, tmp_path).items()]
    checkpoint = tmp_path / "checkpoint-2"
    save_run_config(parse_args(argv).effective_config, checkpoint)
    same = parse_args([*argv, "--resume_from_checkpoint", "latest"]).effective_config
    assert changed_flags(checkpoint, same) == []
    other = parse_args([*argv, "--rank", "8", "--random_flip"]).effective_config
    assert changed_flags(checkpoint, other) == ["random_flip: False -> True", "rank: 4 -> 8"]  # parser order
    assert changed_flags(tmp_path / "older-checkpoint", other) == []  # no config file: nothing to compare

"""The command line: every reference flag is accepted with its meaning, booleans parse as written, and bad or
contradictory input fails with a clear message before any model (or, for flags, any data) is loaded."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from sdxl_pivotal.args import build_parser, parse_args
from sdxl_pivotal.tiny import write_demo_images

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_dreambooth_lora_sdxl_advanced.py"
# A model path that does not exist: a run that got as far as loading models would fail differently.
MISSING_MODEL = "/nonexistent/sdxl-model"
# A copy of ../shared/reference-flags.txt: the flags of diffusers' advanced script.
REFERENCE_FLAGS = REPO / "tests" / "reference-flags.txt"


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    return write_demo_images(tmp_path / "images", count=2)


@pytest.fixture
def argv(tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A valid command line (a real image folder, a fresh output folder) that each test extends."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return [
        "--pretrained_model_name_or_path",
        MISSING_MODEL,
        "--instance_prompt",
        "a photo of TOK toy",
        "--instance_data_dir",
        str(image_dir),
        "--output_dir",
        str(tmp_path / "out"),
    ]


def without(argv: list[str], flag: str) -> list[str]:
    """`argv` less `flag` and its value."""
    i = argv.index(flag)
    return argv[:i] + argv[i + 2 :]


def test_valid_command_line_parses(argv):
    args = parse_args(argv)
    assert args.instance_data_dir == argv[argv.index("--instance_data_dir") + 1]
    assert args.resolution == 1024
    assert args.prodigy_decouple is True
    assert args.center_crop is False


# ---------------------------------------------------------------------------------------------- data source


def test_missing_data_folder(argv, tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(ValueError, match="does not exist") as error:
        parse_args([*without(argv, "--instance_data_dir"), "--instance_data_dir", str(missing)])
    assert str(missing) in str(error.value)


def test_data_folder_that_is_a_file(argv, image_dir):
    a_file = image_dir / "toy_00.png"
    with pytest.raises(ValueError, match="is a file") as error:
        parse_args([*without(argv, "--instance_data_dir"), "--instance_data_dir", str(a_file)])
    assert str(a_file) in str(error.value)


def test_no_data_source(argv):
    with pytest.raises(ValueError, match="--instance_data_dir FOLDER or --dataset_name"):
        parse_args(without(argv, "--instance_data_dir"))


def test_caption_column_needs_a_dataset(argv):
    with pytest.raises(ValueError, match="--caption_column applies to --dataset_name"):
        parse_args([*argv, "--caption_column", "text"])


# ---------------------------------------------------------------------------------------------- resolution, ranges


@pytest.mark.parametrize("resolution", ["100", "1020", "0", "-64"])
def test_resolution_must_be_a_positive_multiple_of_8(argv, resolution):
    with pytest.raises(ValueError, match="--resolution must be a positive multiple of 8"):
        parse_args([*argv, "--resolution", resolution])


def test_resolution_multiple_of_8_is_accepted(argv):
    assert parse_args([*argv, "--resolution", "520"]).resolution == 520


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seed_out_of_range(argv, seed):
    # numpy's seeding (and the data order) need a 32-bit non-negative seed; found here, not after model loading.
    with pytest.raises(ValueError, match="--seed must be in"):
        parse_args([*argv, "--seed", seed])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rank", "0"], "--rank must be at least 1"),
        (["--train_batch_size", "0"], "--train_batch_size must be at least 1"),
        (["--max_train_steps", "0"], "--max_train_steps must be at least 1"),
        (["--train_text_encoder_frac", "1.5"], r"--train_text_encoder_frac must be in \(0, 1\]"),
        (["--lora_dropout", "1.0"], r"--lora_dropout must be in \[0, 1\)"),
        (["--snr_gamma", "0"], "--snr_gamma must be positive"),
        (["--lora_unet_blocks", "unet.up_blocks.0.upsamplers"], "is not a UNet block"),
    ],
)
def test_out_of_range_values(argv, flags, message):
    with pytest.raises(ValueError, match=message):
        parse_args([*argv, *flags])


# ---------------------------------------------------------------------------------------------- contradictions


def test_blora_with_explicit_blocks(argv):
    with pytest.raises(ValueError, match=r"--use_blora .* --lora_unet_blocks"):
        parse_args([*argv, "--use_blora", "--lora_unet_blocks", "unet.up_blocks.0.attentions.0"])


def test_dataset_name_with_instance_data_dir(argv, image_dir):
    with pytest.raises(ValueError, match="either --dataset_name or --instance_data_dir, not both"):
        parse_args([*argv, "--dataset_name", str(image_dir)])


def test_text_encoder_lora_with_pivotal_tuning(argv):
    # Contradictory whatever the implementation status of pivotal tuning: reported as the contradiction.
    with pytest.raises(ValueError, match=r"either --train_text_encoder .* or --train_text_encoder_ti .*not both"):
        parse_args([*argv, "--train_text_encoder", "--train_text_encoder_ti"])


# ---------------------------------------------------------------------------------------------- output folder


def test_output_dir_that_is_a_file(argv, tmp_path):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    with pytest.raises(ValueError, match=r"--output_dir .* is a file"):
        parse_args([*without(argv, "--output_dir"), "--output_dir", str(a_file)])


def test_output_dir_inside_a_file(argv, tmp_path):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    with pytest.raises(ValueError, match="cannot be created") as error:
        parse_args([*without(argv, "--output_dir"), "--output_dir", str(a_file / "run")])
    assert str(a_file) in str(error.value)


def _earlier_run(out: Path, marker: str) -> None:
    out.mkdir()
    if marker == "checkpoint":
        (out / "checkpoint-20").mkdir()
        (out / "checkpoint-20" / "training_state.json").write_text("{}")
    else:
        (out / "pytorch_lora_weights.safetensors").write_bytes(b"weights")


@pytest.mark.parametrize("marker", ["checkpoint", "weights"])
def test_output_dir_of_an_earlier_run_is_refused(argv, tmp_path, marker):
    _earlier_run(tmp_path / "out", marker)
    with pytest.raises(ValueError, match="holds an earlier run") as error:
        parse_args(argv)
    message = str(error.value)
    assert "--resume_from_checkpoint" in message and "--overwrite_output_dir" in message
    assert ("checkpoint-20" if marker == "checkpoint" else "pytorch_lora_weights.safetensors") in message


@pytest.mark.parametrize(
    "flags",
    [
        ["--overwrite_output_dir"],
        ["--resume_from_checkpoint", "latest"],
        ["--resume_from_checkpoint", "checkpoint-20"],
    ],
)
def test_output_dir_of_an_earlier_run_with_resume_or_overwrite(argv, tmp_path, flags):
    _earlier_run(tmp_path / "out", "checkpoint")
    args = parse_args([*argv, *flags])
    assert args.overwrite_output_dir or args.resume_from_checkpoint == flags[1]


def test_output_dir_with_unrelated_files_is_accepted(argv, tmp_path):
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    assert parse_args(argv).output_dir == str(out)


def test_resume_from_a_missing_checkpoint(argv):
    with pytest.raises(ValueError, match="checkpoint-7: no such checkpoint folder"):
        parse_args([*argv, "--resume_from_checkpoint", "checkpoint-7"])


def test_edm_style_training_and_snr_gamma_exclude_each_other(argv):
    with pytest.raises(ValueError, match="Drop one of --snr_gamma and --do_edm_style_training"):
        parse_args([*argv, "--do_edm_style_training", "--snr_gamma", "5"])


@pytest.mark.parametrize(
    "flag", ["--with_prior_preservation", "--do_edm_style_training", "--cache_latents", "--push_to_hub"]
)
def test_boolean_features_turned_off_are_accepted(argv, flag):
    assert getattr(parse_args([*argv, flag, "False"]), flag[2:]) is False


# ---------------------------------------------------------------------------------------------- booleans


@pytest.mark.parametrize(
    ("flags", "dest", "expected"),
    [
        (["--prodigy_decouple", "False"], "prodigy_decouple", False),  # type=bool in the reference: True
        (["--prodigy_decouple=false"], "prodigy_decouple", False),
        (["--prodigy_decouple", "0"], "prodigy_decouple", False),
        (["--prodigy_decouple=True"], "prodigy_decouple", True),
        (["--prodigy_use_bias_correction", "no"], "prodigy_use_bias_correction", False),
        (["--prodigy_safeguard_warmup", "OFF"], "prodigy_safeguard_warmup", False),
        (["--center_crop"], "center_crop", True),
        (["--center_crop=True"], "center_crop", True),
        (["--center_crop", "1"], "center_crop", True),
        (["--random_flip", "yes"], "random_flip", True),
        (["--center_crop", "False"], "center_crop", False),
    ],
)
def test_boolean_values(argv, flags, dest, expected):
    assert getattr(parse_args([*argv, *flags]), dest) is expected


def test_bare_boolean_followed_by_another_flag(argv):
    args = parse_args([*argv, "--center_crop", "--random_flip", "0", "--gradient_checkpointing"])
    assert (args.center_crop, args.random_flip, args.gradient_checkpointing) == (True, False, True)


@pytest.mark.parametrize("value", ["maybe", "2", "Flase"])
def test_bad_boolean_is_an_argparse_error(argv, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*argv, "--prodigy_decouple", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--prodigy_decouple" in err and "expected a boolean" in err and value in err


# ---------------------------------------------------------------------------------------------- reference flags


def reference_flags() -> list[tuple[str, str]]:
    """`(flag, default there)` for every flag line of the reference list."""
    rows = []
    for line in REFERENCE_FLAGS.read_text().splitlines():
        if line.startswith("--"):
            flag, default = (field.strip() for field in line.split("|")[:2])
            rows.append((flag, default))
    return rows


# Values that the generic rule below would get wrong (must be valid together with the base command line).
SPECIAL_VALUES = {
    "--resolution": "64",
    "--lora_unet_blocks": "unet.up_blocks.0.attentions.0, unet.mid_block.attentions.0",
    "--resume_from_checkpoint": "latest",
    "--optimizer": "Prodigy",  # case-insensitive, as in the reference: parses to "prodigy"
    "--token_abstraction": "TOK,SKS",
    "--local_rank": "0",
}
DATASET_FLAGS = {"--dataset_name", "--dataset_config_name", "--image_column", "--caption_column"}


def _value_for(action, flag: str, default: str, tmp_path: Path, image_dir: Path) -> tuple[str, object]:
    """A valid command-line value for `flag` (different from its default) and the parsed value it must give."""
    if flag in SPECIAL_VALUES:
        text = SPECIAL_VALUES[flag]
    elif flag == "--instance_data_dir":
        text = str(image_dir)
    elif flag in ("--output_dir", "--cache_dir", "--class_data_dir", "--dataset_name"):
        text = str(tmp_path / flag[2:])
    elif action.choices:
        text = next(choice for choice in action.choices if choice != default)
    elif action.nargs == "?":  # boolean: the value opposite to the reference default
        text = "False" if default == "True" else "True"
        return text, text == "True"
    elif action.type is int:
        text = "3"
    elif action.type is float:
        text = "0.25"
    else:
        text = "x-" + flag[2:]
    return text, action.type(text) if action.type else text


def test_reference_list_is_complete():
    flags = [flag for flag, _ in reference_flags()]
    assert len(flags) > 80 and len(set(flags)) == len(flags)


@pytest.mark.parametrize(("flag", "default"), reference_flags(), ids=[flag for flag, _ in reference_flags()])
def test_reference_flag_is_accepted(argv, tmp_path, image_dir, flag, default):
    parser = build_parser()
    # Exact option, not an abbreviation argparse would silently accept for a longer one.
    assert flag in parser._option_string_actions, f"{flag} is not a flag of ours"
    action = parser._option_string_actions[flag]
    text, expected = _value_for(action, flag, default, tmp_path, image_dir)
    base = argv
    if flag in DATASET_FLAGS:
        base = [*without(argv, "--instance_data_dir"), "--dataset_name", str(image_dir)]
    if flag == "--with_prior_preservation":
        base = [*base, "--class_prompt", "a photo of a toy", "--class_data_dir", str(tmp_path / "class")]
    command = [*base, flag, text]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. --class_prompt without prior preservation: accepted, with a warning
        args = parse_args(command)
    parsed = getattr(args, action.dest)
    assert parsed == expected and type(parsed) is type(expected)


@pytest.mark.parametrize(("flag", "default"), reference_flags(), ids=[flag for flag, _ in reference_flags()])
def test_reference_flag_default(flag, default):
    """Same default as the reference, so a command line that omits the flag means the same."""
    action = build_parser()._option_string_actions[flag]
    if default == "required":
        assert action.required
    elif default == "None":
        assert action.default is None
    elif default in ("True", "False"):
        assert action.default is (default == "True")
    elif isinstance(action.default, (int, float)):
        assert action.default == float(default)
    else:
        assert action.default.lower() == default.lower()


# ---------------------------------------------------------------------------------------------- the real CLI


def run_cli(*flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_RANK", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=120, cwd=REPO, env=env
    )


def assert_clean_failure(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # Reaching model loading would have failed on the missing model path instead.
    assert MISSING_MODEL not in result.stderr


def test_cli_missing_data_folder(argv, tmp_path):
    missing = tmp_path / "no-such-folder"
    result = run_cli(*without(argv, "--instance_data_dir"), "--instance_data_dir", str(missing))
    assert_clean_failure(result, f"--instance_data_dir {missing} does not exist")
    assert not (tmp_path / "out").exists()


def test_cli_contradictory_flags(argv, tmp_path):
    result = run_cli(*argv, "--do_edm_style_training", "--snr_gamma", "5")
    assert_clean_failure(result, "Drop one of --snr_gamma and --do_edm_style_training")
    assert not (tmp_path / "out").exists()


def test_cli_corrupt_image(argv, image_dir):
    (image_dir / "broken.jpg").write_bytes(b"not a jpeg")
    result = run_cli(*argv, "--seed", "0")
    assert_clean_failure(result, f"Cannot read image {image_dir / 'broken.jpg'}")

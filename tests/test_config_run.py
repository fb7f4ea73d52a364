"""Every run writes its effective configuration to the output folder and each checkpoint, the model card links
it, and `--config output/training_config.yaml --resume_from_checkpoint latest` continues the run exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from run_helpers import assert_same_tensors, lora_file, train_until_first_checkpoint
from safetensors.torch import load_file

from sdxl_pivotal import train as train_module
from sdxl_pivotal.args import parse_args
from sdxl_pivotal.checkpoints import PARAMS_FILE, complete_checkpoints
from sdxl_pivotal.config import CONFIG_FILE
from sdxl_pivotal.errors import InputError


def train_from(argv: list[str]) -> Path:
    """Parse a command line as the script does and train in-process."""
    from accelerate.state import AcceleratorState, GradientState

    try:
        return train_module.train(parse_args(argv))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


# Randomness on everywhere (order, flips, dropout, offset noise, a decaying schedule, pivotal tuning), a
# learning rate scaled by the batch (train() multiplies it: the file must hold the flag, not the product).
FLAGS = [
    *("--max_train_steps", "4", "--checkpointing_steps", "2", "--lr_scheduler", "cosine"),
    *("--learning_rate", "5e-4", "--scale_lr", "--random_flip", "--lora_dropout", "0.1", "--noise_offset", "0.1"),
    *("--train_text_encoder_ti", "--text_encoder_lr", "1e-3", "--hub_token", "hf_neverwritten"),
]


def test_resume_with_the_written_config_is_exact(run_training, tmp_path, monkeypatch, caplog):
    uninterrupted = run_training(tmp_path / "full", *FLAGS)

    train_until_first_checkpoint(run_training, monkeypatch, tmp_path / "resumed", *FLAGS)
    resumed = tmp_path / "resumed"
    assert [p.name for p in complete_checkpoints(resumed)] == ["checkpoint-2"]
    config = resumed / CONFIG_FILE
    assert config.is_file(), "written when training starts, not only at the end"
    assert "hf_neverwritten" not in config.read_text()
    assert yaml.safe_load(config.read_text())["learning_rate"] == 5e-4

    train_from(["--config", str(config), "--resume_from_checkpoint", "latest"])
    assert "differ from its own" not in caplog.text  # the same flags as the checkpoint's
    assert_same_tensors(lora_file(resumed), lora_file(uninterrupted))
    emb = "resumed_emb.safetensors"
    assert_same_tensors(load_file(resumed / emb), load_file(uninterrupted / "full_emb.safetensors"))
    assert_same_tensors(
        load_file(resumed / "checkpoint-4" / PARAMS_FILE), load_file(uninterrupted / "checkpoint-4" / PARAMS_FILE)
    )


def test_outputs_and_checkpoints_hold_the_config_and_the_card_links_it(run_training, tmp_path):
    out = run_training(tmp_path / "run", "--max_train_steps", "2", "--checkpointing_steps", "1", "--rank", "3")
    written = (out / CONFIG_FILE).read_text()
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        assert (out / checkpoint / CONFIG_FILE).read_text() == written
    saved = yaml.safe_load(written)
    assert saved["rank"] == 3 and saved["output_dir"] == str(out) and saved["max_train_steps"] == 2
    assert f"[`{CONFIG_FILE}`]({CONFIG_FILE})" in (out / "README.md").read_text()

    # Run again from the file: into its own output folder only with --overwrite_output_dir, as on the command line.
    with pytest.raises(InputError, match="holds an earlier run"):
        parse_args(["--config", str(out / CONFIG_FILE)])
    args = parse_args(["--config", str(out / CONFIG_FILE), "--overwrite_output_dir"])
    assert args.rank == 3 and args.overwrite_output_dir

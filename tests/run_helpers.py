"""Helpers shared by the tests that train and compare runs: a stand-in for a crash, and file comparisons."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


class Interrupted(Exception):
    """Stands for a crash or a killed job."""


def lora_file(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "pytorch_lora_weights.safetensors")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def train_until_first_checkpoint(run_training, monkeypatch, output_dir: Path, *flags: str) -> None:
    """Run `run_training` (the conftest fixture) and stop it, as a killed job, right after its first checkpoint."""
    import sdxl_pivotal.train as train_module

    real_save = train_module.save_checkpoint

    def save_then_crash(*args, **kwargs):
        raise Interrupted(real_save(*args, **kwargs))

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    with pytest.raises(Interrupted):
        run_training(output_dir, *flags)
    monkeypatch.undo()

"""Shared fixtures: one tiny SDXL pipeline and one demo image set per test session."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from sdxl_pivotal.tiny import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory) -> Path:
    from sdxl_pivotal.tiny import write_demo_images

    return write_demo_images(tmp_path_factory.mktemp("demo-images"))


@pytest.fixture
def run_training(tiny_model, demo_images):
    """Train in-process on the tiny model: `run_training(output_dir, "--flag", "value", ...)`; the images are
    the demo folder unless `data=(flags...)` names another source."""
    from accelerate.state import AcceleratorState, GradientState

    from sdxl_pivotal.args import parse_args
    from sdxl_pivotal.train import train

    def run(output_dir: Path, *extra: str, data: tuple[str, ...] = ("--instance_data_dir", str(demo_images))) -> Path:
        argv = [
            "--pretrained_model_name_or_path",
            str(tiny_model),
            *data,
            "--instance_prompt",
            "a photo of TOK toy",
            "--output_dir",
            str(output_dir),
            "--resolution",
            "64",
            "--train_batch_size",
            "2",
            "--lr_warmup_steps",
            "0",
            "--report_to",
            "none",
            "--seed",
            "0",
            *extra,
        ]
        try:
            return train(parse_args(argv))
        finally:
            # accelerate keeps process-wide singletons; reset them so runs are independent.
            AcceleratorState._reset_state(True)
            GradientState._reset_state()

    return run


@pytest.fixture
def read_only_folder(tmp_path) -> Path:
    """A folder nobody may write in: its permissions for a user; for root (who ignores permissions) the
    immutable attribute."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
    yield folder
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


@pytest.fixture
def gpu_packages(monkeypatch):
    """bitsandbytes and xformers seem installed, as on the GPU machines these flags are for: the parser checks
    that optional packages exist (this CPU machine has no CUDA build of them)."""
    find_spec = importlib.util.find_spec
    present = ("bitsandbytes", "xformers")
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name in present else find_spec(name, *a)
    )

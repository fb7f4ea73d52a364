"""Two processes (DDP over gloo on the CPU, launched with torchrun): training, accumulation, pivotal tuning,
validation and an exact resume all work as on one GPU per process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def launch(launcher: list[str], output_dir: Path, model: Path, images: Path, *extra: str, cpu: bool = True):
    """Run the training script with two processes under `launcher`; ACCELERATE_USE_CPU=1 unless not `cpu`."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(REPO)}
    env.pop("ACCELERATE_USE_CPU", None)
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    command = [
        *launcher,
        str(REPO / "train_dreambooth_lora_sdxl_advanced.py"),
        *("--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images)),
        *("--instance_prompt", "a photo of TOK toy", "--output_dir", str(output_dir), "--resolution", "64"),
        *("--train_batch_size", "1", "--gradient_accumulation_steps", "2", "--max_train_steps", "4"),
        *("--checkpointing_steps", "2", "--seed", "0", "--report_to", "none", "--lr_warmup_steps", "0"),
        *("--train_text_encoder_ti", "--text_encoder_lr", "1e-2"),
        *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]


def torchrun(output_dir: Path, model: Path, images: Path, *extra: str) -> subprocess.CompletedProcess:
    result = launch(TORCHRUN, output_dir, model, images, *extra)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def torchrun_and_resume(tmp_path: Path, model: Path, images: Path, *flags: str) -> tuple[Path, Path]:
    """A 2-process run in `full/`, and one resumed from its checkpoint-2 in `resumed/`: the two output folders."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert "x 2 processes" in torchrun(full, model, images, *flags).stderr
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    torchrun(resumed, model, images, *flags, "--resume_from_checkpoint", "latest")
    return full, resumed


@pytest.mark.slow
def test_two_processes_train_and_resume_exactly(tiny_model, demo_images, tmp_path):
    full = tmp_path / "full"
    result = torchrun(
        full,
        tiny_model,
        demo_images,
        "--lora_dropout",
        "0.1",
        "--validation_prompt",
        "TOK",
        "--validation_steps",
        "2",
        "--num_validation_images",
        "1",
        "--validation_inference_steps",
        "1",
    )
    assert "x 2 processes" in result.stderr
    assert sorted(p.name for p in (full / "validation").iterdir()) == ["final", "step-2", "step-4"]

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    torchrun(resumed, tiny_model, demo_images, "--lora_dropout", "0.1", "--resume_from_checkpoint", "latest")
    for a, b in [("pytorch_lora_weights.safetensors",) * 2, ("full_emb.safetensors", "resumed_emb.safetensors")]:
        left, right = load_file(full / a), load_file(resumed / b)
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left), a


@pytest.mark.slow
def test_two_processes_train_and_resume_loha_with_block_learning_rates(tiny_model, demo_images, tmp_path):
    """LoHa with Tucker convolutions, module dropout and per-block learning-rate groups under DDP."""
    flags = ("--adapter", "loha", "--conv_rank", "2", "--use_effective_conv2d", "--module_dropout", "0.1")
    flags += ("--unet_block_lr", "mid=0.5,up=2")
    full, resumed = torchrun_and_resume(tmp_path, tiny_model, demo_images, *flags)
    for name in ("pytorch_lora_weights.safetensors", "{}.safetensors"):  # diffusers file, kohya file
        left, right = load_file(full / name.format("full")), load_file(resumed / name.format("resumed"))
        # the kohya file bundles the embeddings under the run's name
        right = {key.replace(".resumed.", ".full."): value for key, value in right.items()}
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left), name
    assert any(key.endswith(".hada_t1") for key in left), "Tucker form of the convolutions"


@pytest.mark.slow
def test_two_processes_train_and_resume_dylora(tiny_model, demo_images, tmp_path):
    """DyLoRA's per-step truncation under DDP (every process draws the step's rank from the seed and the step),
    convolutions included: it trains, and resumes exactly."""
    flags = ("--adapter", "dylora", "--rank", "8", "--dylora_unit", "2", "--conv_rank", "4")
    full, resumed = torchrun_and_resume(tmp_path, tiny_model, demo_images, *flags)
    left, right = (
        load_file(full / "pytorch_lora_weights.safetensors"),
        load_file(resumed / "pytorch_lora_weights.safetensors"),
    )
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.slow
def test_processes_that_did_not_form_a_group_are_refused(tiny_model, demo_images, tmp_path):
    """Without GPUs and without ACCELERATE_USE_CPU=1, each process would train alone into the same folder."""
    result = launch(TORCHRUN, tmp_path / "run", tiny_model, demo_images, cpu=False)
    assert result.returncode != 0
    assert result.stderr.count("error: 2 processes were launched (WORLD_SIZE=2)") == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr.split("error: 2 processes")[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_readme_cpu_command_trains_with_two_processes(tiny_model, demo_images, tmp_path):
    """README's `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...`."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    accelerate += [
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29518",
    ]
    result = launch(accelerate, tmp_path / "run", tiny_model, demo_images, "--max_train_steps", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "x 2 processes" in result.stderr
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()

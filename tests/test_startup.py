"""What a run checks before anything loads: how it was launched, the model's source (a complete folder, or a
Hub repo that exists or is cached), the scheduler's target, and that its folders are writable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from sdxl_pivotal.errors import InputError
from sdxl_pivotal.launch import check_process_group
from sdxl_pivotal.models import check_model_source
from tests.test_training import base_args


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to load a model part fails the test: the checks must come first."""
    import diffusers
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model part was loaded before the checks")

    for owner in (transformers.AutoTokenizer, transformers.CLIPTextModel, diffusers.UNet2DConditionModel):
        monkeypatch.setattr(owner, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "from_pretrained", refuse)


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


@pytest.mark.parametrize(
    ("variable", "name"), [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")]
)
def test_fsdp_and_deepspeed_are_refused(run_training, tmp_path, monkeypatch, no_model_loads, variable, name):
    monkeypatch.setenv(variable, "true")  # what `accelerate launch` sets from an FSDP/DeepSpeed config
    with pytest.raises(InputError, match=f"{name} is not supported .*tested with DDP only"):
        run_training(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_processes_that_each_think_they_are_alone_are_refused(run_training, tmp_path, monkeypatch, no_model_loads):
    """`accelerate launch --multi_gpu --num_processes 2` without GPUs: two processes, two one-process runs."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match=r"2 processes were launched .*ACCELERATE_USE_CPU=1 accelerate launch"):
        run_training(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_process_group_passes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_process_group(SimpleNamespace(num_processes=2))
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_process_group(SimpleNamespace(num_processes=1))


def test_a_model_folder_without_its_unet_fails_before_anything_loads(
    run_training, model_copy, tmp_path, no_model_loads
):
    shutil.rmtree(model_copy / "unet")
    with pytest.raises(InputError, match=r"model is incomplete: unet/config.json is missing.*copy the whole"):
        run_training(tmp_path / "run", "--pretrained_model_name_or_path", str(model_copy))


def test_a_replacement_vae_makes_the_pipeline_vae_unneeded(model_copy, demo_images, tiny_model, tmp_path):
    shutil.rmtree(model_copy / "vae")
    with pytest.raises(InputError, match=r"vae/config\.json is missing"):
        check_model_source(base_args(model_copy, demo_images, tmp_path / "out"))
    vae = str(tiny_model / "vae")
    check_model_source(
        base_args(model_copy, demo_images, tmp_path / "out", "--pretrained_vae_model_name_or_path", vae)
    )


@pytest.mark.parametrize(
    ("change", "flags", "message"),
    [
        ("model_index", (), "has no model_index.json: it is not a diffusers pipeline folder"),
        ("bin_weights", (), r"unet has no safetensors weights \(only safetensors are loaded"),
        ("nothing", ("--variant", "fp16"), "text_encoder has no --variant fp16 safetensors weights"),
        ("sample", (), r"scheduler predicts 'sample'; training supports epsilon and v_prediction"),
    ],
)
def test_a_model_folder_we_cannot_train_is_named(
    model_copy, demo_images, tmp_path, no_model_loads, change, flags, message
):
    if change == "model_index":
        (model_copy / "model_index.json").unlink()
    elif change == "bin_weights":
        (model_copy / "unet" / "diffusion_pytorch_model.safetensors").rename(model_copy / "unet" / "model.bin")
    elif change == "sample":
        config_path = model_copy / "scheduler" / "scheduler_config.json"
        config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"prediction_type": "sample"}))
    with pytest.raises(InputError, match=message):
        check_model_source(base_args(model_copy, demo_images, tmp_path / "out", *flags))


def test_a_sample_predicting_scheduler_trains_with_an_explicit_target(model_copy, demo_images, tmp_path):
    config_path = model_copy / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"prediction_type": "sample"}))
    check_model_source(base_args(model_copy, demo_images, tmp_path / "out", "--prediction_type", "epsilon"))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no/such/model", "--pretrained_model_name_or_path no/such/model: no such folder"),
        ("someone/not-in-the-cache", "the Hub cache does not hold it while offline"),
    ],
)
def test_a_model_that_is_neither_a_folder_nor_available_offline(demo_images, tmp_path, no_model_loads, name, message):
    """The tests run with HF_HUB_OFFLINE=1 (conftest)."""
    with pytest.raises(InputError, match=message):
        check_model_source(base_args(Path(name), demo_images, tmp_path / "out"))


def hub_error(kind: str) -> Exception:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    response = SimpleNamespace(headers={}, request=None)
    if kind == "missing":
        return RepositoryNotFoundError("404 Client Error", response=response)
    if kind == "gated":
        return GatedRepoError("403 Client Error", response=response)
    return ConnectionRefusedError("[Errno 111] Connection refused")  # as the HTTP library reports it


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", r"someone/sdxl-typo: no such model on the Hub \(a typo\?"),
        ("gated", "is gated: accept its terms on https://huggingface.co/someone/sdxl-typo"),
        ("offline", "the Hub cannot be reached .*Connection refused.*set HF_HUB_OFFLINE=1"),
    ],
)
def test_a_hub_id_that_does_not_exist_or_cannot_be_reached(
    demo_images, tmp_path, monkeypatch, no_model_loads, kind, message
):
    import huggingface_hub

    asked = []

    def file_exists(repo_id, filename, revision=None):
        asked.append((repo_id, filename, revision))
        raise hub_error(kind)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "file_exists", file_exists)
    with pytest.raises(InputError, match=message):
        check_model_source(base_args(Path("someone/sdxl-typo"), demo_images, tmp_path / "out"))
    assert asked == [("someone/sdxl-typo", "model_index.json", None)]


def test_a_read_only_output_folder_fails_before_anything_loads(run_training, read_only_folder, no_model_loads):
    with pytest.raises(InputError, match=f"--output_dir {read_only_folder / 'run'} is not writable"):
        run_training(read_only_folder / "run")


def test_a_read_only_class_folder_that_needs_images_fails_before_anything_loads(
    run_training, read_only_folder, tmp_path, no_model_loads
):
    prior = ("--with_prior_preservation", "--class_prompt", "a toy", "--class_data_dir", str(read_only_folder))
    with pytest.raises(InputError, match=f"--class_data_dir {read_only_folder} is not writable"):
        run_training(tmp_path / "run", *prior, "--num_class_images", "1", "--max_train_steps", "1")

"""The Colab notebook: it runs top to bottom on the CPU path (the tiny SDXL), and its Colab path builds the same
training command and config as the CPU path except for the model and hardware settings."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import yaml

from sdxl_pivotal import notebook
from sdxl_pivotal.args import parse_args

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "sdxl_pivotal_dreambooth.ipynb"
FORM = {
    "instance_data_dir": "IMAGES",  # replaced by a real folder in the tests
    "instance_prompt": "a photo of TOK toy",
    "validation_prompt": "a photo of TOK toy on a beach",
    "max_train_steps": 1000,
    "rank": None,
    "learning_rate": None,
}


def notebook_source() -> str:
    return "\n".join(cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code")


@pytest.mark.parametrize("preset", notebook.PRESETS)
@pytest.mark.usefixtures("gpu_packages")  # the Colab path uses 8-bit Adam
def test_colab_path_differs_from_the_cpu_path_only_in_model_and_hardware(preset, tmp_path, demo_images, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    form = {**FORM, "instance_data_dir": str(demo_images)}
    colab = notebook.run_config(preset, form, notebook.gpu_settings(bf16=False), tmp_path / "work", 15)
    cpu = notebook.run_config(preset, form, notebook.cpu_settings(tmp_path / "tiny"), tmp_path / "work")
    differing = {key for key in colab.keys() | cpu.keys() if colab.get(key) != cpu.get(key)}
    assert differing <= set(notebook.HARDWARE_KEYS)
    assert {"pretrained_model_name_or_path", "mixed_precision", "resolution"} <= differing
    assert colab["pretrained_model_name_or_path"] == "stabilityai/stable-diffusion-xl-base-1.0"

    colab_file = notebook.write_run_config(colab, tmp_path / "colab" / "run.yaml")
    cpu_file = notebook.write_run_config(cpu, tmp_path / "cpu" / "run.yaml")
    colab_command, cpu_command = notebook.training_command(colab_file), notebook.training_command(cpu_file)
    at = colab_command.index("--config") + 1
    assert (colab_command[at], cpu_command[at]) == (str(colab_file), str(cpu_file))
    assert colab_command[:at] + colab_command[at + 1 :] == cpu_command[:at] + cpu_command[at + 1 :]
    # Both files are accepted by the real parser, and mean the same run but for the hardware keys.
    parsed = [parse_args(command[2:]).effective_config for command in (colab_command, cpu_command)]
    assert {key for key in parsed[0] if parsed[0][key] != parsed[1][key]} <= set(notebook.HARDWARE_KEYS)

    # A T4 (15 GB, no bf16): fp16 and every memory saver.
    assert colab["mixed_precision"] == "fp16" and colab["gradient_checkpointing"] and colab["cache_latents"]
    assert colab.get("use_8bit_adam") or colab["optimizer"] == "prodigy"  # Prodigy has no 8-bit form
    assert notebook.preset_file(preset, 15).name == f"{preset}-16gb.yaml"
    assert notebook.preset_file(preset, 40).name == f"{preset}-24gb.yaml"


def test_the_form_overrides_the_preset_and_empty_fields_keep_it(tmp_path):
    form = {**FORM, "rank": 7, "learning_rate": None, "validation_prompt": ""}
    config = notebook.run_config("style", form, notebook.gpu_settings(bf16=True), tmp_path, 40)
    preset = yaml.safe_load(notebook.preset_file("style", 40).read_text())
    assert config["rank"] == 7 and config["learning_rate"] == preset["learning_rate"]
    assert config["validation_prompt"] == preset["validation_prompt"] and config["mixed_precision"] == "bf16"
    hub = notebook.run_config("object", {**FORM, "dataset_name": "user/photos"}, {}, tmp_path)
    assert "instance_data_dir" not in hub and hub["dataset_name"] == "user/photos"
    with pytest.raises(ValueError, match="Not hardware settings: rank"):
        notebook.run_config("object", FORM, {"rank": 4}, tmp_path)


def test_notebook_trains_through_the_package_command_only():
    source = notebook_source()
    assert source.count("notebook.training_command(CONFIG_FILE)") == 2  # train, resume
    assert "train_dreambooth_lora_sdxl_advanced" not in source  # no command line of its own
    assert 'find_spec("google.colab")' in source  # the one switch
    assert "load_for_diffusers" in source


@pytest.mark.slow
def test_notebook_runs_on_the_cpu_path(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    executed = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        executed, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    work = tmp_path / "sdxl-pivotal-work"
    output = work / "object-lora"
    for name in ("pytorch_lora_weights.safetensors", "object-lora.safetensors", "training_config.yaml", "README.md"):
        assert (output / name).is_file(), name
    assert (output / "checkpoint-20").is_dir() and (work / "sample.png").is_file()
    assert yaml.safe_load((output / "training_config.yaml").read_text())["max_train_steps"] == 20
    outputs = [o for cell in executed.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # validation image(s) and the sample
    text = "".join(o.get("text", "") for o in outputs)
    assert "Not Colab: the embedded tiny SDXL on the CPU" in text and "push to the Hub skipped" in text

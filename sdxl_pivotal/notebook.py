"""What the Colab notebook (notebooks/sdxl_pivotal_dreambooth.ipynb) does, in one place both of its paths share.

The notebook's form (preset, prompts, steps) becomes a config file: the preset's file from examples/configs,
then the form's values, then the hardware's. In Colab the hardware is a GPU and the model SDXL base; outside
Colab it is the CPU and the embedded tiny SDXL. Only the keys in `HARDWARE_KEYS` differ between the two, and
both train with the same command: the real script with `--config` (and `--resume_from_checkpoint latest`, so
running the notebook again after a disconnect continues from the last checkpoint).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .config import config_text, read_config_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_dreambooth_lora_sdxl_advanced.py"
PRESET_DIR = REPO / "examples" / "configs"
PRESETS = ("object", "style", "character", "face")
# Below this much GPU memory the 12-16 GB presets are used (a Colab T4 has 15 GB).
LARGE_GPU_GB = 20
# Everything the two paths may set differently: the model, and what the hardware affords (precision, memory
# savers, image size, batch, how many steps and validation images a CPU can do in a minute).
HARDWARE_KEYS = (
    "pretrained_model_name_or_path",
    "pretrained_vae_model_name_or_path",
    "mixed_precision",
    "gradient_checkpointing",
    "use_8bit_adam",
    "cache_latents",
    "resolution",
    "train_batch_size",
    "gradient_accumulation_steps",
    "max_train_steps",
    "checkpointing_steps",
    "validation_steps",
    "num_validation_images",
    "validation_inference_steps",
    "num_class_images",
    "sample_batch_size",
    "report_to",
)


def preset_file(preset: str, gpu_memory_gb: float) -> Path:
    """examples/configs/<preset>-24gb.yaml or -16gb.yaml, whichever fits the GPU."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    size = "24gb" if gpu_memory_gb >= LARGE_GPU_GB else "16gb"
    return PRESET_DIR / f"{preset}-{size}.yaml"


def gpu_settings(bf16: bool) -> dict:
    """A GPU: bf16 where it has it (A100, L4), else fp16 (T4). The presets hold the memory savers."""
    return {"mixed_precision": "bf16" if bf16 else "fp16"}


def detect_gpu() -> tuple[bool, float]:
    """(bf16 supported, memory in GB) of GPU 0."""
    import torch

    properties = torch.cuda.get_device_properties(0)
    # Native bf16 only: a T4 emulates it (slowly), and torch counts emulation as support by default.
    return torch.cuda.is_bf16_supported(including_emulation=False), properties.total_memory / 1024**3


def cpu_settings(tiny_model: Path) -> dict:
    """The CPU: the embedded tiny SDXL at 128 px, full precision, a one-minute run."""
    return {
        "pretrained_model_name_or_path": str(tiny_model),
        "pretrained_vae_model_name_or_path": None,
        "mixed_precision": "no",
        "gradient_checkpointing": False,
        "use_8bit_adam": False,  # bitsandbytes needs CUDA
        "cache_latents": True,
        "resolution": 128,
        "train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_train_steps": 20,
        "checkpointing_steps": 10,
        "validation_steps": 10,
        "num_validation_images": 1,
        "validation_inference_steps": 4,
        "num_class_images": 2,
        "sample_batch_size": 2,
        "report_to": "none",
    }


def run_config(preset: str, form: dict, hardware: dict, work_dir: Path, gpu_memory_gb: float = 16) -> dict:
    """The run's flags: the preset's file, then the form's values (empty ones keep the preset's), then the
    hardware's. Outputs and class images go to `work_dir` (Drive, when mounted)."""
    unknown = set(hardware) - set(HARDWARE_KEYS)
    if unknown:
        raise ValueError(f"Not hardware settings: {', '.join(sorted(unknown))}.")
    values = read_config_file(preset_file(preset, gpu_memory_gb))
    values.update({key: value for key, value in form.items() if value not in ("", None)})
    if "dataset_name" in form:
        values.pop("instance_data_dir", None)  # a Hub dataset instead of a folder
    values["output_dir"] = str(work_dir / f"{preset}-lora")
    if values.get("with_prior_preservation"):
        values["class_data_dir"] = str(work_dir / "class-images")
    values.update(hardware)
    return values


def write_run_config(config: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_text(config, "# Written by the sdxl-pivotal notebook; train: --config this file\n"))
    return path


def training_command(config_file: Path) -> list[str]:
    """The real training script on the config; resuming from the last checkpoint when there is one."""
    return [sys.executable, str(SCRIPT), "--config", str(config_file), "--resume_from_checkpoint", "latest"]


def run(command: list[str]) -> None:
    """Run a command, showing its output (progress bars included) as it comes; raise if it fails."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    while chunk := process.stdout.read1(4096):
        sys.stdout.write(chunk.decode("utf-8", errors="replace"))
        sys.stdout.flush()
    if process.wait() != 0:
        raise RuntimeError(f"{Path(command[1]).name} failed (exit status {process.returncode}); see its output above.")


def validation_images(output_dir: Path) -> list[Path]:
    """The validation images of a run, latest first: the final ones, then those of the last step."""
    folder = output_dir / "validation"
    if not folder.is_dir():
        return []
    steps = sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for chosen in [folder / "final", *reversed(steps)]:
        images = sorted(chosen.glob("*.png"))
        if images:
            return images
    return []


def push_to_hub(output_dir: Path, repo_id: str, token: str) -> str:
    """Upload a finished run (weights, embeddings, card, images; no checkpoints or logs); return its URL."""
    from huggingface_hub import HfApi

    from .card import HUB_IGNORE_PATTERNS

    api = HfApi(token=token)
    repo = api.create_repo(repo_id=repo_id, exist_ok=True, repo_type="model").repo_id
    api.upload_folder(repo_id=repo, folder_path=str(output_dir), ignore_patterns=HUB_IGNORE_PATTERNS)
    return f"https://huggingface.co/{repo}"

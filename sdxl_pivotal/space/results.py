"""After training: the download zip, "try it" generation through the project's one loader
(`sdxl_pivotal.formats.load_for_diffusers`), and the push to the Hub with a token that is never stored."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from ..card import HUB_IGNORE_PATTERNS, hub_api
from ..export import LORA_WEIGHTS_NAME, embeddings_file_name, output_name
from ..monitor import CONTROL_DIR, METRICS_FILE
from ..tokens import PivotalTokens
from ..validation import prompt_inputs


def result_files(output_dir: Path) -> list[Path]:
    """What a user takes away: the diffusers LoRA, the kohya file, the `_emb` file and the model card."""
    names = [
        LORA_WEIGHTS_NAME,
        f"{output_name(output_dir)}.safetensors",
        embeddings_file_name(output_dir),
        "README.md",
    ]
    return [output_dir / name for name in names if (output_dir / name).is_file()]


def write_results_zip(output_dir: Path, zip_path: Path) -> Path:
    """The result files, plus the final validation images, in one zip (flat names)."""
    files = result_files(output_dir) + sorted((output_dir / "validation" / "final").glob("*.png"))
    tmp = zip_path.with_suffix(".partial")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            archive.write(path, arcname=path.relative_to(output_dir).as_posix())
    tmp.replace(zip_path)
    return zip_path


class TryIt:
    """Generate with a run's LoRA and embeddings; keeps the last loaded pipeline (loading SDXL takes a while)."""

    def __init__(self):
        self.key: tuple[str, str] | None = None
        self.pipe = None

    def pipeline(self, model: str, output_dir: Path):
        from diffusers import StableDiffusionXLPipeline

        from ..formats import load_for_diffusers

        key = (model, str(output_dir))
        if self.key != key:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = torch.bfloat16 if device == "cuda" else torch.float32  # SDXL's VAE overflows in fp16
            pipe = StableDiffusionXLPipeline.from_pretrained(model, dtype=dtype, use_safetensors=True)
            load_for_diffusers(pipe, output_dir)
            pipe.set_progress_bar_config(disable=True)
            self.pipe, self.key = pipe.to(device), key
        return self.pipe

    def generate(self, model: str, output_dir: Path, flags, prompt: str, seed: int, steps: int):
        """One image of `prompt`; `TOK` (the run's abstractions) becomes the run's new tokens."""
        if flags.train_text_encoder_ti:
            prompt = PivotalTokens.from_flags(
                flags.token_abstraction, flags.num_new_tokens_per_abstraction
            ).substitute(prompt)
        pipe = self.pipeline(model, output_dir)
        generator = torch.Generator(pipe.device).manual_seed(int(seed))
        size = flags.resolution
        image = pipe(
            **prompt_inputs(pipe, flags, prompt),  # long prompts as the run trained on them (--max_token_length)
            num_inference_steps=int(steps),
            height=size,
            width=size,
            generator=generator,
        ).images[0]
        return image, prompt


def push_to_hub(output_dir: Path, repo_id: str, token: str | None, private: bool = True) -> str:
    """Upload the run's results (no checkpoints or logs); return the repo URL. `token` None: the environment's
    (HF_TOKEN) or the saved login. The token goes to the Hub client only."""
    api = hub_api(token or None)
    repo = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    api.upload_folder(
        repo_id=repo,
        repo_type="model",
        folder_path=str(output_dir),
        commit_message="Upload SDXL DreamBooth LoRA (sdxl-pivotal Space)",
        ignore_patterns=[*HUB_IGNORE_PATTERNS, METRICS_FILE, f"{CONTROL_DIR}/**"],
    )
    return f"https://huggingface.co/{repo}"

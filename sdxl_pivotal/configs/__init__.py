"""The real model configs of SDXL base, kept in the project, and models built from them.

`sdxl-base/` holds the `config.json` of the UNet, both text encoders and the VAE, and the scheduler config, of
`stabilityai/stable-diffusion-xl-base-1.0` (values as published; a test checks the parameter counts they give:
UNet 2 567 463 684, CLIP-L 123 060 480, CLIP-G 694 659 840, VAE 83 653 863). With them the memory planner sizes
SDXL without a download, and the benchmark builds a full-size SDXL with random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

SDXL_BASE = Path(__file__).resolve().parent / "sdxl-base"
# Hub ids whose configs are embedded here (the planner reads them instead of the Hub).
# madebyollin's fp16-fixed VAE has SDXL's VAE architecture (its config differs only in force_upcast and sample_size).
EMBEDDED = {
    "stabilityai/stable-diffusion-xl-base-1.0": SDXL_BASE,
    "madebyollin/sdxl-vae-fp16-fix": SDXL_BASE / "vae",
}
MODEL_NAMES = ("unet", "vae", "text_encoder", "text_encoder_2")


def config_source(name_or_path: str) -> Path | str:
    """Where the configs of `name_or_path` are: the embedded copy for a known Hub id, else the path or id itself."""
    return EMBEDDED.get(name_or_path, name_or_path)


def models_from_configs(source: Path | str, vae_source: Path | str | None = None) -> dict[str, torch.nn.Module]:
    """{"unet", "vae", "text_encoder", "text_encoder_2"} built from the configs in `source` (a pipeline folder or
    Hub id), with the libraries' own random initialisation, on the current default device (e.g. inside
    `torch.device("meta")` or a FakeTensorMode). `vae_source` is a VAE folder replacing the pipeline's."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if vae_source is None:
        vae_config = AutoencoderKL.load_config(source, subfolder="vae")
    else:
        vae_config = AutoencoderKL.load_config(config_source(str(vae_source)))
    return {
        "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(source, subfolder="unet")),
        "vae": AutoencoderKL.from_config(vae_config),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(source, subfolder="text_encoder")),
        "text_encoder_2": CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(source, subfolder="text_encoder_2")
        ),
    }


def save_random_sdxl(output_dir: Path, device: torch.device, seed: int = 0, source: Path = SDXL_BASE) -> Path:
    """Write a pipeline folder of the configs in `source` (default: full-size SDXL base) with random weights
    (fp16 files, variant "fp16": about 7 GB for SDXL) and the embedded tokenizers, plus its VAE alone in
    `vae-fp16-fix/` (no variant; stands for madebyollin/sdxl-vae-fp16-fix). The weights are drawn on `device`
    (seconds on a GPU); the trainer then loads the folder exactly as it loads SDXL from the Hub (`--variant fp16`)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from ..tiny import build_clip_tokenizers

    torch.manual_seed(seed)
    with torch.device(device):
        models = models_from_configs(source)
    for model in models.values():
        model.to(torch.float16)
    tokenizer, tokenizer_2 = build_clip_tokenizers()
    scheduler = EulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler")
    pipeline = StableDiffusionXLPipeline(
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler, force_zeros_for_empty_prompt=True, **models
    )
    pipeline.save_pretrained(output_dir, safe_serialization=True, variant="fp16")
    models["vae"].save_pretrained(Path(output_dir) / "vae-fp16-fix", safe_serialization=True)
    return Path(output_dir)

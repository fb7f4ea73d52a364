"""SDXL's module tree without weights: what naming and converting LoRA files needs.

The names and shapes of a LoRA's modules come from the models it adapts. `empty_sdxl_models` builds the UNet and
both CLIP text encoders on the meta device (accelerate's `init_empty_weights`: every parameter is a shape, none is
allocated) from a pipeline folder's configs, or from SDXL base's configs written here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError

SDXL_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"

# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (the entries that shape the model).
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)

# Its text_encoder/config.json (CLIP ViT-L) and text_encoder_2/config.json (OpenCLIP ViT-bigG), likewise.
SDXL_TEXT_ENCODER_CONFIGS = {
    "text_encoder": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="quick_gelu",
        projection_dim=768,
    ),
    "text_encoder_2": dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        hidden_act="gelu",
        projection_dim=1280,
    ),
}


def empty_sdxl_models(base: str | Path | None = None) -> dict[str, torch.nn.Module]:
    """{"unet", "text_encoder", "text_encoder_2"} on the meta device, from the configs of the pipeline folder
    `base` (its `unet/`, `text_encoder/`, `text_encoder_2/` config.json), or SDXL base's when `base` is None."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if base is None:
        unet_config = SDXL_UNET_CONFIG
        text_configs = {part: CLIPTextConfig(**config) for part, config in SDXL_TEXT_ENCODER_CONFIGS.items()}
    else:
        missing = [f"{part}/config.json" for part in ("unet", *SDXL_TEXT_ENCODER_CONFIGS)]
        missing = [name for name in missing if not (Path(base) / name).is_file()]
        if missing:
            raise InputError(f"{base} is not an SDXL pipeline folder: it has no {', '.join(missing)}.")
        unet_config = UNet2DConditionModel.load_config(base, subfolder="unet")
        text_configs = {
            part: CLIPTextConfig.from_pretrained(base, subfolder=part) for part in SDXL_TEXT_ENCODER_CONFIGS
        }
    with init_empty_weights():
        return {
            "unet": UNet2DConditionModel.from_config(unet_config),
            "text_encoder": CLIPTextModel(text_configs["text_encoder"]),
            "text_encoder_2": CLIPTextModelWithProjection(text_configs["text_encoder_2"]),
        }

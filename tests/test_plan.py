"""The embedded SDXL-base configs and the memory planner."""

from __future__ import annotations

import torch

from sdxl_pivotal.configs import SDXL_BASE, models_from_configs


def test_embedded_configs_give_sdxl_base_parameter_counts():
    """Parameter counts of stabilityai/stable-diffusion-xl-base-1.0 as published (external oracle): a wrong value in
    any config changes them."""
    with torch.device("meta"):
        models = models_from_configs(SDXL_BASE)
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    assert counts == {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    }
    assert models["unet"].config.cross_attention_dim == 768 + 1280
    assert models["vae"].config.scaling_factor == 0.13025

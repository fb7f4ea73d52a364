"""Load the SDXL parts, and set their dtypes and devices (the adapters: `adapters.py`)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import torch

from .errors import InputError

logger = logging.getLogger(__name__)


@dataclass
class SDXLParts:
    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object


def load_sdxl(args: argparse.Namespace) -> SDXLParts:
    """Load tokenizers, text encoders, VAE, UNet and the training noise scheduler, all frozen."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    source = dict(revision=args.revision, cache_dir=args.cache_dir)
    path = args.pretrained_model_name_or_path
    noise_scheduler = load_noise_scheduler(args, source)  # first: its checks fail before any weights load
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", use_fast=False, **source)
    tokenizer_2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", use_fast=False, **source)
    weights = dict(variant=args.variant, use_safetensors=True, **source)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **weights)
    if args.pretrained_vae_model_name_or_path:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, **source, use_safetensors=True)
    else:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **weights)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights)
    for model in (text_encoder, text_encoder_2, vae, unet):
        model.requires_grad_(False)
    return SDXLParts(tokenizer, tokenizer_2, text_encoder, text_encoder_2, vae, unet, noise_scheduler)


def load_noise_scheduler(args: argparse.Namespace, source: dict):
    """The training scheduler, as the reference picks it: the model's own scheduler is an EDM one (Playground
    v2.5) -> EDMEulerScheduler and EDM-style training; --do_edm_style_training -> EulerDiscreteScheduler (its
    table of sigmas); else DDPMScheduler. --prediction_type overrides the model's target."""
    from diffusers import DDPMScheduler, EDMEulerScheduler, EulerDiscreteScheduler

    path = args.pretrained_model_name_or_path
    config = DDPMScheduler.load_config(path, subfolder="scheduler", **source)
    if "EDM" in config["_class_name"]:
        if args.snr_gamma is not None:
            raise InputError(
                f"{path} has an EDM scheduler, so it trains EDM-style (loss weighted by its preconditioning); "
                "--snr_gamma does not apply: drop it."
            )
        logger.info("%s has an EDM scheduler: EDM-style training.", path)
        scheduler_class = EDMEulerScheduler
    elif args.do_edm_style_training:
        scheduler_class = EulerDiscreteScheduler
    else:
        scheduler_class = DDPMScheduler
    noise_scheduler = scheduler_class.from_pretrained(path, subfolder="scheduler", **source)
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    return noise_scheduler


def trained_models(parts: SDXLParts, args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """The models that hold trainable parameters, by the names diffusers' LoRA files use."""
    models = {"unet": parts.unet}
    if args.train_text_encoder or args.train_text_encoder_ti:
        models.update(text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2)
    return models


def check_mixed_precision(accelerator) -> None:
    """Refuse fp16 on a CPU before anything loads: accelerate neither autocasts nor scales the loss there, so
    the frozen weights would run in bare float16 (slow on CPUs, gradients unscaled) and the VAE decode of the
    first validation image fails on mixed dtypes."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise InputError(
            "--mixed_precision fp16 needs a GPU (accelerate has no float16 autocast or loss scaling on a CPU); "
            "on a CPU use --mixed_precision bf16 or no."
        )


def place_models(parts: SDXLParts, device: torch.device, weight_dtype: torch.dtype, vae_fp32: bool) -> None:
    """Frozen weights in the training dtype on the device; the trainable LoRA weights stay float32.

    SDXL's own VAE overflows in float16, so it stays in float32 unless a replacement VAE was given.
    """
    from diffusers.training_utils import cast_training_params

    for model in (parts.unet, parts.text_encoder, parts.text_encoder_2):
        _move(model, device, weight_dtype)
    _move(parts.vae, device, torch.float32 if vae_fp32 else weight_dtype)
    cast_training_params([parts.unet, parts.text_encoder, parts.text_encoder_2], dtype=torch.float32)


def _move(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    model.to(device)
    if model.dtype != dtype:  # diffusers warns on every `.to(dtype)`, even a no-op one
        model.to(dtype=dtype)

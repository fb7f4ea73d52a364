"""Load the SDXL parts, and set their dtypes and devices (the adapters: `adapters.py`); check the model's
source (a folder with every part, or a Hub repo that exists) before anything loads."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError

logger = logging.getLogger(__name__)

# The parts of an SDXL pipeline folder that training loads, each with the file that must be in it.
PIPELINE_PARTS = {
    "scheduler": "scheduler_config.json",
    "tokenizer": "tokenizer_config.json",
    "tokenizer_2": "tokenizer_config.json",
    "text_encoder": "config.json",
    "text_encoder_2": "config.json",
    "vae": "config.json",
    "unet": "config.json",
}
WEIGHT_PARTS = ("text_encoder", "text_encoder_2", "vae", "unet")
TRAINABLE_PREDICTION_TYPES = ("epsilon", "v_prediction")


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


def check_model_source(args: argparse.Namespace) -> None:
    """Before any model loads: --pretrained_model_name_or_path (and --pretrained_vae_model_name_or_path) is
    a folder holding every part training loads, or a Hub repo that exists (offline: that is cached); its
    scheduler is one we can train. Raises InputError naming the problem and the fix."""
    model = args.pretrained_model_name_or_path
    parts = [p for p in PIPELINE_PARTS if p != "vae" or not args.pretrained_vae_model_name_or_path]
    if Path(model).expanduser().is_dir():
        _check_pipeline_folder(Path(model).expanduser(), parts, args.variant)
    else:
        _check_hub_source(model, "--pretrained_model_name_or_path", "model_index.json", args)
    vae = args.pretrained_vae_model_name_or_path
    if vae and Path(vae).expanduser().is_dir():
        _check_weights_folder(Path(vae).expanduser(), "--pretrained_vae_model_name_or_path", None)
    elif vae:
        _check_hub_source(vae, "--pretrained_vae_model_name_or_path", "config.json", args)
    load_noise_scheduler(args, dict(revision=args.revision, cache_dir=args.cache_dir))


def _check_pipeline_folder(folder: Path, parts: list[str], variant: str | None) -> None:
    flag = "--pretrained_model_name_or_path"
    if not (folder / "model_index.json").is_file():
        raise InputError(
            f"{flag} {folder} has no model_index.json: it is not a diffusers pipeline folder. Pass the folder "
            "that StableDiffusionXLPipeline.save_pretrained wrote, or a Hub id."
        )
    for part in parts:
        if not (folder / part / PIPELINE_PARTS[part]).is_file():
            raise InputError(
                f"{flag} {folder} is incomplete: {part}/{PIPELINE_PARTS[part]} is missing. Training needs "
                f"{', '.join(f'{p}/' for p in parts)}; copy the whole pipeline folder."
            )
        if part in WEIGHT_PARTS:
            _check_weights_folder(folder / part, flag, variant)


def _check_weights_folder(folder: Path, flag: str, variant: str | None) -> None:
    """A model folder: its config and safetensors weights (of `variant`, if given; we never load pickles)."""
    if not (folder / "config.json").is_file():
        raise InputError(f"{flag}: {folder} has no config.json; pass the folder save_pretrained wrote.")
    weights = [p.name for p in folder.iterdir() if p.name.endswith(".safetensors") or ".safetensors." in p.name]
    if variant is not None:
        weights = [name for name in weights if f".{variant}." in name]
    if not weights:
        which = f"--variant {variant} " if variant else ""
        raise InputError(
            f"{flag}: {folder} has no {which}safetensors weights (only safetensors are loaded, never pickled .bin "
            f"files). Convert the weights to safetensors{' or drop --variant' if variant else ''}."
        )


def _check_hub_source(name: str, flag: str, filename: str, args: argparse.Namespace) -> None:
    """`name` is not a local folder: it must be a Hub repo id that exists and holds `filename` (offline:
    that the cache holds it)."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if Path(name).expanduser().exists():
        raise InputError(f"{flag} {name} is a file; pass a pipeline folder or a Hub id.")
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise InputError(f"{flag} {name}: no such folder (and not a Hub id, which looks like owner/name).")
    if constants.HF_HUB_OFFLINE:
        cached = huggingface_hub.try_to_load_from_cache(
            name, filename, cache_dir=args.cache_dir, revision=args.revision
        )
        if not isinstance(cached, str):
            raise InputError(
                f"{flag} {name} is not a local folder, and the Hub cache does not hold it while offline "
                "(HF_HUB_OFFLINE=1). Download it once while online, or pass the folder of a saved pipeline."
            )
        return
    try:
        found = huggingface_hub.file_exists(name, filename, revision=args.revision)
    except GatedRepoError:
        raise InputError(
            f"{flag} {name} is gated: accept its terms on https://huggingface.co/{name} and log in "
            "(`hf auth login` or HF_TOKEN)."
        ) from None
    except RepositoryNotFoundError:
        raise InputError(
            f"{flag} {name}: no such model on the Hub (a typo? a private model needs `hf auth login` or HF_TOKEN)."
        ) from None
    except RevisionNotFoundError:
        raise InputError(f"{flag} {name} has no revision {args.revision!r}; check --revision.") from None
    except HFValidationError as error:
        raise InputError(f"{flag} {name} is neither a local folder nor a valid Hub id ({error}).") from None
    except Exception as error:  # connection failures come from the HTTP library (httpx), not from the Hub
        raise InputError(
            f"{flag} {name} is not a local folder and the Hub cannot be reached ({type(error).__name__}: {error}). "
            "Check the connection, or set HF_HUB_OFFLINE=1 to use the models in the Hub cache."
        ) from None
    if not found:
        raise InputError(f"{flag} {name} has no {filename} on the Hub: it is not a diffusers SDXL repo.")


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
    if noise_scheduler.config.prediction_type not in TRAINABLE_PREDICTION_TYPES:
        raise InputError(
            f"{path}'s scheduler predicts {noise_scheduler.config.prediction_type!r}; training supports "
            f"{' and '.join(TRAINABLE_PREDICTION_TYPES)}. Pass --prediction_type epsilon or v_prediction."
        )
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

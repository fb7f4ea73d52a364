"""Validation images: generated with the current LoRA and embeddings during training, and once more at the
end from the saved files, loaded with `load_for_diffusers` (the loader the model card and examples use), with the
sampler of the training validation. Saved as PNG and logged to the trackers.

Validation never changes the training trajectory: it uses its own generator, runs in eval mode without
gradients, and every training step reseeds its own randomness (see `train.step_generator`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

import numpy as np
import torch

from .args import long_prompts
from .export import save_image
from .prompts import pipeline_embeddings

logger = logging.getLogger(__name__)


def is_validation_step(args: argparse.Namespace, done: int, steps_per_epoch: int) -> bool:
    """After optimizer step `done` (1-based): every --validation_steps steps if given, else at the end of
    every --validation_epochs-th epoch counted from the first (as the reference: epochs 0, N, 2N, ...)."""
    if not args.validation_prompt:
        return False
    if args.validation_steps:
        return done % args.validation_steps == 0
    epoch, rest = divmod(done, steps_per_epoch)
    return rest == 0 and (epoch - 1) % args.validation_epochs == 0


def sdxl_pipeline(parts, unet: torch.nn.Module, text_encoders: list[torch.nn.Module]):
    """A StableDiffusionXLPipeline around the training modules (no copy, no loading)."""
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline(
        vae=parts.vae,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        tokenizer=parts.tokenizer,
        tokenizer_2=parts.tokenizer_2,
        unet=unet,
        scheduler=sampling_scheduler(parts.noise_scheduler),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sampling_scheduler(noise_scheduler):
    """The validation sampler for the training scheduler: Euler (EDM Euler for an EDM model), with the
    training scheduler's config (its prediction type included)."""
    from diffusers import EDMEulerScheduler, EulerDiscreteScheduler

    from .losses import is_edm_scheduler

    scheduler_class = EDMEulerScheduler if is_edm_scheduler(noise_scheduler) else EulerDiscreteScheduler
    return scheduler_class.from_config(noise_scheduler.config)


def prompt_inputs(pipeline, args: argparse.Namespace, prompt: str, negative_prompt: str | None = None) -> dict:
    """The text arguments of a pipeline call, encoded as training encodes captions: the strings themselves (diffusers
    truncates them at 77 tokens, as training does by default), or with --max_token_length above 75 the long
    embeddings, which diffusers' pipeline cannot compute itself (see prompts.py)."""
    if not long_prompts(args.max_token_length):
        return {"prompt": prompt, "negative_prompt": negative_prompt, "clip_skip": args.clip_skip}
    return pipeline_embeddings(pipeline, prompt, negative_prompt, args.max_token_length, args.clip_skip)


def generate(pipeline, args: argparse.Namespace, prompt: str, seed: int, autocast=contextlib.nullcontext) -> list:
    """`--num_validation_images` images of `prompt` at the training resolution, from a fixed seed."""
    generator = torch.Generator(pipeline.device).manual_seed(seed)
    with torch.no_grad(), autocast():
        return pipeline(
            **prompt_inputs(pipeline, args, prompt),
            num_images_per_prompt=args.num_validation_images,
            num_inference_steps=args.validation_inference_steps,
            height=args.resolution,
            width=args.resolution,
            generator=generator,
        ).images


@contextlib.contextmanager
def live_pipeline(parts, models: dict):
    """A pipeline around the modules being trained, in eval mode and on the training device for the duration;
    then everything goes back (training mode; the VAE and text encoders to where they were)."""
    encoders = [models.get("text_encoder", parts.text_encoder), models.get("text_encoder_2", parts.text_encoder_2)]
    modules = [models["unet"], *encoders]
    for module in modules:
        module.eval()
    # Cached latents and prompts leave the VAE and text encoders on the CPU; they work on the training device.
    visitors = [parts.vae, *encoders]
    homes = [next(module.parameters()).device for module in visitors]
    for module in visitors:
        module.to(next(models["unet"].parameters()).device)
    try:
        yield sdxl_pipeline(parts, models["unet"], encoders)
    finally:
        for module, home in zip(visitors, homes, strict=True):
            module.to(home)
        for module in models.values():
            module.train()


def validate_during_training(accelerator, parts, models: dict, args, prompt: str, seed: int, step: int) -> list:
    """Generate with the modules being trained, then put them back in training mode."""
    with live_pipeline(parts, models) as pipeline:
        images = generate(pipeline, args, prompt, seed, accelerator.autocast)
    publish(accelerator, images, Path(args.output_dir) / "validation" / f"step-{step}", prompt, step, "validation")
    return images


def publish(accelerator, images: list, folder: Path, prompt: str, step: int, tag: str) -> list[Path]:
    """Save PNGs into `folder` and log the images to tensorboard and wandb."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [save_image(image, folder / f"{i}.png") for i, image in enumerate(images)]
    log_images(accelerator, images, prompt, step, tag)
    logger.info("Validation images (%s) saved to %s", prompt, folder)
    return paths


def log_images(accelerator, images: list, prompt: str, step: int, tag: str) -> None:
    """Log images of one size to tensorboard and wandb under `tag`."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(im, caption=f"{i}: {prompt}") for i, im in enumerate(images)]}, step=step)


def load_final_pipeline(args: argparse.Namespace, output_dir: Path, device, dtype: torch.dtype):
    """The base pipeline with the run's saved LoRA and embeddings, loaded by `load_for_diffusers` (as the model
    card tells users), with the dtypes and the sampler of the validation during training."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    from .formats.load import load_for_diffusers
    from .models import load_noise_scheduler

    source = dict(revision=args.revision, cache_dir=args.cache_dir)
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        args.pretrained_model_name_or_path, variant=args.variant, dtype=dtype, use_safetensors=True, **source
    )
    if args.pretrained_vae_model_name_or_path:
        pipeline.vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, dtype=dtype)
    else:
        pipeline.vae.to(torch.float32)  # SDXL's own VAE overflows in float16; training keeps it in float32 too
    pipeline.scheduler = sampling_scheduler(load_noise_scheduler(args, source))
    load_for_diffusers(pipeline, output_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def final_validation(accelerator, args, output_dir: Path, prompt: str, seed: int, step: int, dtype) -> list[Path]:
    """Images of `prompt` from the saved files, as `validate_during_training` makes them from the live modules."""
    pipeline = load_final_pipeline(args, output_dir, accelerator.device, dtype)
    images = generate(pipeline, args, prompt, seed, accelerator.autocast)
    return publish(accelerator, images, output_dir / "validation" / "final", prompt, step, "final")

"""--cache_latents: every training image is encoded by the VAE once, before training, instead of every step.

Each cached entry holds the VAE posterior's parameters (mean and log-variance), so every step still draws a
fresh latent from it, exactly as encoding on the fly would. With caching, each image's crop is fixed for the
run (the centre, or one random crop drawn from the seed); with --random_flip both flips are cached and each
step picks one. The VAE then leaves the device. With `--latents_cache_dir`, entries are also kept on disk,
keyed by the exact pixels encoded (image content, resize, bucket, crop, flip) and the VAE's weights, so a
second run on the same data skips encoding.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .buckets import Size
from .export import save_safetensors
from .rng import cached_crop_rng

logger = logging.getLogger(__name__)

# (is a class image, record index, training size, flipped)
CacheKey = tuple[bool, int, Size, bool]


@dataclass
class CachedLatents:
    params: torch.Tensor  # [2 x latent channels, h, w]: posterior mean and log-variance, float32, CPU
    original_size: tuple[int, int]  # (height, width)
    crop_top_left: tuple[int, int]


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A hash of the VAE encoder's weights: cached latents are only reused with the very same encoder."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def fixed_crop(dataset, record, size: Size, rng: np.random.Generator) -> tuple[list, list, tuple[int, int]]:
    """The record's pixels at `size` with its one crop for the run, unflipped and flipped:
    ([pixels, flipped pixels], [crop, flipped crop]); only the first of each without --random_flip."""
    from .data import crop_and_flip

    resized, original_size = dataset._resized_image(record, size)
    pixels, (top, left) = crop_and_flip(resized, size, rng, dataset.center_crop, False)
    variants, crops = [pixels], [(top, left)]
    if dataset.random_flip:
        variants.append(pixels.flip(-1))
        crops.append((top, resized.width - left - size.width))  # the mirrored crop's left edge, as in crop_and_flip
    return variants, crops, original_size


def scale_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """VAE latents as the UNet sees them: times the VAE's scaling factor, after removing the per-channel mean and
    std when the VAE's config has them (Playground v2.5's), as diffusers' pipelines do."""
    mean, std = getattr(vae_config, "latents_mean", None), getattr(vae_config, "latents_std", None)
    if mean is None or std is None:
        return latents * vae_config.scaling_factor
    mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).reshape(1, -1, 1, 1)
    std = torch.tensor(std, device=latents.device, dtype=latents.dtype).reshape(1, -1, 1, 1)
    return (latents - mean) * vae_config.scaling_factor / std


def build_latent_cache(dataset, vae: torch.nn.Module, cache_dir: Path | None, batch_size: int) -> dict:
    """Encode every (record, size, flip) the dataset can ask for, `batch_size` images per VAE call (the training
    batch size: caching then never needs more memory than a training step's encoding would); return
    {CacheKey: CachedLatents}."""
    fingerprint = vae_fingerprint(vae) if cache_dir else ""
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    jobs = []  # (key, pixels, original_size, crop)
    for index, record in enumerate(dataset.records):
        jobs += _jobs(dataset, False, index, record, [dataset.sizes[index]])
    for index, record in enumerate(dataset.class_records):
        jobs += _jobs(dataset, True, index, record, sorted(set(dataset.sizes)))
    cache, to_encode, hits = {}, [], 0
    for key, pixels, original_size, crop in jobs:
        path = _disk_path(cache_dir, fingerprint, pixels) if cache_dir else None
        if path is not None and path.is_file():
            cache[key] = CachedLatents(load_file(path)["params"], original_size, crop)
            hits += 1
        else:
            to_encode.append((key, pixels, original_size, crop, path))
    # Encode in batches of one size (images of a bucket share a shape).
    to_encode.sort(key=lambda job: job[1].shape)
    for start in range(0, len(to_encode), batch_size):
        chunk = to_encode[start : start + batch_size]
        shapes = {job[1].shape for job in chunk}
        for shape in shapes:
            same = [job for job in chunk if job[1].shape == shape]
            with torch.no_grad():
                pixels = torch.stack([job[1] for job in same]).to(device, dtype=dtype)
                params = vae.encode(pixels).latent_dist.parameters.float().cpu()
            for (key, _, original_size, crop, path), p in zip(same, params, strict=True):
                cache[key] = CachedLatents(p.contiguous(), original_size, crop)
                if path is not None:
                    save_safetensors({"params": p.contiguous()}, path)
    logger.info("Latent cache: %d entries, %d encoded, %d read from %s", len(cache), len(to_encode), hits, cache_dir)
    return cache


def _jobs(dataset, is_class: bool, index: int, record, sizes: list[Size]) -> list:
    jobs = []
    for size in sizes:
        rng = cached_crop_rng(dataset.seed, index, is_class)
        variants, crops, original_size = fixed_crop(dataset, record, size, rng)
        for flipped, (pixels, crop) in enumerate(zip(variants, crops, strict=True)):
            jobs.append(((is_class, index, size, bool(flipped)), pixels, original_size, crop))
    return jobs


def _disk_path(cache_dir: Path, fingerprint: str, pixels: torch.Tensor) -> Path:
    digest = hashlib.sha256(fingerprint.encode())
    digest.update(str(tuple(pixels.shape)).encode())
    digest.update(pixels.numpy().tobytes())
    cache_dir.mkdir(parents=True, exist_ok=True)
    return cache_dir / f"{digest.hexdigest()[:32]}.safetensors"

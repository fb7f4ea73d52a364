"""--cache_latents: encoded once, equal to encoding on the fly, both flips, disk cache reused without the VAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdxl_pivotal.args import parse_args
from sdxl_pivotal.data import DreamBoothDataset, collate, crop_and_flip, load_records
from sdxl_pivotal.latents import build_latent_cache
from sdxl_pivotal.models import load_sdxl


def setup(tiny_model: Path, demo_images: Path, tmp_path: Path, *extra: str):
    args = parse_args(
        [
            *("--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(demo_images)),
            *("--instance_prompt", "TOK", "--output_dir", str(tmp_path / "o"), "--resolution", "64", *extra),
        ]
    )
    return args, DreamBoothDataset(load_records(args), args, seed=0), load_sdxl(args).vae


def test_cached_latents_equal_on_the_fly_encoding_with_both_flips(tiny_model, demo_images, tmp_path):
    _, dataset, vae = setup(tiny_model, demo_images, tmp_path, "--random_flip")
    cache = build_latent_cache(dataset, vae, None, 2)
    assert len(cache) == 2 * len(dataset.records), "two flips per image"
    for index, record in enumerate(dataset.records):
        resized, _ = dataset._resized_image(record, (64, 64))
        pixels, crop = crop_and_flip(resized, (64, 64), np.random.default_rng([0, index, 3, 0]), False, False)
        with torch.no_grad():
            direct = vae.encode(pixels[None]).latent_dist.parameters[0]
            mirrored = vae.encode(pixels.flip(-1)[None]).latent_dist.parameters[0]
        torch.testing.assert_close(cache[(False, index, (64, 64), False)].params, direct, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cache[(False, index, (64, 64), True)].params, mirrored, rtol=1e-4, atol=1e-5)
        assert cache[(False, index, (64, 64), False)].crop_top_left == crop
        flipped_left = resized.width - crop[1] - 64
        assert cache[(False, index, (64, 64), True)].crop_top_left == (crop[0], flipped_left)

    # The dataset serves them, one flip or the other by (seed, epoch, index), with micro-conditioning.
    dataset.latent_cache = cache
    flips = {dataset[(epoch, 1)].crop_top_left for epoch in range(12)}  # image 1 is 4:3: the crop moves
    assert len(flips) == 2
    batch = collate([dataset[(0, 0)], dataset[(0, 1)]])
    assert batch.pixel_values is None and batch.latent_params.shape == (2, 8, 8, 8)


def test_disk_cache_is_reused_without_the_vae(tiny_model, demo_images, tmp_path):
    _, dataset, vae = setup(tiny_model, demo_images, tmp_path)
    first = build_latent_cache(dataset, vae, tmp_path / "latents", 2)
    files = sorted((tmp_path / "latents").glob("*.safetensors"))
    assert len(files) == len(dataset.records)

    def no_encoding(*_, **__):
        raise AssertionError("the VAE must not be called on a cache hit")

    vae.encode = no_encoding
    _, again_dataset, _ = setup(tiny_model, demo_images, tmp_path)
    second = build_latent_cache(again_dataset, vae, tmp_path / "latents", 2)
    assert first.keys() == second.keys() and all(torch.equal(first[k].params, second[k].params) for k in first)

    # Another resolution is another key: encoded, not served from the 64 px entries.
    _, other, fresh_vae = setup(tiny_model, demo_images, tmp_path, "--resolution", "128")
    build_latent_cache(other, fresh_vae, tmp_path / "latents", 2)
    assert len(list((tmp_path / "latents").glob("*.safetensors"))) == 2 * len(dataset.records)


@pytest.mark.parametrize("extra", [(), ("--with_prior_preservation",)])
def test_training_with_cached_latents_matches_uncached(run_training, tmp_path, extra):
    """Same seed, center crop: caching changes where latents come from, not what is trained."""
    if extra:
        extra = (
            *extra,
            "--class_prompt",
            "a toy",
            "--class_data_dir",
            str(tmp_path / "class"),
            "--num_class_images",
            "2",
        )
    flags = ("--max_train_steps", "3", "--center_crop", *extra)
    plain = load_file(run_training(tmp_path / "plain", *flags) / "pytorch_lora_weights.safetensors")
    cached = load_file(
        run_training(tmp_path / "cached", *flags, "--cache_latents") / "pytorch_lora_weights.safetensors"
    )
    for key in plain:
        # batched encoding differs from per-step encoding by float rounding only (~1e-6; steps move ~1e-4)
        torch.testing.assert_close(plain[key], cached[key], rtol=1e-3, atol=1e-5)

"""Tests with an independent oracle: each recomputes the expected value here, from the published formulas or
plain PyTorch, instead of comparing one run of the trainer's code with another run of the same code.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_pivotal import train as train_module
from sdxl_pivotal.args import parse_args
from sdxl_pivotal.data import DreamBoothDataset, ImageRecord, collate, load_records
from sdxl_pivotal.latents import build_latent_cache
from sdxl_pivotal.models import load_sdxl
from sdxl_pivotal.prompts import PromptEncoder
from sdxl_pivotal.rng import cached_crop_rng
from sdxl_pivotal.tokens import PivotalTokens, add_new_tokens

RES = 64


def flags(tiny_model: Path, demo_images: Path, tmp_path: Path, *extra: str):
    return parse_args(
        [
            *("--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(demo_images)),
            *("--instance_prompt", "a photo of TOK toy", "--output_dir", str(tmp_path / "out")),
            *("--resolution", str(RES), *extra),
        ]
    )


def noise_photo(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


# ---------------------------------------------------------------------------------------------- one step's loss


def scaled_linear_alphas_cumprod(config) -> torch.Tensor:
    """ᾱ_t of SDXL's "scaled_linear" schedule, from its definition: β = linspace(√β₀, √β₁, T)², ᾱ_t = Π(1 − β)."""
    assert config.beta_schedule == "scaled_linear"
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps) ** 2
    return torch.cumprod(1.0 - betas.double(), dim=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_batch_loss_equals_the_loss_recomputed_by_hand(prediction_type, tiny_model, demo_images, tmp_path):
    """Latents sampled from the VAE posterior, noise, timesteps, x_t, the target, min-SNR weights, and the
    instance and class halves each against their own targets, with the prior weight: all written out here."""
    gamma, prior_weight = 2.0, 0.7
    args = flags(
        tiny_model,
        demo_images,
        tmp_path,
        *("--prediction_type", prediction_type, "--snr_gamma", str(gamma), "--prior_loss_weight", str(prior_weight)),
    )
    parts = load_sdxl(args)
    instances = load_records(args)[:2]
    classes = [ImageRecord("a photo of a toy", image=noise_photo(80, 64, seed=i)) for i in range(2)]
    dataset = DreamBoothDataset(instances, args, seed=0, class_records=classes)
    batch = collate([dataset[(0, 0)], dataset[(0, 1)]])
    assert batch.num_prior == 2
    encode = PromptEncoder([parts.tokenizer, parts.tokenizer_2], [parts.text_encoder, parts.text_encoder_2], None)

    loss = train_module.batch_loss(parts, parts.unet, encode, batch, torch.Generator().manual_seed(5), args)

    generator = torch.Generator().manual_seed(5)  # drawn in the trainer's order: posterior, noise, timesteps
    vae, config = parts.vae, parts.noise_scheduler.config
    with torch.no_grad():
        mean, logvar = vae.encode(batch.pixel_values).latent_dist.parameters.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        latents = (mean + std * torch.randn(mean.shape, generator=generator)) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, config.num_train_timesteps, (len(latents),), generator=generator)
        alpha_bar = scaled_linear_alphas_cumprod(config)[timesteps].float().reshape(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        embeds, pooled = encode(batch.captions, trainable=False)
        prediction = parts.unet(
            noisy, timesteps, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": batch.time_ids}
        ).sample
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    target = noise if prediction_type == "epsilon" else velocity
    snr = (alpha_bar / (1 - alpha_bar)).flatten().double()
    weights = snr.clamp(max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    per_sample = ((prediction.double() - target.double()) ** 2).mean(dim=(1, 2, 3)) * weights
    expected = per_sample[:2].mean() + prior_weight * per_sample[2:].mean()
    assert batch.captions[2:] == ["a photo of a toy"] * 2
    assert len(set(timesteps.tolist())) == 4, "distinct timesteps, so pairing a half with other targets shows"
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------- accumulation


def first_step_gradients(run_training, output: Path, monkeypatch, *extra: str) -> list[torch.Tensor]:
    """The gradients the optimizer holds at its first step, with sampling made a function of each sample's own
    latents (the posterior mean, noise = sin(37 x latents), timestep 500), so that splitting a batch cannot
    change what any sample draws."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    monkeypatch.setattr(train_module, "sample_noise", lambda latents, generator, offset=0.0: torch.sin(37 * latents))
    monkeypatch.setattr(
        train_module, "sample_timesteps", lambda n, steps, generator, device: torch.full((n,), 500, device=device)
    )
    captured: list[torch.Tensor] = []
    create = train_module.create_optimizer

    def recording_optimizer(args, groups):
        optimizer = create(args, groups)

        def record(optimizer, *_):
            if not captured:
                captured.extend(p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"])

        optimizer.register_step_pre_hook(record)
        return optimizer

    monkeypatch.setattr(train_module, "create_optimizer", recording_optimizer)
    run_training(output, "--max_train_steps", "1", "--max_grad_norm", "0", "--checkpointing_steps", "100", *extra)
    return captured


def test_accumulation_gives_the_gradient_of_the_whole_batch(run_training, tmp_path, monkeypatch):
    """Batch 2 in one micro-batch, and batch 1 x 2 accumulated: the same samples, the same mean-loss gradient
    (compared before the optimizer step: Adam would hide a wrong scale)."""
    whole = first_step_gradients(run_training, tmp_path / "whole", monkeypatch, "--train_batch_size", "2")
    split = first_step_gradients(
        run_training, tmp_path / "split", monkeypatch, "--train_batch_size", "1", "--gradient_accumulation_steps", "2"
    )
    assert len(whole) == len(split) > 0
    assert sum(g.abs().sum() for g in whole) > 0
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------- block learning rates


def test_block_learning_rates_reach_the_optimizer_groups(run_training, tmp_path, monkeypatch):
    """--unet_block_lr 'down=0.5,up_blocks.1=2': every adapter parameter sits in an optimizer group whose
    learning rate is the base rate times its own block's multiplier, read here from the parameter's name."""
    optimizers = []
    create = train_module.create_optimizer
    monkeypatch.setattr(
        train_module, "create_optimizer", lambda a, g: optimizers.append(create(a, g)) or optimizers[-1]
    )
    models = []
    add = train_module.add_adapters
    monkeypatch.setattr(train_module, "add_adapters", lambda parts, a: models.append(parts.unet) or add(parts, a))
    base = 1e-3
    run_training(
        tmp_path / "out",
        *("--max_train_steps", "1", "--learning_rate", str(base), "--lr_scheduler", "constant"),
        *("--unet_block_lr", "down=0.5,up_blocks.1=2"),
    )
    names = {id(p): name for name, p in models[0].named_parameters() if p.requires_grad}
    seen = 0
    for group in optimizers[0].param_groups:
        for parameter in group["params"]:
            name = names[id(parameter)]
            multiplier = 0.5 if name.startswith("down_blocks.") else 2.0 if name.startswith("up_blocks.1.") else 1.0
            assert math.isclose(group["lr"], base * multiplier, rel_tol=1e-9), name
            seen += 1
    assert seen == len(names)
    assert {g["lr"] for g in optimizers[0].param_groups} == {base * 0.5, base, base * 2.0}


# ---------------------------------------------------------------------------------------------- latent cache


def test_disk_cache_is_not_reused_after_the_vae_changes(tiny_model, demo_images, tmp_path):
    args = flags(tiny_model, demo_images, tmp_path)
    dataset = DreamBoothDataset(load_records(args)[:2], args, seed=0)
    vae = load_sdxl(args).vae
    build_latent_cache(dataset, vae, tmp_path / "latents", 2)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1.5)  # another VAE
    cache = build_latent_cache(dataset, vae, tmp_path / "latents", 2)
    for index, record in enumerate(dataset.records):
        sample = dataset._prepare(record, dataset.sizes[index], cached_crop_rng(0, index, False))
        with torch.no_grad():
            expected = vae.encode(sample.pixel_values[None]).latent_dist.parameters[0]
        torch.testing.assert_close(cache[(False, index, dataset.sizes[index], False)].params, expected)
    assert len(list((tmp_path / "latents").glob("*.safetensors"))) == 2 * len(dataset.records)


def test_cached_latents_with_buckets_equal_uncached_on_non_square_images(tiny_model, demo_images, tmp_path):
    """Landscape and portrait photos in their buckets: the cached sample is the VAE posterior of exactly the
    pixels the uncached sample trains on, with the same micro-conditioning."""
    args = flags(
        tiny_model,
        demo_images,
        tmp_path,
        *("--aspect_ratio_bucketing", "--center_crop", "--bucket_step", "8"),
        *("--bucket_min_side", "32", "--bucket_max_side", "128"),
    )
    records = [
        ImageRecord(f"photo {i}", image=noise_photo(w, h, seed=i)) for i, (w, h) in enumerate([(150, 90), (70, 120)])
    ]
    dataset = DreamBoothDataset(records, args, seed=0)
    assert all(size.width != size.height for size in dataset.sizes)
    vae = load_sdxl(args).vae
    uncached = [dataset[(0, i)] for i in range(2)]
    dataset.latent_cache = build_latent_cache(dataset, vae, None, 2)
    for i, plain in enumerate(uncached):
        cached = dataset[(0, i)]
        assert plain.pixel_values.shape[1:] == dataset.sizes[i].hw
        with torch.no_grad():
            expected = vae.encode(plain.pixel_values[None]).latent_dist.parameters[0]
        torch.testing.assert_close(cached.latent_params, expected, rtol=1e-5, atol=1e-6)
        assert (cached.original_size, cached.crop_top_left, cached.target_size) == (
            plain.original_size,
            plain.crop_top_left,
            plain.target_size,
        )
        assert plain.original_size == (records[i].image.height, records[i].image.width)


# ---------------------------------------------------------------------------------------------- class images


def test_class_images_depend_on_the_seed(tiny_model, tmp_path):
    from sdxl_pivotal.class_images import ensure_class_images, load_generation_pipeline

    def generate(folder: Path, seed: int) -> list[torch.Tensor]:
        args = parse_args(
            [
                *("--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(tmp_path)),
                *("--instance_prompt", "TOK", "--output_dir", str(tmp_path / "o"), "--resolution", str(RES)),
            ]
        )
        paths = ensure_class_images(
            folder,
            "a toy",
            2,
            lambda: load_generation_pipeline(args, torch.device("cpu"), torch.float32),
            seed=seed,
            resolution=RES,
            batch_size=2,
            num_inference_steps=2,
        )
        return [torch.from_numpy(np.array(Image.open(p))).float() for p in paths]

    first, again, other = generate(tmp_path / "a", 0), generate(tmp_path / "b", 0), generate(tmp_path / "c", 1)
    for x, y in zip(first, again, strict=True):
        assert torch.equal(x, y)
    for x, y in zip(first, other, strict=True):
        assert (x - y).abs().mean() > 1.0


# ---------------------------------------------------------------------------------------------- new embedding rows


def test_each_new_row_gets_the_gradient_of_its_own_token(tiny_model, demo_images, tmp_path):
    """The new rows' gradients equal those of a plain, fully trainable embedding matrix holding the same rows
    (an oracle without our wrapper); a token absent from the prompt gets none."""
    import copy

    parts = load_sdxl(flags(tiny_model, demo_images, tmp_path))
    plain_encoder = copy.deepcopy(parts.text_encoder)
    tokens = PivotalTokens.from_flags("TOK", 3)  # <s0><s1><s2>
    add_new_tokens([parts.tokenizer], [parts.text_encoder], tokens, None)
    wrapped = parts.text_encoder.get_input_embeddings()
    with torch.no_grad():
        wrapped.new_rows.copy_(torch.randn_like(wrapped.new_rows))
    plain_encoder.resize_token_embeddings(len(parts.tokenizer))
    plain = plain_encoder.get_input_embeddings()
    with torch.no_grad():
        plain.weight[wrapped.first_new_id :] = wrapped.new_rows
    plain.weight.requires_grad_(True)

    prompt = "a <s2> photo of <s0> and <s0> again"  # <s1> absent, <s0> twice
    ids = parts.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    probe = torch.randn(1, 77, parts.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    (parts.text_encoder(ids).last_hidden_state * probe).sum().backward()
    (plain_encoder(ids).last_hidden_state * probe).sum().backward()

    expected = plain.weight.grad[wrapped.first_new_id :]
    torch.testing.assert_close(wrapped.new_rows.grad, expected, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(wrapped.new_rows.grad[1]) == 0
    assert wrapped.new_rows.grad[0].abs().sum() > 0 and wrapped.new_rows.grad[2].abs().sum() > 0


def test_class_pairing_walks_through_every_class_image(tiny_model, demo_images, tmp_path):
    """2 instance images, 5 class images: over 3 epochs the pairs take class images 0, 1, 2, 3, 4, 0 in turn
    (the reference would pair instance i with class i forever and never use class images 2 to 4)."""
    args = flags(tiny_model, demo_images, tmp_path)
    instances = load_records(args)[:2]
    classes = [ImageRecord(f"class {i}", image=noise_photo(64, 64, seed=i)) for i in range(5)]
    dataset = DreamBoothDataset(instances, args, seed=0, class_records=classes)
    used = [dataset[(epoch, i)].prior.caption for epoch in range(3) for i in range(2)]
    assert used == [f"class {k % 5}" for k in range(6)]

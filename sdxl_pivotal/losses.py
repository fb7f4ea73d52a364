"""The diffusion objective: noise, timesteps, the regression target and min-SNR weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`; with offset noise, plus a per-channel constant (Guttenberg, 2023)
    that lets the model learn to change an image's overall brightness."""
    from diffusers.utils.torch_utils import randn_tensor

    like = dict(generator=generator, device=latents.device, dtype=latents.dtype)
    noise = randn_tensor(latents.shape, **like)
    if noise_offset:
        offset = randn_tensor((*latents.shape[:2], 1, 1), **like)
        noise = noise + noise_offset * offset
    return noise


def sample_timesteps(batch_size: int, num_train_timesteps: int, generator: torch.Generator, device) -> torch.Tensor:
    """Timesteps drawn uniformly from [0, num_train_timesteps), on the generator's device, then moved."""
    timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=generator.device)
    return timesteps.to(device)


def training_target(
    noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon) or the velocity v = a_t * noise - s_t * x0."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Unsupported prediction type {prediction_type!r}; use epsilon or v_prediction.")


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al., 2023, https://arxiv.org/abs/2303.09556).

    With SNR(t) = alpha_bar_t / (1 - alpha_bar_t), the weight that turns each objective into the clamped
    x0-loss min(SNR, gamma) * ||x0_hat - x0||^2 is:
        epsilon:       min(SNR, gamma) / SNR
        v-prediction:  min(SNR, gamma) / (SNR + 1)
    (diffusers' reference adds 1 to the epsilon weight for v-prediction instead, which is not this.)
    """
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clamped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clamped / (snr + 1)
    return clamped / snr


def diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error, in float32, optionally weighted per sample."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()

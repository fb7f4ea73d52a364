"""The diffusion objective: noise, timesteps, the regression target and min-SNR weighting; and EDM-style
training (Karras et al., 2022, https://arxiv.org/abs/2206.00364), which preconditions the UNet's input and output
by the noise level sigma and regresses the clean latents."""

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


def is_edm_scheduler(noise_scheduler) -> bool:
    """Whether the model's own scheduler is an EDM one (Playground v2.5): such models always train EDM-style."""
    return "EDM" in type(noise_scheduler).__name__


def sample_edm_noise_levels(
    noise_scheduler, batch_size: int, generator: torch.Generator, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas [B, 1, 1, 1]) of entries drawn uniformly from the scheduler's training table: the UNet
    is conditioned on the table's timestep (for an EDM scheduler, its preconditioned noise level) of each sigma."""
    indices = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
    timesteps = noise_scheduler.timesteps[indices].to(device)
    sigmas = noise_scheduler.sigmas[indices].to(device, dtype=torch.float32)
    return timesteps, sigmas.reshape(batch_size, 1, 1, 1)


def edm_unet_input(noise_scheduler, noisy_latents: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """c_in(sigma) x_sigma: EDM's input scaling (an EDM scheduler's own; for an epsilon/v model trained on the
    variance-preserving process, 1 / sqrt(sigma^2 + 1), which gives it the inputs it was trained on)."""
    if is_edm_scheduler(noise_scheduler):
        return noise_scheduler.precondition_inputs(noisy_latents, sigmas)
    return noisy_latents / (sigmas**2 + 1) ** 0.5


def edm_denoised(
    noise_scheduler, noisy_latents: torch.Tensor, prediction: torch.Tensor, sigmas: torch.Tensor
) -> torch.Tensor:
    """The UNet's estimate of the clean latents, c_skip(sigma) x_sigma + c_out(sigma) F(x):
    epsilon: x_sigma - sigma eps;  v: -sigma / sqrt(sigma^2 + 1) v + x_sigma / (sigma^2 + 1)."""
    if is_edm_scheduler(noise_scheduler):
        return noise_scheduler.precondition_outputs(noisy_latents, prediction, sigmas)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noisy_latents - sigmas * prediction
    if prediction_type == "v_prediction":
        return prediction * (-sigmas / (sigmas**2 + 1) ** 0.5) + noisy_latents / (sigmas**2 + 1)
    raise ValueError(f"Unsupported prediction type {prediction_type!r}; use epsilon or v_prediction.")


def edm_weights(noise_scheduler, sigmas: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weights 1 / sigma^2, which turn the x0-loss back into the model's own objective; none
    with an EDM scheduler (as the reference: with its c_out the weights are numerically unstable)."""
    if is_edm_scheduler(noise_scheduler):
        return None
    return sigmas.flatten().float() ** -2


def diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error, in float32, optionally weighted per sample."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()

"""The diffusion objective against closed forms computed independently of diffusers."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from sdxl_pivotal.losses import (
    diffusion_loss,
    edm_denoised,
    edm_unet_input,
    edm_weights,
    is_edm_scheduler,
    min_snr_weights,
    sample_edm_noise_levels,
    sample_noise,
    sample_timesteps,
    training_target,
)


def sdxl_scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type
    )


def alpha_bar(t: int) -> float:
    """SDXL's scaled-linear schedule: betas linear in sqrt space from 0.00085 to 0.012 over 1000 steps."""
    product = 1.0
    for i in range(t + 1):
        sqrt_beta = math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * i / 999
        product *= 1.0 - sqrt_beta**2
    return product


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_closed_form(prediction_type):
    gamma = 5.0
    timesteps = torch.tensor([0, 10, 100, 250, 500, 750, 999])
    weights = min_snr_weights(sdxl_scheduler(prediction_type), timesteps, gamma)
    for t, w in zip(timesteps.tolist(), weights.tolist(), strict=True):
        snr = alpha_bar(t) / (1 - alpha_bar(t))
        expected = min(snr, gamma) / (snr if prediction_type == "epsilon" else snr + 1)
        assert w == pytest.approx(expected, rel=1e-4), t
    # Low-noise steps (high SNR) are down-weighted; high-noise ones keep weight 1 (epsilon) / SNR/(SNR+1) (v).
    assert weights[0] < 0.01 and weights[-1] <= 1.0


def test_v_prediction_target_is_velocity():
    scheduler = sdxl_scheduler("v_prediction")
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([1, 400, 999])
    target = training_target(scheduler, latents, noise, timesteps)
    for i, t in enumerate(timesteps.tolist()):
        a = alpha_bar(t)
        expected = math.sqrt(a) * noise[i] - math.sqrt(1 - a) * latents[i]
        torch.testing.assert_close(target[i], expected, rtol=1e-4, atol=1e-5)
    assert training_target(sdxl_scheduler("epsilon"), latents, noise, timesteps) is noise


def test_offset_noise_adds_one_constant_per_channel():
    latents = torch.zeros(2, 4, 16, 16)
    plain = sample_noise(latents, torch.Generator().manual_seed(0))
    offset = sample_noise(latents, torch.Generator().manual_seed(0), noise_offset=0.5)
    difference = offset - plain
    # Same base noise; the difference is constant over each image's channel and not zero.
    torch.testing.assert_close(difference, difference[:, :, :1, :1].expand_as(difference))
    assert difference.abs().max() > 0.01


def test_timesteps_cover_range_and_follow_generator():
    a = sample_timesteps(4096, 1000, torch.Generator().manual_seed(3), "cpu")
    b = sample_timesteps(4096, 1000, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 999 and len(a.unique()) > 900


def test_weighted_loss_is_weighted_mean_of_per_sample_mse():
    prediction, target = torch.zeros(2, 1, 2, 2), torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    assert diffusion_loss(prediction, target).item() == pytest.approx((1 + 4) / 2)
    assert diffusion_loss(prediction, target, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 + 2) / 2)


# ---------------------------------------------------------------------------------------------- EDM-style


def euler_scheduler(prediction_type: str):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type
    )


def test_edm_noise_levels_are_the_schedulers_sigmas_of_those_timesteps():
    """x_sigma = x_0 + sigma * noise is the Euler scheduler's own forward process at the drawn timesteps, and
    sigma = sqrt((1 - alpha_bar) / alpha_bar) of the timestep (closed form)."""
    scheduler = euler_scheduler("epsilon")
    timesteps, sigmas = sample_edm_noise_levels(scheduler, 6, torch.Generator().manual_seed(0), "cpu")
    assert sigmas.shape == (6, 1, 1, 1) and len(set(timesteps.tolist())) > 1
    for t, sigma in zip(timesteps.tolist(), sigmas.flatten().tolist(), strict=True):
        assert sigma == pytest.approx(math.sqrt((1 - alpha_bar(round(t))) / alpha_bar(round(t))), rel=1e-4)
    x0, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    torch.testing.assert_close(x0 + sigmas * noise, scheduler.add_noise(x0, noise, timesteps))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_edm_preconditioning_recovers_x0_from_the_exact_prediction(prediction_type):
    """The UNet sees the variance-preserving x_t = x_sigma / sqrt(sigma^2 + 1); given the exact epsilon (or v) of
    that x_t, the output preconditioning returns x_0 exactly, so the x0-loss of a perfect model is zero."""
    scheduler = euler_scheduler(prediction_type)
    sigmas = torch.tensor([0.1, 1.0, 14.0]).reshape(3, 1, 1, 1)
    x0, noise = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    noisy = x0 + sigmas * noise
    alpha, sigma_t = 1 / (sigmas**2 + 1) ** 0.5, sigmas / (sigmas**2 + 1) ** 0.5  # of the VP process
    torch.testing.assert_close(edm_unet_input(scheduler, noisy, sigmas), alpha * x0 + sigma_t * noise)
    exact = noise if prediction_type == "epsilon" else alpha * noise - sigma_t * x0
    torch.testing.assert_close(edm_denoised(scheduler, noisy, exact, sigmas), x0)
    torch.testing.assert_close(edm_weights(scheduler, sigmas), sigmas.flatten().float() ** -2)


def test_edm_scheduler_uses_its_own_preconditioning():
    from diffusers import EDMEulerScheduler

    scheduler = EDMEulerScheduler(sigma_data=0.5)
    assert is_edm_scheduler(scheduler) and not is_edm_scheduler(euler_scheduler("epsilon"))
    timesteps, sigmas = sample_edm_noise_levels(scheduler, 4, torch.Generator().manual_seed(0), "cpu")
    torch.testing.assert_close(timesteps, scheduler.precondition_noise(sigmas.flatten()))
    x = torch.randn(4, 4, 8, 8)
    torch.testing.assert_close(edm_unet_input(scheduler, x, sigmas), x / (sigmas**2 + 0.25) ** 0.5)
    assert edm_weights(scheduler, sigmas) is None

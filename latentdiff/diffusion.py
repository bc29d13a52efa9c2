"""The diffusion training objective, separate from the network (which it takes as an argument).

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", DDPM): a clean latent
``x_0``, Gaussian noise ``eps ~ N(0, I)``, a timestep ``t`` and the noised latent

    x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps            (DDPM eq. 4)

computed by the Diffusers scheduler's ``add_noise``. The network predicts one of

- ``epsilon``: the noise ``eps`` (DDPM eq. 14, the "simple" loss);
- ``v_prediction``: ``v = sqrt(alpha_bar_t) * eps - sqrt(1 - alpha_bar_t) * x_0`` (Salimans & Ho
  2022, "Progressive Distillation", Sec. 4), via the scheduler's ``get_velocity``;
- ``sample``: ``x_0`` itself.

Options: the beta schedule (``linear``, ``scaled_linear`` as in Stable Diffusion, ``squaredcos_cap_v2``
= the cosine schedule of Nichol & Dhariwal 2021, eq. 17), zero-terminal-SNR rescaling (Lin et al.
2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1), min-SNR-gamma loss
weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", eq. 8,
through ``diffusers.training_utils.compute_snr``) and offset noise (Guttenberg 2023).

Every random draw comes from torch's global generator (or the one passed in), whose state Accelerate
saves in each checkpoint, so a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from .config import DiffusionConfig

DenoiserFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``denoiser(x_t, t, encoder_hidden_states) -> prediction``, e.g. ``lambda x, t, c: unet(x, t, c).sample``."""


def make_noise_scheduler(config: DiffusionConfig) -> DDPMScheduler:
    """The forward process as a Diffusers ``DDPMScheduler`` (saved with the pipeline)."""
    if config.rescale_betas_zero_snr and config.prediction_type == "epsilon":
        raise ValueError(
            "diffusion.rescale_betas_zero_snr=true needs diffusion.prediction_type 'v_prediction' or 'sample': "
            "at zero terminal SNR the last timestep's input is pure noise, so predicting that noise teaches nothing "
            "(Lin et al. 2024, Sec. 3.2)"
        )
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        rescale_betas_zero_snr=config.rescale_betas_zero_snr,
        clip_sample=False,
        # Stable Diffusion's inference conventions, so stock samplers built from this config behave alike.
        steps_offset=1,
        timestep_spacing="trailing" if config.rescale_betas_zero_snr else "leading",
    )


def sample_noise(latents: torch.Tensor, noise_offset: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """``eps ~ N(0, I)`` shaped like ``latents``, plus offset noise when ``noise_offset > 0``.

    Offset noise (Guttenberg 2023, "Diffusion with Offset Noise") adds one N(0, 1) value per sample and
    channel, scaled by ``noise_offset``, so the model also learns to change an image's mean brightness.
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset > 0:
        offset = torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype
        )
        noise = noise + noise_offset * offset
    return noise


def training_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the network must predict for ``scheduler.config.prediction_type`` (see module docstring)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023, eq. 8 and Sec. 3.4).

    The x_0-space weight is ``min(SNR(t), gamma)``; expressed for the prediction target it becomes
    ``min(SNR, gamma) / SNR`` for epsilon, ``min(SNR, gamma) / (SNR + 1)`` for v, and ``min(SNR, gamma)``
    for x_0. SNR(t) = alpha_bar_t / (1 - alpha_bar_t).
    """
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        # A zero-terminal-SNR schedule has SNR = 0 at t = T; min(SNR, gamma) / SNR -> 1 there.
        return torch.where(snr > 0, clipped / snr.clamp(min=1e-8), torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


@dataclass
class DiffusionLoss:
    """The training loss of one batch, with the pieces a caller may want to log."""

    loss: torch.Tensor
    timesteps: torch.Tensor
    per_sample: torch.Tensor


def diffusion_loss(
    denoiser: DenoiserFn,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    generator: torch.Generator | None = None,
) -> DiffusionLoss:
    """Monte-Carlo estimate of the denoising loss on a batch of clean latents ``x_0``.

    Draws ``t ~ U{0, ..., T-1}`` and ``eps`` per sample, forms ``x_t`` (DDPM eq. 4), and returns the
    (optionally min-SNR-weighted) mean squared error between ``denoiser(x_t, t, c)`` and the target of
    the scheduler's prediction type. The mean is taken in float32 whatever the model's dtype.
    """
    batch_size = latents.shape[0]
    noise = sample_noise(latents, noise_offset, generator)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator, device=latents.device
    )
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    target = training_target(scheduler, latents, noise, timesteps)
    prediction = denoiser(noisy_latents, timesteps, encoder_hidden_states)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, snr_gamma)
    return DiffusionLoss(loss=per_sample.mean(), timesteps=timesteps, per_sample=per_sample)

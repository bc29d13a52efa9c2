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
through ``diffusers.training_utils.compute_snr``), a learned per-noise-level weighting (Karras et al.
2024, EDM2) and offset noise (Guttenberg 2023).

Every random draw comes from torch's global generator (or the one passed in), whose state Accelerate
saves in each checkpoint, so a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
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


def predicted_clean_latents(
    scheduler: DDPMScheduler, noisy_latents: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The network's estimate of ``x_0`` from its prediction of any type (DDPM eq. 15; for v,
    ``x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v``, Salimans & Ho 2022, eq. 11 rearranged).

    Errors in this space are comparable between prediction types: they are errors in the image.
    """
    alpha_bar = scheduler.alphas_cumprod.to(device=noisy_latents.device, dtype=torch.float32)[timesteps]
    alpha_bar = alpha_bar.view(-1, *([1] * (noisy_latents.ndim - 1)))
    x_t, prediction = noisy_latents.float(), prediction.float()
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return (x_t - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * prediction
    if prediction_type == "sample":
        return prediction
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


def min_snr_weights(
    scheduler: DDPMScheduler,
    timesteps: torch.Tensor,
    gamma: float,
    floor: float = 0.0,
    low: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023, eq. 8 and Sec. 3.4).

    The x_0-space weight is ``min(SNR(t), gamma)``; expressed for the prediction target it becomes
    ``min(SNR, gamma) / SNR`` for epsilon, ``min(SNR, gamma) / (SNR + 1)`` for v, and ``min(SNR, gamma)``
    for x_0. SNR(t) = alpha_bar_t / (1 - alpha_bar_t).

    For v that weight is about SNR at high noise and exactly 0 at the last step of a zero-terminal-SNR
    schedule, so the steps where a caption decides the layout are hardly learned. Two ways to keep them:

    - ``low`` (a number, or one per sample) clamps the SNR from below as well: the x_0-space weight becomes ``clamp(SNR, low, gamma)``,
      so for v a timestep with ``SNR <= low`` weighs ``low / (SNR + 1)`` (with ``low = 1``, the weight of
      the unweighted loss there) while the low-noise steps keep min-SNR's weight. Not for epsilon, whose
      weight ``low / SNR`` is unbounded at high noise.
    - ``floor`` is the least weight any timestep gets, in the target's space. For v it raises the
      high-noise steps to ``floor`` and also the lowest-noise ones (about ``gamma / SNR`` there: 0.004
      at t = 0 of the default schedule); docs/conditioning.md measures both.
    """
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.maximum(snr, torch.as_tensor(low, dtype=snr.dtype, device=snr.device)).clamp(max=gamma)
    prediction_type = scheduler.config.prediction_type
    # the prediction type first: reading a per-sample clamp on the device would wait for it every step
    if prediction_type == "epsilon" and bool(torch.any(torch.as_tensor(low) > 0)):
        raise ValueError("a lower SNR clamp needs prediction_type v_prediction or sample; for epsilon its weight low / SNR is unbounded")
    if prediction_type == "epsilon":
        # A zero-terminal-SNR schedule has SNR = 0 at t = T; min(SNR, gamma) / SNR -> 1 there.
        weights = torch.where(snr > 0, clipped / snr.clamp(min=1e-8), torch.ones_like(snr))
    elif prediction_type == "v_prediction":
        weights = clipped / (snr + 1)
    else:
        weights = clipped
    return weights.clamp(min=floor)


def snr_clamp_for(config: DiffusionConfig, captions: list[str], step: int, device: torch.device | str = "cpu") -> float | torch.Tensor:
    """The lower SNR clamp of :func:`min_snr_weights` for one batch: ``config.snr_clamp_low`` from optimizer
    step ``config.snr_clamp_start_step`` until ``config.snr_clamp_end_step`` (0 outside), and, with
    ``config.snr_clamp_captions``, only for the samples whose caption matches that pattern (one value per sample)."""
    if not config.snr_clamp_low or step < config.snr_clamp_start_step:
        return 0.0
    if config.snr_clamp_end_step is not None and step >= config.snr_clamp_end_step:
        return 0.0
    if config.snr_clamp_captions is None:
        return config.snr_clamp_low
    pattern = re.compile(config.snr_clamp_captions)
    return torch.tensor([config.snr_clamp_low if pattern.search(caption) else 0.0 for caption in captions], device=device)


@dataclass(frozen=True)
class TimestepSampling:
    """How training draws ``t``: ``uniform``, ``logit_normal`` with ``mean`` and ``std`` of the logit, or
    ``importance``: in proportion to min-SNR's weight (:func:`importance_sampled_timesteps`). ``low`` and
    ``high`` bound uniform ``t``, and the bands within it, to ``[low, high)`` (``high`` None: the schedule's end),
    for a denoiser that is an expert of one band of noise levels (Balaji et al. 2022, eDiff-I)."""

    kind: str = "uniform"
    mean: float = 0.0
    std: float = 1.0
    low: int = 0
    high: int | None = None
    high_band_start: int | None = None
    """With ``uniform``: draw ``t >= high_band_start`` with probability ``high_band_share`` instead of its
    uniform share (:func:`banded_timesteps`). None: no high band."""
    high_band_share: float = 0.5
    low_band_end: int | None = None
    """With ``uniform``: draw ``t < low_band_end`` with probability ``low_band_share`` instead of its uniform
    share (:func:`banded_timesteps`). None: no low band."""
    low_band_share: float = 0.2

    @property
    def bands(self) -> tuple[list[int], list[float]] | None:
        """The ``(starts, shares)`` of :func:`banded_timesteps` for the high and low bands set here (the band
        between them takes the rest of the probability), the first band starting at ``low`` and the last ending at
        ``high``; None when neither is set."""
        if self.high_band_start is None and self.low_band_end is None:
            return None
        starts, shares = [self.low], []
        if self.low_band_end is not None:
            starts.append(self.low_band_end)
            shares.append(self.low_band_share)
        if self.high_band_start is not None:
            starts.append(self.high_band_start)
            shares.append(self.high_band_share)
        shares.insert(1 if self.low_band_end is not None else 0, 1.0 - sum(shares))
        return starts, shares


def timestep_sampling_for(config: DiffusionConfig, step: int) -> TimestepSampling:
    """How optimizer step ``step`` draws its timesteps under ``config``: the bands of ``timestep_high_band_*`` and,
    from ``timestep_low_band_start_step`` until ``timestep_low_band_end_step``, ``timestep_low_band_*``; or the
    ``timestep_sampling`` distribution within ``timestep_range``."""
    low, high = config.timestep_range or (0, None)
    end_step = config.timestep_low_band_end_step
    low_band_on = (config.timestep_low_band_end is not None and step >= config.timestep_low_band_start_step
                   and (end_step is None or step < end_step))
    return TimestepSampling(
        config.timestep_sampling, config.timestep_mean, config.timestep_std, low=low, high=high,
        high_band_start=config.timestep_high_band_start, high_band_share=config.timestep_high_band_share,
        low_band_end=config.timestep_low_band_end if low_band_on else None, low_band_share=config.timestep_low_band_share,
    )


def sample_timesteps(
    num_train_timesteps: int,
    batch_size: int,
    sampling: TimestepSampling | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training timesteps: ``U{0, ..., T-1}`` (DDPM), or logit-normal: ``t = floor(T * sigmoid(n))``,
    ``n ~ N(mean, std^2)`` (Esser et al. 2024, "Scaling Rectified Flow Transformers", eq. 19), which
    with ``mean > 0`` concentrates the steps at high noise."""
    if sampling is None:
        return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device)
    if (sampling.low, sampling.high) != (0, None) and sampling.kind != "uniform":
        raise ValueError(f"a timestep range [{sampling.low}, {sampling.high}) needs uniform sampling, not {sampling.kind!r}")
    if sampling.kind == "uniform":
        high = num_train_timesteps if sampling.high is None else sampling.high
        if not 0 <= sampling.low < high <= num_train_timesteps:
            raise ValueError(f"timestep range [{sampling.low}, {high}) must lie within [0, {num_train_timesteps})")
        return torch.randint(sampling.low, high, (batch_size,), generator=generator, device=device)
    if sampling.kind == "logit_normal":
        logits = torch.randn((batch_size,), generator=generator, device=device) * sampling.std + sampling.mean
        return (torch.sigmoid(logits) * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    if sampling.kind == "importance":
        raise ValueError("importance-sampled timesteps depend on the loss weights: use importance_sampled_timesteps")
    raise ValueError(f"unknown timestep sampling {sampling.kind!r}; expected uniform, logit_normal or importance")


def banded_timesteps(
    num_train_timesteps: int,
    batch_size: int,
    starts: Sequence[int],
    shares: Sequence[float],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    *,
    end: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps drawn band by band, and each sample's density correction.

    The bands are ``[starts[k], starts[k + 1])``; the last ends at ``end`` (None: ``num_train_timesteps``), and
    together they cover ``[starts[0], end)``, the timesteps the denoiser is trained on (all of them when
    ``starts[0]`` is 0). Band ``k`` is drawn with probability ``shares[k]`` and ``t`` is uniform within it. The
    correction of a sample is its band's uniform share of the covered range over the share it was drawn with, so
    the corrected loss has the expectation of uniform ``t`` on that range (importance sampling, as in
    :func:`importance_sampled_timesteps`) while a band drawn more often has its part of the loss averaged over more
    samples, each with a smaller weight: the same mean gradient with less variance there. On the shapes default the
    high band's gradient is about half noise, large enough to share Adam's step size with every band under the SNR
    clamp (docs/conditioning.md, seventh and eighth rounds); a larger share of the batch quiets it. Kingma & Gao 2023, "Understanding Diffusion Objectives
    as the ELBO with Simple Data Augmentation": the timestep density is an importance-sampling distribution that
    leaves the weighted loss unchanged and sets the variance of its estimate. Written here because Diffusers'
    training scripts draw uniform ``t`` only.

    The random numbers are taken in one order (one uniform number per sample for its band, then one timestep per
    sample in each band, lowest band first), and the bands are matched to the uniform number from the highest
    down, so that two bands draw what :func:`high_band_timesteps` always drew.
    """
    starts, shares = list(starts), list(shares)
    if len(starts) != len(shares) or len(starts) < 2:
        raise ValueError(f"give one share per band and at least two bands, got starts {starts} and shares {shares}")
    end = num_train_timesteps if end is None else end
    if not 0 < end <= num_train_timesteps:
        raise ValueError(f"the last band's end must lie in (0, {num_train_timesteps}], got {end}")
    if starts[0] < 0 or any(not a < b for a, b in zip(starts, [*starts[1:], end])):
        raise ValueError(f"band starts must rise from 0 or more and stay below {end}, got {starts}")
    if any(not 0 < share < 1 for share in shares) or abs(sum(shares) - 1) > 1e-6:
        raise ValueError(f"each band's share must lie in (0, 1) and the shares must sum to 1, got {shares}")
    where = None if generator is None else generator.device
    draw = torch.rand((batch_size,), generator=generator, device=where)
    ends = [*starts[1:], end]
    covered = end - starts[0]
    in_band = [torch.randint(low, high, (batch_size,), generator=generator, device=where) for low, high in zip(starts, ends)]
    timesteps = torch.empty_like(in_band[0])
    correction = torch.empty((batch_size,), device=where)
    below = 0.0
    for k in reversed(range(len(starts))):
        mine = (draw >= below) & (draw < below + shares[k]) if k else draw >= below
        timesteps[mine] = in_band[k][mine]
        correction[mine] = (ends[k] - starts[k]) / covered / shares[k]
        below += shares[k]
    return timesteps.to(device), correction.to(device)


def high_band_timesteps(
    num_train_timesteps: int,
    batch_size: int,
    start: int,
    share: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`banded_timesteps` with two bands: ``t >= start`` drawn with probability ``share``."""
    if not 0 < start < num_train_timesteps:
        raise ValueError(f"the high band's start must lie in (0, {num_train_timesteps}), got {start}")
    if not 0 < share < 1:
        raise ValueError(f"the high band's share must lie in (0, 1), got {share}")
    return banded_timesteps(num_train_timesteps, batch_size, [0, start], [1 - share, share], generator, device)


def importance_sampled_timesteps(
    scheduler: DDPMScheduler,
    batch_size: int,
    snr_gamma: float | None,
    snr_weight_floor: float = 0.0,
    snr_clamp_low: float | torch.Tensor = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps drawn in proportion to their min-SNR weight ``w(t)``, and the weight each sample then takes:
    the mean of ``w`` over all timesteps, the same for every sample.

    The loss's expectation is that of uniform ``t`` weighted by ``w(t)`` (importance sampling:
    ``E_uniform[w(t) L(t)] = E_p[w(t) / (T p(t)) L(t)]`` with ``p(t) = w(t) / sum(w)``), but no sample of a
    batch is spent on a timestep the weighting all but ignores: with min-SNR-5 on a zero-terminal-SNR
    v schedule, uniform ``t`` gives an effective batch of about half its samples. Esser et al. 2024,
    "Scaling Rectified Flow Transformers", Sec. 3.1, read a weighting and a timestep density as one choice.
    """
    if snr_gamma is None:
        raise ValueError("importance-sampled timesteps follow min-SNR's weights; set snr_gamma")
    if isinstance(snr_clamp_low, torch.Tensor):
        raise ValueError("importance-sampled timesteps need one SNR clamp for the whole batch, not one per sample")
    table_device = generator.device if generator is not None else "cpu"
    all_timesteps = torch.arange(scheduler.config.num_train_timesteps, device=table_device)
    table = min_snr_weights(scheduler, all_timesteps, snr_gamma, snr_weight_floor, snr_clamp_low)
    timesteps = torch.multinomial(table, batch_size, replacement=True, generator=generator).to(device)
    return timesteps, table.mean().to(device).expand(batch_size)


class AdaptiveLossWeighting(torch.nn.Module):
    """A learned weight per noise level: EDM2's uncertainty-based loss weighting (Karras et al. 2024,
    "Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 5 and Appendix B.2,
    after Kendall et al. 2018).

    The loss of a sample at timestep ``t`` becomes ``L / exp(u(t)) + u(t)``, with ``u`` a linear layer
    over fixed random Fourier features of ``t / T``, trained together with the network. Its optimum is
    ``exp(u(t)) = E[L | t]``: every noise level then contributes the same share of the gradient,
    whatever its loss scale. Unweighted v-prediction lets the large high-noise losses (the
    background) dominate; min-SNR gives them almost no weight; this balances the two by measurement
    instead of by a fixed formula (docs/conditioning.md).

    Written here because Diffusers has no learned loss weighting. Not part of the exported pipeline.
    """

    def __init__(self, num_train_timesteps: int, num_features: int = 128, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        # EDM2's MPFourier: fixed frequencies and phases; cos(2 pi (f x + phi)) * sqrt(2) has unit variance.
        self.register_buffer("frequencies", torch.randn(num_features, generator=generator))
        self.register_buffer("phases", torch.rand(num_features, generator=generator))
        self.num_train_timesteps = num_train_timesteps
        self.linear = torch.nn.Linear(num_features, 1)
        torch.nn.init.zeros_(self.linear.weight)  # u = 0: the plain loss until it has learned otherwise
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """``u(t)``, the log of the expected loss at each timestep, one value per sample."""
        position = timesteps.float()[:, None] / self.num_train_timesteps
        features = torch.cos(2 * torch.pi * (position * self.frequencies + self.phases)) * 2**0.5
        return self.linear(features).squeeze(1)


@torch.no_grad()
def adaptive_weights(weighting: AdaptiveLossWeighting, num_bands: int = 4) -> dict[str, float]:
    """The learned loss weight ``1 / exp(u(t))`` at the middle of each band of t, for the logs."""
    width = weighting.num_train_timesteps // num_bands
    middles = torch.arange(num_bands, device=weighting.frequencies.device) * width + width // 2
    weights = (-weighting(middles)).exp().tolist()
    return {f"adaptive_weight/t{i * width}-{(i + 1) * width}": w for i, w in enumerate(weights)}


def foreground_weights(
    latents: torch.Tensor, timesteps: torch.Tensor, weight: float, until: int, threshold: float = 1.0
) -> torch.Tensor:
    """Per-latent weights of the denoising error, ``[batch, 1, height, width]``: ``1 + weight * m`` for the
    samples with ``t < until``, 1 elsewhere, where ``m`` in [0, 1] marks the latents that differ from the
    image's background.

    ``m = clamp(||x_0 - median(x_0)|| - threshold, 0, 1)``: the distance, over the channels, of each latent
    from the image's spatial median, in units of the latents' standard deviation (standardized latents). On
    data with plain backgrounds, such as the shapes data, the median is the background's latent, so ``m``
    marks the objects (on the shapes default about 13% of the latents, 0.09 on average). At low noise the
    layout is fixed and what is left to learn is each object's outline; a small object covers a few of an
    image's latents (256 on the shapes default), so its error is a small part of the plain mean. This
    weights it up. (No library weights the denoising loss by content; written here for that.)
    """
    with torch.no_grad():
        latents = latents.float()
        background = latents.flatten(2).median(dim=2).values[..., None, None]
        mask = ((latents - background).norm(dim=1, keepdim=True) - threshold).clamp(0, 1)
        low_noise = (timesteps < until).float().view(-1, 1, 1, 1)
        return 1 + weight * mask * low_noise


@dataclass
class DiffusionLoss:
    """The training loss of one batch, with the pieces a caller may want to log."""

    loss: torch.Tensor
    """What is minimized: the mean weighted error (with an adaptive weighting, ``L / exp(u) + u``)."""
    timesteps: torch.Tensor
    per_sample: torch.Tensor
    """Each sample's error, weighted by min-SNR and the foreground if on, before any adaptive weighting."""


def diffusion_loss(
    denoiser: DenoiserFn,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    generator: torch.Generator | None = None,
    timestep_sampling: TimestepSampling | None = None,
    snr_weight_floor: float = 0.0,
    adaptive_weighting: AdaptiveLossWeighting | None = None,
    snr_clamp_low: float | torch.Tensor = 0.0,
    snr_clamp_from_timestep: int = 0,
    snr_clamp_pool: int = 1,
    foreground_weight: float = 0.0,
    foreground_until: int | None = None,
) -> DiffusionLoss:
    """Monte-Carlo estimate of the denoising loss on a batch of clean latents ``x_0``.

    Draws ``t ~ U{0, ..., T-1}`` and ``eps`` per sample, forms ``x_t`` (DDPM eq. 4), and returns the
    (optionally min-SNR-weighted) mean squared error between ``denoiser(x_t, t, c)`` and the target of
    the scheduler's prediction type. The mean is taken in float32 whatever the model's dtype. With
    ``adaptive_weighting``, each sample's error ``L`` enters as ``L / exp(u(t)) + u(t)``
    (:class:`AdaptiveLossWeighting`). ``snr_clamp_low`` applies to the samples with ``t >=
    snr_clamp_from_timestep`` only (those of a high-noise expert, :mod:`latentdiff.models.experts`).
    With ``snr_clamp_pool`` > 1 the weight the clamp adds to min-SNR's multiplies the error averaged over
    ``snr_clamp_pool`` x ``snr_clamp_pool`` latents (a coarse-scale loss: Hoogeboom et al. 2023, Sec. 3.3).
    With ``foreground_weight``, the error of the latents that differ from the background counts up to
    ``1 + foreground_weight`` times in the samples with ``t < foreground_until`` (every sample if None;
    :func:`foreground_weights`), and ``per_sample`` is the weighted error.
    """
    batch_size = latents.shape[0]
    noise = sample_noise(latents, noise_offset, generator)
    density_correction = None
    importance = timestep_sampling is not None and timestep_sampling.kind == "importance"
    if importance:
        timesteps, weights = importance_sampled_timesteps(
            scheduler, batch_size, snr_gamma, snr_weight_floor, snr_clamp_low, generator, latents.device
        )
    elif timestep_sampling is not None and timestep_sampling.bands is not None:
        timesteps, density_correction = banded_timesteps(
            scheduler.config.num_train_timesteps, batch_size, *timestep_sampling.bands, generator, latents.device,
            end=timestep_sampling.high,
        )
    else:
        timesteps = sample_timesteps(
            scheduler.config.num_train_timesteps, batch_size, timestep_sampling, generator, latents.device
        )
    if not importance:
        weights = None
        if snr_clamp_from_timestep:
            snr_clamp_low = torch.where(timesteps >= snr_clamp_from_timestep, torch.as_tensor(snr_clamp_low), 0.0)
        if snr_gamma is not None:
            weights = min_snr_weights(scheduler, timesteps, snr_gamma, snr_weight_floor, snr_clamp_low)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    target = training_target(scheduler, latents, noise, timesteps)
    prediction = denoiser(noisy_latents, timesteps, encoder_hidden_states)
    error = prediction.float() - target.float()
    squared_error = error.square()
    if foreground_weight:
        until = scheduler.config.num_train_timesteps if foreground_until is None else foreground_until
        squared_error = squared_error * foreground_weights(latents, timesteps, foreground_weight, until)
    per_sample = squared_error.mean(dim=(1, 2, 3))
    if weights is not None and snr_clamp_pool > 1:
        unclamped = min_snr_weights(scheduler, timesteps, snr_gamma, snr_weight_floor)
        coarse = F.avg_pool2d(error, snr_clamp_pool, ceil_mode=True).square().mean(dim=(1, 2, 3))
        per_sample = per_sample * unclamped + coarse * (weights - unclamped)
    elif weights is not None:
        per_sample = per_sample * weights
    if density_correction is not None:
        per_sample = per_sample * density_correction
    if adaptive_weighting is None:
        return DiffusionLoss(loss=per_sample.mean(), timesteps=timesteps, per_sample=per_sample)
    log_expected = adaptive_weighting(timesteps).float()
    loss = (per_sample / log_expected.exp() + log_expected).mean()
    return DiffusionLoss(loss=loss, timesteps=timesteps, per_sample=per_sample)


@dataclass
class CaptionGap:
    """Error of the predicted clean latent with the true, the empty and a shuffled caption, by band of t.

    A model that reads its text has ``true < empty < shuffled``; the bands where ``empty - true`` is
    large are where the caption decides the image.
    """

    bands: list[tuple[int, int]]
    true: list[float]
    empty: list[float]
    shuffled: list[float]

    def logs(self, prefix: str = "caption_gap") -> dict[str, float]:
        """Flat scalars for the trackers, e.g. ``caption_gap/t750-1000/empty``."""
        logs = {}
        for (low, high), true, empty, shuffled in zip(self.bands, self.true, self.empty, self.shuffled):
            band = f"{prefix}/t{low}-{high}"
            logs.update({f"{band}/true": true, f"{band}/empty": empty, f"{band}/shuffled": shuffled})
        return logs

    def summary(self) -> str:
        """One line: ``t0-250 0.051/0.052/0.060 | ...`` (true / empty / shuffled)."""
        return " | ".join(
            f"t{low}-{high} {true:.4f}/{empty:.4f}/{shuffled:.4f}"
            for (low, high), true, empty, shuffled in zip(self.bands, self.true, self.empty, self.shuffled)
        )


def caption_gap_timesteps(num_train_timesteps: int, num_bands: int, per_band: int) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """``num_bands`` equal bands of ``[0, T)`` and ``per_band`` evenly spread timesteps in each."""
    edges = [round(i * num_train_timesteps / num_bands) for i in range(num_bands + 1)]
    bands = list(zip(edges[:-1], edges[1:]))
    timesteps = [
        low + int((j + 0.5) * (high - low) / per_band) for low, high in bands for j in range(per_band)
    ]
    return bands, torch.tensor(timesteps, dtype=torch.long)


@torch.no_grad()
def caption_gap(
    denoiser: DenoiserFn,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    true_states: torch.Tensor,
    empty_states: torch.Tensor,
    shuffled_states: torch.Tensor,
    noise: torch.Tensor,
    num_bands: int = 4,
) -> CaptionGap:
    """Measure how much the denoiser's ``x_0`` estimate depends on its caption, by noise level.

    ``latents`` (``[N, C, H, W]``, N a multiple of ``num_bands``) and ``noise`` are a fixed held
    batch; image ``i`` is noised at the ``i``-th timestep of :func:`caption_gap_timesteps`, so each
    band sees ``N / num_bands`` images at evenly spread ``t``. The same noisy latents are denoised
    three times, conditioned on ``true_states`` (each image's own caption), ``empty_states`` (the
    unconditional prompt) and ``shuffled_states`` (another image's caption); the mean squared error
    of :func:`predicted_clean_latents` against ``x_0`` is averaged per band.
    """
    num_images = latents.shape[0]
    if num_images % num_bands:
        raise ValueError(f"caption_gap needs a multiple of num_bands={num_bands} images, got {num_images}")
    bands, timesteps = caption_gap_timesteps(
        scheduler.config.num_train_timesteps, num_bands, num_images // num_bands
    )
    timesteps = timesteps.to(latents.device)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    errors = {}
    for name, states in (("true", true_states), ("empty", empty_states), ("shuffled", shuffled_states)):
        prediction = denoiser(noisy_latents, timesteps, states)
        clean = predicted_clean_latents(scheduler, noisy_latents, prediction, timesteps)
        per_image = (clean - latents.float()).pow(2).mean(dim=(1, 2, 3))
        errors[name] = per_image.view(num_bands, -1).mean(dim=1).tolist()
    return CaptionGap(bands=bands, **errors)

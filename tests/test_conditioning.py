"""The instruments of the conditioning research: caption gap, timestep sampling, latent standardization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.training_utils import compute_snr

from latentdiff.trainer.autoencoder import (
    AutoencoderForTraining,
    downsample,
    normalize_latents,
    reconstruction_loss,
    scale_equivariance_loss,
    vae_reconstructor,
)
from latentdiff.diffusion import (
    TimestepSampling,
    caption_gap,
    caption_gap_timesteps,
    predicted_clean_latents,
    sample_timesteps,
    training_target,
)


def _scheduler(prediction_type: str, zero_snr: bool = False) -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)


@pytest.mark.parametrize("prediction_type, zero_snr", [("epsilon", False), ("v_prediction", True), ("sample", False)])
def test_the_exact_target_gives_back_the_clean_latents(prediction_type, zero_snr):
    scheduler = _scheduler(prediction_type, zero_snr)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(6, 4, 8, 8, generator=generator), torch.randn(6, 4, 8, 8, generator=generator)
    # epsilon cannot recover x_0 at t = T - 1 of a schedule whose terminal SNR is ~0: stay below it there
    timesteps = torch.tensor([0, 10, 250, 500, 900, 999 if zero_snr or prediction_type == "sample" else 990])
    timesteps = timesteps[:6]
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = training_target(scheduler, latents, noise, timesteps)
    torch.testing.assert_close(predicted_clean_latents(scheduler, noisy, target, timesteps), latents, rtol=1e-4, atol=1e-4)
    # and a wrong prediction does not
    assert (predicted_clean_latents(scheduler, noisy, target + 0.1, timesteps) - latents).abs().max() > 1e-3


def test_caption_gap_is_zero_for_a_denoiser_that_ignores_its_text_and_positive_for_one_that_reads_it():
    scheduler = _scheduler("v_prediction", zero_snr=True)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(8, 4, 4, 4, generator=generator)
    noise = torch.randn(8, 4, 4, 4, generator=generator)
    # "text": each image's clean latent flattened, so a denoiser can read x_0 from its caption
    true_states = latents.flatten(1)[:, None, :]
    empty_states = torch.zeros_like(true_states)
    shuffled_states = true_states.roll(1, dims=0)

    def blind(x, t, states):
        return torch.zeros_like(x)

    gap = caption_gap(blind, scheduler, latents, true_states, empty_states, shuffled_states, noise)
    assert gap.bands == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    assert gap.true == gap.empty == gap.shuffled

    def reader(x, t, states):
        # v that maps x_t to the x_0 written in the caption: v = (sqrt(ab) x_t - x_0) / sqrt(1 - ab)
        alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        clean = states[:, 0, :].view_as(x)
        return (alpha_bar.sqrt() * x - clean) / (1 - alpha_bar).sqrt()

    gap = caption_gap(reader, scheduler, latents, true_states, empty_states, shuffled_states, noise)
    for true, empty, shuffled in zip(gap.true, gap.empty, gap.shuffled):
        assert true < 1e-8 < empty < shuffled
    assert "t750-1000" in gap.summary() and set(gap.logs()) >= {"caption_gap/t0-250/true", "caption_gap/t750-1000/shuffled"}

    with pytest.raises(ValueError, match="multiple of num_bands"):
        caption_gap(blind, scheduler, latents[:6], true_states[:6], empty_states[:6], shuffled_states[:6], noise[:6])


def test_caption_gap_timesteps_are_spread_inside_their_bands():
    bands, timesteps = caption_gap_timesteps(1000, 4, 4)
    assert bands == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    for index, (low, high) in enumerate(bands):
        inside = timesteps[index * 4 : (index + 1) * 4]
        assert ((inside >= low) & (inside < high)).all() and len(set(inside.tolist())) == 4


def test_logit_normal_timesteps_lean_to_high_noise_and_stay_in_range():
    generator = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(1000, 20000, None, generator)
    shifted = sample_timesteps(1000, 20000, TimestepSampling("logit_normal", mean=1.0, std=1.0), generator)
    assert 0 <= shifted.min() and shifted.max() <= 999 and shifted.dtype == torch.long
    assert abs(uniform.float().median().item() - 500) < 20
    # median of T * sigmoid(N(1, 1)) is T * sigmoid(1) = 731
    assert abs(shifted.float().median().item() - 731) < 20
    again = sample_timesteps(1000, 8, TimestepSampling("logit_normal", 1.0, 1.0), torch.Generator().manual_seed(3))
    assert torch.equal(again, sample_timesteps(1000, 8, TimestepSampling("logit_normal", 1.0, 1.0), torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        sample_timesteps(1000, 8, TimestepSampling("cosine"), generator)


def test_importance_sampled_timesteps_follow_the_min_snr_weight_and_keep_the_expected_loss():
    from latentdiff.diffusion import importance_sampled_timesteps, min_snr_weights

    scheduler = _scheduler("v_prediction", zero_snr=True)
    generator = torch.Generator().manual_seed(0)
    timesteps, weights = importance_sampled_timesteps(scheduler, 100_000, snr_gamma=5.0, generator=generator)
    table = min_snr_weights(scheduler, torch.arange(1000), gamma=5.0)
    assert timesteps.dtype == torch.long and 0 <= timesteps.min() and timesteps.max() <= 999
    torch.testing.assert_close(weights, table.mean().expand(100_000))  # one weight for every sample
    # the top band, which min-SNR weighs about 0, gets about no samples; uniform t gives it a fifth
    assert (timesteps >= 800).float().mean() < 0.01
    # the same expected weighted loss as uniform t with min-SNR weights, for any per-timestep loss
    loss_of_t = torch.linspace(2.0, 0.1, 1000) ** 2
    expected = (table * loss_of_t).mean()
    assert (weights * loss_of_t[timesteps]).mean().item() == pytest.approx(expected.item(), rel=0.02)
    with pytest.raises(ValueError, match="set snr_gamma"):
        importance_sampled_timesteps(scheduler, 8, snr_gamma=None)
    with pytest.raises(ValueError, match="use importance_sampled_timesteps"):
        sample_timesteps(1000, 8, TimestepSampling("importance"), generator)


def test_diffusion_loss_with_importance_sampling_weights_every_sample_by_the_mean_weight():
    from latentdiff.diffusion import diffusion_loss, importance_sampled_timesteps, sample_noise

    scheduler = _scheduler("v_prediction", zero_snr=True)
    latents = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    output = diffusion_loss(
        lambda x, t, c: torch.zeros_like(x), scheduler, latents, None, snr_gamma=5.0,
        generator=torch.Generator().manual_seed(2), timestep_sampling=TimestepSampling("importance"),
    )
    # the same draws, in the loss's order: the noise, then the timesteps
    generator = torch.Generator().manual_seed(2)
    noise = sample_noise(latents, 0.0, generator)
    timesteps, weights = importance_sampled_timesteps(scheduler, 16, 5.0, generator=generator)
    assert torch.equal(output.timesteps, timesteps)
    error = training_target(scheduler, latents, noise, timesteps).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(output.per_sample, error * weights)


def test_importance_sampling_is_refused_where_its_weights_are_not_one_function_of_t():
    from latentdiff.config import ConfigError, load_config

    base = ["diffusion.prediction_type=v_prediction", "diffusion.timestep_sampling=importance"]
    with pytest.raises(ConfigError, match="without diffusion.snr_gamma"):
        load_config(overrides=base)
    with pytest.raises(ConfigError, match="adaptive_loss_weighting"):
        load_config(overrides=[*base, "diffusion.snr_gamma=5", "diffusion.adaptive_loss_weighting=true"])
    assert load_config(overrides=[*base, "diffusion.snr_gamma=5"]).diffusion.timestep_sampling == "importance"


def test_a_high_band_share_draws_that_band_more_and_keeps_the_expected_loss():
    from latentdiff.diffusion import high_band_timesteps

    generator = torch.Generator().manual_seed(0)
    timesteps, correction = high_band_timesteps(1000, 100_000, start=700, share=0.6, generator=generator)
    high = timesteps >= 700
    assert timesteps.dtype == torch.long and 0 <= timesteps.min() and timesteps.max() <= 999
    assert high.float().mean().item() == pytest.approx(0.6, abs=0.01)  # uniform t: 0.3
    torch.testing.assert_close(correction[high], torch.full_like(correction[high], 0.3 / 0.6))
    torch.testing.assert_close(correction[~high], torch.full_like(correction[~high], 0.7 / 0.4))
    # uniform within each band, and the same expected loss as uniform t, for any per-timestep loss
    assert timesteps[high].float().mean().item() == pytest.approx(849.5, abs=2)
    loss_of_t = torch.linspace(2.0, 0.1, 1000) ** 2
    assert (correction * loss_of_t[timesteps]).mean().item() == pytest.approx(loss_of_t.mean().item(), rel=0.02)
    with pytest.raises(ValueError, match=r"share must lie in \(0, 1\), got 1.0"):
        high_band_timesteps(1000, 8, start=700, share=1.0)


def test_a_low_band_beside_the_high_band_draws_three_bands_and_keeps_the_expected_loss():
    from latentdiff.diffusion import banded_timesteps

    sampling = TimestepSampling("uniform", high_band_start=700, high_band_share=0.5, low_band_end=250, low_band_share=0.3)
    starts, shares = sampling.bands
    assert starts == [0, 250, 700] and shares == pytest.approx([0.3, 0.2, 0.5])
    timesteps, correction = banded_timesteps(1000, 100_000, starts, shares, torch.Generator().manual_seed(0))
    bands = [timesteps < 250, (timesteps >= 250) & (timesteps < 700), timesteps >= 700]
    for band, share, uniform_share in zip(bands, shares, (0.25, 0.45, 0.3)):
        assert band.float().mean().item() == pytest.approx(share, abs=0.01)
        torch.testing.assert_close(correction[band], torch.full_like(correction[band], uniform_share / share))
    loss_of_t = torch.linspace(2.0, 0.1, 1000) ** 2
    assert (correction * loss_of_t[timesteps]).mean().item() == pytest.approx(loss_of_t.mean().item(), rel=0.02)
    # a low band alone: two bands, the rest of the probability above it
    assert TimestepSampling("uniform", low_band_end=250, low_band_share=0.4).bands == ([0, 250], [0.4, 0.6])
    assert TimestepSampling("uniform").bands is None
    with pytest.raises(ValueError, match="shares must sum to 1"):
        banded_timesteps(1000, 8, [0, 250, 700], [0.3, 0.3, 0.3])
    with pytest.raises(ValueError, match="band starts must rise from 0 or more"):
        banded_timesteps(1000, 8, [0, 700, 250], [0.3, 0.2, 0.5])


def test_timesteps_no_stage_trains_are_named_with_the_setting_that_covers_them(tmp_path):
    from latentdiff.config import load_config, timesteps_left_untrained

    def untrained(**overrides):
        return timesteps_left_untrained(load_config(overrides={"model.preset": "tiny", **overrides}))

    assert untrained() == []
    assert untrained(**{"diffusion.timestep_range": [250, 1000]}) == [(0, 250, "low_noise_expert.max_steps")]
    assert untrained(**{"diffusion.timestep_range": [250, 1000], "low_noise_expert.max_steps": 400}) == []
    assert untrained(**{"diffusion.timestep_range": [0, 700]}) == [(700, 1000, "model.high_noise_pretrained")]
    assert untrained(**{"diffusion.timestep_range": [100, 700]}) == [
        (0, 100, "low_noise_expert.max_steps"), (700, 1000, "model.high_noise_pretrained")]
    (tmp_path / "unet").mkdir()  # the low-noise expert stage's own run: the frozen expert takes t >= 250
    assert untrained(**{"diffusion.timestep_range": [0, 250], "model.high_noise_boundary": 250,
                        "model.high_noise_pretrained": str(tmp_path / "unet")}) == []


def test_bands_inside_a_timestep_range_cover_only_the_range_and_keep_its_expected_loss():
    """Stage 2 above a low-noise expert's boundary: t < 250 is never drawn, the high band keeps its share, and
    the corrected loss has the expectation of uniform t on [250, 1000)."""
    from latentdiff.config import load_config
    from latentdiff.diffusion import banded_timesteps, diffusion_loss, timestep_sampling_for

    config = load_config(overrides=["diffusion.timestep_range=[250,1000]", "diffusion.timestep_high_band_start=700",
                                    "diffusion.timestep_high_band_share=0.5"])
    sampling = timestep_sampling_for(config.diffusion, step=0)
    starts, shares = sampling.bands
    assert starts == [250, 700] and shares == pytest.approx([0.5, 0.5])
    timesteps, correction = banded_timesteps(1000, 100_000, starts, shares, torch.Generator().manual_seed(0),
                                             end=sampling.high)
    assert timesteps.min().item() == 250 and timesteps.max().item() == 999
    high = timesteps >= 700
    assert high.float().mean().item() == pytest.approx(0.5, abs=0.01)
    torch.testing.assert_close(correction[high], torch.full_like(correction[high], (300 / 750) / 0.5))
    torch.testing.assert_close(correction[~high], torch.full_like(correction[~high], (450 / 750) / 0.5))
    loss_of_t = torch.linspace(2.0, 0.1, 1000) ** 2
    assert (correction * loss_of_t[timesteps]).mean().item() == pytest.approx(loss_of_t[250:].mean().item(), rel=0.02)
    # the loss draws through the same sampling: no sample below the range
    output = diffusion_loss(lambda x, t, c: torch.zeros_like(x), _scheduler("v_prediction", zero_snr=True),
                            torch.randn(256, 4, 8, 8), None, generator=torch.Generator().manual_seed(2),
                            timestep_sampling=sampling)
    assert output.timesteps.min().item() >= 250
    # a range that ends below the schedule's end: the last band ends there
    timesteps, _ = banded_timesteps(1000, 4096, [0, 100], [0.5, 0.5], torch.Generator().manual_seed(1), end=500)
    assert timesteps.max().item() < 500 and (timesteps >= 100).float().mean().item() == pytest.approx(0.5, abs=0.03)
    with pytest.raises(ValueError, match=r"the last band's end must lie in \(0, 1000\], got 1200"):
        banded_timesteps(1000, 8, [0, 700], [0.5, 0.5], end=1200)
    with pytest.raises(ValueError, match="band starts must rise from 0 or more and stay below 600, got \\[0, 700\\]"):
        banded_timesteps(1000, 8, [0, 700], [0.5, 0.5], end=600)


def test_two_bands_draw_exactly_what_the_high_band_share_always_drew():
    """The high band alone keeps its draws, so that runs of the default are repeatable across versions."""
    from latentdiff.diffusion import banded_timesteps

    generator = torch.Generator().manual_seed(3)
    timesteps, correction = banded_timesteps(1000, 512, [0, 700], [0.5, 0.5], generator)
    generator = torch.Generator().manual_seed(3)
    in_high = torch.rand((512,), generator=generator) < 0.5
    low = torch.randint(0, 700, (512,), generator=generator)
    high = torch.randint(700, 1000, (512,), generator=generator)
    assert torch.equal(timesteps, torch.where(in_high, high, low))
    torch.testing.assert_close(correction, torch.where(in_high, 0.3 / 0.5, 0.7 / 0.5))


def test_diffusion_loss_with_a_high_band_share_corrects_each_samples_weight():
    from latentdiff.diffusion import diffusion_loss, high_band_timesteps, min_snr_weights, sample_noise

    scheduler = _scheduler("v_prediction", zero_snr=True)
    latents = torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sampling = TimestepSampling("uniform", high_band_start=800, high_band_share=0.5)
    output = diffusion_loss(
        lambda x, t, c: torch.zeros_like(x), scheduler, latents, None, snr_gamma=5.0, snr_clamp_low=0.1,
        generator=torch.Generator().manual_seed(2), timestep_sampling=sampling,
    )
    # the same draws, in the loss's order: the noise, then the timesteps
    generator = torch.Generator().manual_seed(2)
    noise = sample_noise(latents, 0.0, generator)
    timesteps, correction = high_band_timesteps(1000, 32, 800, 0.5, generator=generator)
    assert torch.equal(output.timesteps, timesteps) and 0 < (timesteps >= 800).sum() < 32
    error = training_target(scheduler, latents, noise, timesteps).pow(2).mean(dim=(1, 2, 3))
    weights = min_snr_weights(scheduler, timesteps, 5.0, low=0.1)
    torch.testing.assert_close(output.per_sample, error * weights * correction)


def test_a_high_band_share_is_refused_where_it_cannot_apply():
    from latentdiff.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="'diffusion.timestep_high_band_start'.*timestep between 0 and 1000"):
        load_config(overrides=["diffusion.timestep_high_band_start=1000"])
    with pytest.raises(ConfigError, match="'diffusion.timestep_high_band_share': expected a number in \\(0, 1\\)"):
        load_config(overrides=["diffusion.timestep_high_band_start=700", "diffusion.timestep_high_band_share=1"])
    with pytest.raises(ConfigError, match="timestep_sampling other than uniform"):
        load_config(overrides=["diffusion.timestep_high_band_start=700", "diffusion.timestep_sampling=logit_normal"])
    with pytest.raises(ConfigError, match="'train.band_boundary'"):
        load_config(overrides=["diffusion.timestep_high_band_start=700", "train.band_boundary=700"])
    config = load_config(overrides=["diffusion.timestep_high_band_start=700", "diffusion.timestep_high_band_share=0.6"])
    assert (config.diffusion.timestep_high_band_start, config.diffusion.timestep_high_band_share) == (700, 0.6)
    high = ["diffusion.timestep_high_band_start=700", "diffusion.timestep_high_band_share=0.5"]
    with pytest.raises(ConfigError, match="'diffusion.timestep_low_band_end'.*between 0 and 700.*high_band_start"):
        load_config(overrides=[*high, "diffusion.timestep_low_band_end=700"])
    with pytest.raises(ConfigError, match="'diffusion.timestep_low_band_share'.*below 0.5"):
        load_config(overrides=[*high, "diffusion.timestep_low_band_end=250", "diffusion.timestep_low_band_share=0.5"])
    with pytest.raises(ConfigError, match="'diffusion.timestep_low_band_end'.*timestep_sampling other than uniform"):
        load_config(overrides=["diffusion.timestep_low_band_end=250", "diffusion.timestep_sampling=logit_normal"])
    with pytest.raises(ConfigError, match="'train.band_boundary'"):
        load_config(overrides=["diffusion.timestep_low_band_end=250", "train.band_boundary=700"])
    config = load_config(overrides=[*high, "diffusion.timestep_low_band_end=250", "diffusion.timestep_low_band_share=0.3"])
    assert (config.diffusion.timestep_low_band_end, config.diffusion.timestep_low_band_share) == (250, 0.3)
    # with a timestep range, the bands must lie inside it
    in_range = ["diffusion.timestep_range=[250,1000]"]
    with pytest.raises(ConfigError, match=r"'diffusion.timestep_high_band_start'.*inside diffusion.timestep_range=\[250, 1000\]"):
        load_config(overrides=[*in_range, "diffusion.timestep_high_band_start=200"])
    with pytest.raises(ConfigError, match="'diffusion.timestep_low_band_end'.*between 250 and 700"):
        load_config(overrides=[*in_range, *high, "diffusion.timestep_low_band_end=200"])
    config = load_config(overrides=[*in_range, *high, "diffusion.timestep_low_band_end=400"])
    assert (config.diffusion.timestep_range, config.diffusion.timestep_low_band_end) == ((250, 1000), 400)
    # stage 2 above a low-noise expert: no gap between its range and the expert's boundary
    with pytest.raises(ConfigError, match=r"'diffusion.timestep_range'.*at or below low_noise_expert.boundary=250"):
        load_config(overrides=["diffusion.timestep_range=[300,1000]", "low_noise_expert.max_steps=10",
                               "low_noise_expert.boundary=250"])
    load_config(overrides=["diffusion.timestep_range=[250,1000]", "low_noise_expert.max_steps=10",
                           "low_noise_expert.boundary=250"])
    with pytest.raises(ConfigError, match="'diffusion.timestep_low_band_start_step': expected 0 without diffusion.timestep_low_band_end"):
        load_config(overrides=[*high, "diffusion.timestep_low_band_start_step=100"])
    with pytest.raises(ConfigError, match="'diffusion.timestep_low_band_start_step'"):
        load_config(overrides=[*high, "diffusion.timestep_low_band_end=250", "diffusion.timestep_low_band_start_step=-1"])
    with pytest.raises(ConfigError, match="'diffusion.timestep_low_band_end_step': expected null without diffusion.timestep_low_band_end"):
        load_config(overrides=[*high, "diffusion.timestep_low_band_end_step=100"])
    with pytest.raises(ConfigError, match="'diffusion.timestep_low_band_end_step': expected null or more than "
                                          "diffusion.timestep_low_band_start_step=100"):
        load_config(overrides=[*high, "diffusion.timestep_low_band_end=250", "diffusion.timestep_low_band_start_step=100",
                               "diffusion.timestep_low_band_end_step=100"])


def test_the_low_band_is_drawn_between_its_start_and_end_steps():
    from latentdiff.config import load_config
    from latentdiff.diffusion import timestep_sampling_for

    config = load_config(overrides=[
        "diffusion.timestep_high_band_start=700", "diffusion.timestep_high_band_share=0.5",
        "diffusion.timestep_low_band_end=250", "diffusion.timestep_low_band_share=0.3",
        "diffusion.timestep_low_band_start_step=1000", "diffusion.timestep_low_band_end_step=1700",
    ]).diffusion
    without_low_band = ([0, 700], [0.5, 0.5])
    assert timestep_sampling_for(config, 0).bands == without_low_band
    assert timestep_sampling_for(config, 999).bands == without_low_band
    for step in (1000, 1699):
        starts, shares = timestep_sampling_for(config, step).bands
        assert starts == [0, 250, 700] and shares == pytest.approx([0.3, 0.2, 0.5])
    assert timestep_sampling_for(config, 1700).bands == without_low_band
    # without a low band: the rest of the sampling (range, distribution) carried over
    config = load_config(overrides=["diffusion.timestep_range=[700,1000]"]).diffusion
    sampling = timestep_sampling_for(config, 0)
    assert (sampling.kind, sampling.low, sampling.high, sampling.bands) == ("uniform", 700, 1000, None)


def test_normalized_latents_are_standard_and_decode_as_before():
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8).eval()
    # shift and stretch the latent channels, as an autoencoder trained from scratch does
    with torch.no_grad():
        vae.quant_conv.bias[:4] += torch.tensor([2.0, -1.0, 0.5, -3.0])
        vae.quant_conv.weight[:4] *= torch.tensor([3.0, 0.5, 1.0, 2.0]).view(-1, 1, 1, 1)
    reference = AutoencoderKL.from_config(vae.config)
    reference.load_state_dict(vae.state_dict())
    images = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, std = normalize_latents(vae, images.split(16), torch.Generator().manual_seed(2))
    assert vae.config.scaling_factor == 1.0 and len(mean) == len(std) == 4
    with torch.no_grad():
        posterior, before = vae.encode(images).latent_dist, reference.encode(images).latent_dist
        np.testing.assert_allclose(posterior.mean.mean(dim=(0, 2, 3)).numpy(), 0, atol=0.05)
        np.testing.assert_allclose(posterior.sample(torch.Generator().manual_seed(3)).std(dim=(0, 2, 3)).numpy(), 1, atol=0.1)
        # the same posterior, standardized: z' = (z - mu) / sigma, and decoding z' is decoding z
        mu, sigma = torch.tensor(mean).view(1, -1, 1, 1).float(), torch.tensor(std).view(1, -1, 1, 1).float()
        torch.testing.assert_close(posterior.mean, (before.mean - mu) / sigma, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(posterior.std, before.std / sigma, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(vae.decode(posterior.mean).sample, reference.decode(before.mean).sample, rtol=1e-4, atol=1e-4)


def test_vae_reconstructor_encodes_and_decodes_uint8_images():
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8).eval()
    with torch.no_grad():  # decoder outputs far outside [-1, 1], so that the conversion has to clip
        vae.decoder.conv_out.weight *= 50
    images = np.random.default_rng(0).integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    latents = []
    reconstructed = vae_reconstructor(vae, batch_size=2, on_latents=latents.append)(images)  # three chunks
    assert reconstructed.dtype == np.uint8 and reconstructed.shape == images.shape
    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        posterior_mean = vae.encode(pixels).latent_dist.mode()
        decoded = vae.decode(posterior_mean).sample
    assert decoded.abs().max() > 2
    expected = ((decoded.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    assert np.abs(reconstructed.astype(np.float32) - expected).max() <= 1.0
    assert [len(chunk) for chunk in latents] == [2, 2, 1]
    torch.testing.assert_close(torch.cat(latents), posterior_mean, rtol=1e-4, atol=1e-4)


def test_scale_equivariance_decodes_the_downsampled_latent_and_trains_the_whole_autoencoder():
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    *_, downscaled = AutoencoderForTraining(vae)(images)
    assert downscaled is None  # off unless asked for
    reconstructions, mean, _, downscaled = AutoencoderForTraining(vae, scale_equivariance_factor=2)(
        images, torch.Generator().manual_seed(1))
    assert reconstructions.shape == images.shape and mean.shape == (2, 4, 8, 8) and downscaled.shape == (2, 3, 8, 8)
    # the target is the image downsampled by the same factor, with antialiasing (a plain image stays plain)
    plain = torch.full((1, 3, 16, 16), 0.25)
    torch.testing.assert_close(downsample(plain, 2), torch.full((1, 3, 8, 8), 0.25))
    loss = scale_equivariance_loss(images, downscaled, 2, "mse")
    torch.testing.assert_close(loss, reconstruction_loss(downsample(images, 2), downscaled, "mse"))
    loss.backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0 and vae.decoder.conv_out.weight.grad.abs().sum() > 0


def test_contrastive_model_starts_from_the_text_encoder_and_gives_it_back():
    from transformers import CLIPTextConfig, CLIPTextModel

    from latentdiff.config import TextTrainConfig
    from latentdiff.trainer.text_pretraining import build_contrastive_model, retrieval_accuracy, text_encoder_of

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, max_position_embeddings=16)).eval()
    model = build_contrastive_model(text_encoder, TextTrainConfig(image_encoder_width=32, image_encoder_layers=1,
                                                                  projection_dim=16), image_size=32).eval()
    ids = torch.randint(0, 1000, (3, 16))
    with torch.no_grad():
        # the text tower is the text encoder, weights included
        torch.testing.assert_close(model.text_model(ids).last_hidden_state, text_encoder(ids).last_hidden_state)
        out = model(input_ids=ids, pixel_values=torch.randn(3, 3, 32, 32), return_loss=True)
    assert out.loss.ndim == 0 and out.logits_per_text.shape == (3, 3)
    copied = text_encoder_of(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(copied(ids).last_hidden_state, text_encoder(ids).last_hidden_state)
    # retrieval: a caption counts as found when the best image is its own, or one with the same caption
    logits = torch.tensor([[2.0, 1.0, 0.0], [3.0, 0.0, 1.0], [0.0, 1.0, 2.0]])
    assert retrieval_accuracy(logits, ["a", "b", "c"]).item() == pytest.approx(2 / 3)
    assert retrieval_accuracy(logits, ["a", "a", "c"]).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="patch_size"):
        build_contrastive_model(text_encoder, TextTrainConfig(image_encoder_patch_size=5), image_size=32)
    # freeze_embeddings: the token and position embeddings are frozen, the layers and the vision tower are not
    frozen = build_contrastive_model(text_encoder, TextTrainConfig(image_encoder_width=32, image_encoder_layers=1,
                                                                   projection_dim=16, freeze_embeddings=True), 32)
    trainable = {name for name, parameter in frozen.named_parameters() if parameter.requires_grad}
    assert not any(name.startswith("text_model.embeddings.") for name in trainable)
    assert any(name.startswith("text_model.encoder.") for name in trainable)
    assert any(name.startswith("vision_model.") for name in trainable) and "logit_scale" in trainable


def test_contrastive_loss_is_clips_and_takes_hard_negatives_on_the_text_side():
    from transformers import CLIPTextConfig, CLIPTextModel

    from latentdiff.config import TextTrainConfig
    from latentdiff.trainer.text_pretraining import build_contrastive_model, contrastive_loss, hard_negative_accuracy

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, max_position_embeddings=16))
    model = build_contrastive_model(text_encoder, TextTrainConfig(image_encoder_width=32, image_encoder_layers=1,
                                                                  projection_dim=16), image_size=32).eval()
    ids, pixels = torch.randint(0, 1000, (5, 16)), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        paired = model(input_ids=ids[:3], pixel_values=pixels, return_loss=True)
        with_negatives = model(input_ids=ids, pixel_values=pixels)
    # without extra captions it is CLIPModel's own loss
    torch.testing.assert_close(contrastive_loss(paired.logits_per_image, paired.logits_per_text), paired.loss)
    assert with_negatives.logits_per_image.shape == (3, 5)
    # extra captions enter the images' side only: the more an image likes a false caption, the higher the loss
    logits = paired.logits_per_image
    unlikely, likely = (torch.cat([logits, torch.full((3, 2), value)], dim=1) for value in (-1e4, 1e4))
    torch.testing.assert_close(contrastive_loss(unlikely, unlikely.T), paired.loss)
    assert contrastive_loss(likely, likely.T) > paired.loss + 1e3
    # a negative counts as told apart when its image scores its own caption higher
    logits = torch.tensor([[5.0, 0.0, 4.0, 6.0], [0.0, 5.0, 1.0, 1.0]])
    assert hard_negative_accuracy(logits, owners=[0, 0]).item() == pytest.approx(0.5)   # 4 < 5 (told), 6 > 5 (not)
    assert hard_negative_accuracy(logits, owners=[1, 0]).item() == pytest.approx(0.5)   # 1 < 5 (told), 6 > 5 (not)
    assert hard_negative_accuracy(logits, owners=[1, 1]).item() == pytest.approx(1.0)


def test_the_hard_negative_probe_sorts_place_negatives_by_what_they_move():
    from latentdiff.testing import load_bench_script

    import random

    script = load_bench_script("hard_negative_probe")
    kind = script.negative_kind
    caption = "a red circle at the top left and a blue square in the center"
    assert kind(caption, "place", "a red circle at the top right and a blue square in the center") == "column"
    assert kind(caption, "place", "a red circle at the top left and a blue square at the bottom") == "row"
    assert kind(caption, "place", "a red circle at the bottom right and a blue square in the center") == "row+column"
    assert kind("a red circle above a blue square", "place", "a red circle below a blue square") == "relation"
    assert kind(caption, "binding", "a blue circle at the top left and a red square in the center") == "binding"
    # the control changes one color word (and its article) and nothing else
    from latentdiff.data.shapes import COLORS

    for seed in range(8):
        article, color, rest = script.color_changed("a red circle and an orange square", random.Random(seed)).split(" ", 2)
        assert rest == "circle and an orange square" and color in set(COLORS) - {"red"}
        assert article == ("an" if color == "orange" else "a")
    assert script.color_changed("a circle", random.Random(0)) is None
    # the count negative exchanges "two" and "three", first count only, and leaves captions without one
    assert script.count_changed("two blue circles") == "three blue circles"
    assert script.count_changed("three red squares and two green circles") == "two red squares and two green circles"
    assert script.count_changed("a red circle") is None
    assert kind("two blue circles", "count", "three blue circles") == "count"


def test_a_zero_initialized_text_layer_starts_as_the_layer_free_encoder_and_then_learns():
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    from latentdiff.config import ConfigError, ModelConfig, TextEncoderConfig, load_config
    from latentdiff.models import build_text_encoder

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    encoder = build_text_encoder(ModelConfig(text_encoder=TextEncoderConfig(zero_init_residual=True, **text)))
    ids = torch.randint(0, 1000, (3, 16))
    states = encoder(ids, output_hidden_states=True).hidden_states
    for layer_output in states[1:]:  # every layer passes its input through unchanged ...
        torch.testing.assert_close(layer_output, states[0])
    encoder(ids).last_hidden_state.square().sum().backward()
    layer = next(module for module in encoder.modules() if isinstance(module, CLIPEncoderLayer))
    # ... and its zeroed projections still get a gradient, so the layer grows in
    assert layer.self_attn.out_proj.weight.grad.abs().sum() > 0 and layer.mlp.fc2.weight.grad.abs().sum() > 0
    torch.manual_seed(0)
    plain = build_text_encoder(ModelConfig(text_encoder=TextEncoderConfig(**text)))
    assert next(m for m in plain.modules() if isinstance(m, CLIPEncoderLayer)).mlp.fc2.weight.abs().sum() > 0  # the default keeps transformers' init
    with pytest.raises(ConfigError, match="model.text_encoder.zero_init_residual.*pretrained or OpenCLIP"):
        load_config(None, ["model.text_encoder.zero_init_residual=true", "model.text_encoder.pretrained=some/clip"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.text_encoder.kind=open_clip"], "word_embeddings_in_context.*OpenCLIP"),
        (["model.text_encoder.num_hidden_layers=0"], "word_embeddings_in_context.*num_hidden_layers=0 and no token mixing"),
    ],
)
def test_word_embeddings_in_context_needs_a_clip_encoder_with_layers(overrides, match):
    from latentdiff.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.text_encoder.word_embeddings_in_context=true", *overrides])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.text_encoder.word_path_dropout=0.2"], "word_path_dropout.*word_embeddings_in_context is true"),
        (["model.text_encoder.word_embeddings_in_context=true", "model.text_encoder.word_path_dropout=0.6"],
         r"word_path_dropout.*\[0, 0.5\], got 0.6"),
        (["model.text_encoder.word_embeddings_in_context=true", "model.text_encoder.word_path_dropout=0.2",
          "model.text_encoder.train=false"], "word_path_dropout.*train=false"),
    ],
)
def test_word_path_dropout_config_errors(overrides, match):
    from latentdiff.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.text_encoder.num_hidden_layers=1", *overrides])


@pytest.mark.parametrize("axis", ["features", "tokens"])
def test_word_path_dropout_zeroes_one_path_per_caption_in_training_only(axis):
    """p = 0.5: every training caption loses exactly one path, each path about half the time; eval mode keeps both."""
    from latentdiff.config import ModelConfig, TextEncoderConfig
    from latentdiff.models.builders import build_text_encoder

    text = TextEncoderConfig(num_hidden_layers=1, word_embeddings_in_context=True, word_embeddings_axis=axis,
                             word_path_dropout=0.5, max_position_embeddings=8)
    torch.manual_seed(0)
    encoder = build_text_encoder(ModelConfig(text_encoder=text))
    ids = torch.randint(1, 1000, (64, 8))
    with torch.no_grad():
        kept = encoder.eval()(ids)[0]
        dropped = encoder.train()(ids)[0]
    dim, size = (-1, 128) if axis == "features" else (-2, 8)
    words_zero, states_zero = (
        (part == 0).flatten(1).all(dim=1) for part in dropped.split([size, size], dim=dim)
    )
    assert torch.equal(words_zero, ~states_zero)  # exactly one path per caption
    assert 16 <= int(words_zero.sum()) <= 48
    kept_words, kept_states = kept.split([size, size], dim=dim)
    expected = torch.cat([kept_words * ~words_zero[:, None, None], kept_states * ~states_zero[:, None, None]], dim=dim)
    torch.testing.assert_close(dropped, expected)  # the path that is kept is the eval-mode one


@pytest.mark.parametrize("overrides", [
    [],
    ["model.text_encoder.word_embeddings_in_context=true"],  # along the features
])
def test_word_path_own_projection_needs_the_tokens_axis(overrides):
    from transformers import CLIPTextConfig

    from latentdiff import CLIPTextModelWithWordEmbeddings
    from latentdiff.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="word_path_own_projection.*word_embeddings_axis is 'tokens'"):
        load_config(None, ["model.text_encoder.num_hidden_layers=1", "model.text_encoder.word_path_own_projection=true", *overrides])
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                            word_path_own_projection=True)  # fmt: skip
    with pytest.raises(ValueError, match="word_path_own_projection is true with word_embeddings_axis 'features'"):
        CLIPTextModelWithWordEmbeddings(config)


def test_word_embeddings_axis_needs_the_word_path_and_a_known_axis():
    from latentdiff.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="word_embeddings_axis.*word_embeddings_in_context is true"):
        load_config(None, ["model.text_encoder.word_embeddings_axis=tokens"])
    with pytest.raises(ConfigError, match="word_embeddings_axis.*'features', 'tokens'"):
        load_config(None, ["model.text_encoder.word_embeddings_in_context=true", "model.text_encoder.word_embeddings_axis=sequence"])


@pytest.mark.slow
def test_text_stage_feeds_stage_two(tmp_path):
    """train_text.py writes a text encoder that train_ldm.py loads, frozen and cached, with a 32-token context."""
    from test_training import TRAIN_LDM, TRAIN_VAE, run_script, run_script_here
    from transformers import CLIPTextModel, CLIPTokenizer

    train_text = str(Path(TRAIN_LDM).with_name("train_text.py"))
    common = [f"output_dir={tmp_path}", "model.text_encoder.contrastive_pretraining=true",
              "model.text_encoder.max_position_embeddings=32"]
    status, stdout, _ = run_script_here(train_text, f"output_dir={tmp_path}")
    assert status == 0 and "nothing to do" in stdout and not (tmp_path / "text_encoder").exists()
    run_script(TRAIN_VAE, *common)
    status, _, stderr = run_script_here(TRAIN_LDM, *common)
    assert status == 2 and "run training/train_text.py" in stderr
    run_script(train_text, *common, "text_train.max_steps=3", "text_train.batch_size=16", "text_train.checkpointing_steps=2",
               "text_train.hard_negatives=true")
    assert sorted(p.name for p in (tmp_path / "text_stage" / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    pretrained = CLIPTextModel.from_pretrained(tmp_path / "text_encoder")
    run_script(TRAIN_LDM, *common, "model.text_encoder.train=false", "train.cache=true", "train.max_steps=2")
    exported = CLIPTextModel.from_pretrained(tmp_path / "pipeline" / "text_encoder")
    for name, tensor in pretrained.state_dict().items():
        assert torch.equal(tensor, exported.state_dict()[name]), name
    assert CLIPTokenizer.from_pretrained(tmp_path / "pipeline" / "tokenizer").model_max_length == 32
    # the hard-negative probe reads the stage's last checkpoint (text and vision towers)
    from latentdiff.testing import load_bench_script

    shares = load_bench_script("hard_negative_probe").probe(str(tmp_path), samples=8, seed=0)
    assert sum(count for _, count in shares.values()) > 0
    assert all(0.0 <= share <= 1.0 for share, count in shares.values() if count)


def test_normalize_vae_script_writes_a_standardized_copy(tmp_path, monkeypatch):
    import sys

    from latentdiff.testing import load_bench_script

    script = load_bench_script("normalize_vae")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    with torch.no_grad():
        vae.quant_conv.bias[:4] += torch.tensor([2.0, -1.0, 0.5, -3.0])
    vae.save_pretrained(tmp_path / "vae")
    monkeypatch.setattr(sys, "argv", ["normalize_vae.py", str(tmp_path / "vae"), str(tmp_path / "vae_norm"),
                                      "--samples", "32", "--resolution", "32", "--batch-size", "16"])
    script.main()
    normalized = AutoencoderKL.from_pretrained(tmp_path / "vae_norm").eval()
    assert normalized.config.scaling_factor == 1.0
    images = script.make_shapes_dataset(32, seed=0, image_size=32, progress_bar=False)["image"]
    pixels = torch.from_numpy(np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images]))
    with torch.no_grad():
        means = normalized.encode(pixels.permute(0, 3, 1, 2) / 127.5 - 1).latent_dist.mean.mean(dim=(0, 2, 3))
    np.testing.assert_allclose(means.numpy(), 0, atol=0.05)


def test_attribute_sensitivity_is_zero_for_a_unet_that_cannot_read_text(tmp_path):
    from latentdiff.pipelines import LatentPipeline
    from latentdiff.testing import load_bench_script, tiny_components

    script = load_bench_script("attribute_sensitivity")
    pipeline = LatentPipeline(**tiny_components(seed=0))
    pipeline.save_pretrained(tmp_path / "reads")
    reads = script.measure(str(tmp_path / "reads"), scenes=4, seed=0, timesteps=(900, 100))
    assert set(reads) == {"caption", *script.ATTRIBUTES, "binding", "count", "relation"}
    assert all(len(values) == 2 for values in reads.values())
    assert reads["caption"][0] > 0 and reads["color"][0] > 0 and reads["binding"][0] > 1e-2 * reads["color"][0]
    assert reads["count"][0] > 0 and reads["relation"][0] > 0
    # the relation row names a relation that holds between the scene's two objects, and then its opposite
    from latentdiff.data.shapes import noun_phrase, scene_relations

    pairs = script._two_color_scenes(6, seed=0)
    phrases = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}
    relation_captions = script._relation_captions(pairs["scene"])
    for scene, true, flipped in zip(pairs["scene"], relation_captions["full"], relation_captions["relation"]):
        holding = {(noun_phrase(a["shape"], a["color"]), relation["relation"], noun_phrase(b["shape"], b["color"]))
                   for relation in scene_relations(scene["objects"])
                   for a, b in [(scene["objects"][relation["subject"]], scene["objects"][relation["object"]])]}
        said = {(true[: true.index(p) - 1], r, true[true.index(p) + len(p) + 1:]) for p, r in phrases.items() if f" {p} " in true}
        unsaid = {(flipped[: flipped.index(p) - 1], r, flipped[flipped.index(p) + len(p) + 1:])
                  for p, r in phrases.items() if f" {p} " in flipped}
        assert len(said) == 1 and said <= holding and len(unsaid) == 1 and not unsaid & holding
    # the count row's scenes hold two or three like objects, named with their count and with the other one
    scenes, captions = script._count_scenes(6, seed=0)
    for scene, true, changed in zip(scenes["scene"], captions["full"], captions["count"]):
        objects = scene["objects"]
        assert len(objects) in (2, 3) and len({(obj["shape"], obj["color"]) for obj in objects}) == 1
        number = {2: "two", 3: "three"}[len(objects)]
        assert true == f"{number} {objects[0]['color']} {objects[0]['shape']}s"
        assert changed == f"{'three' if number == 'two' else 'two'} {objects[0]['color']} {objects[0]['shape']}s"
    # cut the cross-attention outputs: the text can no longer reach the U-Net
    with torch.no_grad():
        for name, module in pipeline.unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.zero_()
                module.bias.zero_()
    pipeline.save_pretrained(tmp_path / "deaf")
    deaf = script.measure(str(tmp_path / "deaf"), scenes=4, seed=0, timesteps=(900, 100))
    assert all(value == 0 for values in deaf.values() for value in values)


def test_attribute_sensitivity_binding_is_zero_for_a_bag_of_words_text_encoder(tmp_path):
    from latentdiff.pipelines import LatentPipeline
    from latentdiff.testing import load_bench_script, tiny_components

    script = load_bench_script("attribute_sensitivity")
    scene = script._two_color_scenes(1, seed=0)["scene"][0]
    swapped = script._colors_swapped(scene)
    assert [obj["color"] for obj in swapped["objects"]] == [obj["color"] for obj in scene["objects"]][::-1]
    assert [obj["shape"] for obj in swapped["objects"]] == [obj["shape"] for obj in scene["objects"]]
    # No transformer layer and no position embeddings: each token's state is its word's alone, and cross-attention
    # does not see the order of its keys, so swapping two words changes nothing (up to rounding).
    pipeline = LatentPipeline(**tiny_components(seed=0, overrides={"model.text_encoder.num_hidden_layers": 0}))
    with torch.no_grad():
        pipeline.text_encoder.embeddings.position_embedding.weight.zero_()
    pipeline.save_pretrained(tmp_path / "bag_of_words", model_card=False)
    measured = script.measure(str(tmp_path / "bag_of_words"), scenes=4, seed=0, timesteps=(900,))
    assert measured["color"][0] > 1e-3
    assert measured["binding"][0] < 1e-3 * measured["color"][0]


def test_attribute_sensitivity_routes_change_the_caption_in_one_route_only(tmp_path):
    from latentdiff.pipelines import LatentPipeline
    from latentdiff.testing import load_bench_script, tiny_components

    script = load_bench_script("attribute_sensitivity")
    pipeline = LatentPipeline(**tiny_components(seed=0, overrides={"model.unet.addition_embed_type": "text"}))
    with torch.no_grad():  # cut the cross-attention: only the pooled route carries the text
        for name, module in pipeline.unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.zero_()
                module.bias.zero_()
    pipeline.save_pretrained(tmp_path / "pooled_only", model_card=False)
    measured = {route: script.measure(str(tmp_path / "pooled_only"), scenes=4, seed=0, timesteps=(900,), route=route)
                for route in script.ROUTES}
    assert all(value == 0 for values in measured["cross"].values() for value in values)
    assert measured["pooled"]["caption"][0] > 0 and measured["pooled"]["color"][0] > 0
    assert measured["both"] == measured["pooled"]  # the cut route changes nothing either way

    LatentPipeline(**tiny_components(seed=0)).save_pretrained(tmp_path / "no_pooled_route", model_card=False)
    with pytest.raises(SystemExit, match="--route pooled: .* has no pooled text route"):
        script.measure(str(tmp_path / "no_pooled_route"), scenes=4, seed=0, timesteps=(900,), route="pooled")


def test_object_counts_counts_every_image_of_every_caption(tmp_path):
    from latentdiff.pipelines import LatentPipeline
    from latentdiff.testing import load_bench_script, tiny_components

    script = load_bench_script("object_counts")
    LatentPipeline(**tiny_components(seed=0)).save_pretrained(tmp_path / "model", model_card=False)
    counts = script.object_counts(str(tmp_path / "model"), ["", "a red circle"], images=3, guidance=1.0, steps=2)
    assert list(counts) == ["", "a red circle"]
    assert all(sum(counter.values()) == 3 and all(isinstance(n, int) and n >= 0 for n in counter) for counter in counts.values())


def test_one_path_eval_zeroes_the_other_path_and_restores_it(tmp_path):
    from latentdiff.pipelines import LatentPipeline
    from latentdiff.testing import load_bench_script, tiny_components

    script = load_bench_script("one_path_eval")
    components = tiny_components(seed=0, overrides={"model.text_encoder.word_embeddings_in_context": True})
    encoder, width = components["text_encoder"], components["text_encoder"].config.hidden_size
    ids = torch.randint(1, 1000, (2, 77))
    with torch.no_grad():
        both = encoder(ids)[0]
        with script.one_path("words"):
            words_only = encoder(ids)[0]
        with script.one_path("states"):
            states_only = encoder(ids)[0]
        torch.testing.assert_close(encoder(ids)[0], both)  # restored after the block
    torch.testing.assert_close(words_only, torch.cat([both[..., :width], torch.zeros_like(both[..., width:])], dim=-1))
    torch.testing.assert_close(states_only, torch.cat([torch.zeros_like(both[..., :width]), both[..., width:]], dim=-1))

    LatentPipeline(**components).save_pretrained(tmp_path / "two_paths", model_card=False)
    script.check_model(str(tmp_path / "two_paths"))
    LatentPipeline(**tiny_components(seed=0)).save_pretrained(tmp_path / "plain", model_card=False)
    with pytest.raises(SystemExit, match="CLIPTextModelWithWordEmbeddings.*found \\['transformers', 'CLIPTextModel'\\]"):
        script.check_model(str(tmp_path / "plain"))


def test_snr_weight_floor_keeps_the_terminal_step_of_a_zero_snr_schedule():
    from latentdiff.diffusion import min_snr_weights

    scheduler = _scheduler("v_prediction", zero_snr=True)
    timesteps = torch.tensor([0, 300, 700, 950, 999])
    plain = min_snr_weights(scheduler, timesteps, gamma=5.0)
    floored = min_snr_weights(scheduler, timesteps, gamma=5.0, floor=0.1)
    assert plain[-1] == 0  # min(SNR, gamma) / (SNR + 1) with SNR = 0
    assert floored[-1] == pytest.approx(0.1)
    # where the min-SNR weight is above the floor, nothing changes
    torch.testing.assert_close(floored[plain >= 0.1], plain[plain >= 0.1])
    assert (floored >= 0.1).all()


def test_snr_clamp_low_gives_high_noise_the_unweighted_loss_and_keeps_min_snr_at_low_noise():
    from latentdiff.diffusion import min_snr_weights

    scheduler = _scheduler("v_prediction", zero_snr=True)
    timesteps = torch.arange(0, 1000, 7)
    snr = compute_snr(scheduler, timesteps)
    plain = min_snr_weights(scheduler, timesteps, gamma=5.0)
    clamped = min_snr_weights(scheduler, timesteps, gamma=5.0, low=1.0)
    torch.testing.assert_close(clamped[snr >= 1], plain[snr >= 1])  # low noise: min-SNR-5 unchanged
    torch.testing.assert_close(clamped[snr < 1], 1 / (snr[snr < 1] + 1))  # high noise: x_0 weight 1
    assert clamped[-1] > 0.99 and plain[-1] < 1e-3
    with pytest.raises(ValueError, match="v_prediction or sample"):
        min_snr_weights(_scheduler("epsilon", zero_snr=False), timesteps, gamma=5.0, low=1.0)


def test_snr_clamp_for_applies_between_its_start_and_end_steps_and_only_to_captions_that_match():
    from latentdiff.config import DiffusionConfig
    from latentdiff.diffusion import min_snr_weights, snr_clamp_for

    config = DiffusionConfig(
        prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_gamma=5.0, snr_clamp_low=0.25,
        snr_clamp_captions="(at|on|in) the (top|bottom|left|right|center)", snr_clamp_start_step=100,
    )
    captions = ["a red circle", "a red circle at the top left", "a red circle to the left of a blue square", ""]
    assert snr_clamp_for(config, captions, step=99) == 0.0
    per_sample = snr_clamp_for(config, captions, step=100)
    torch.testing.assert_close(per_sample, torch.tensor([0.0, 0.25, 0.0, 0.0]))
    # without a pattern every sample is clamped; without a clamp nothing is
    assert snr_clamp_for(DiffusionConfig(snr_gamma=5.0, snr_clamp_low=0.25), captions, step=0) == 0.25
    assert snr_clamp_for(DiffusionConfig(snr_gamma=5.0), captions, step=10_000) == 0.0
    # with an end step the clamp teaches the top band first and plain min-SNR takes over from that step
    early = DiffusionConfig(snr_gamma=5.0, snr_clamp_low=0.25, snr_clamp_end_step=2000)
    assert snr_clamp_for(early, captions, step=1999) == 0.25
    assert snr_clamp_for(early, captions, step=2000) == 0.0

    scheduler = _scheduler("v_prediction", zero_snr=True)
    timesteps = torch.full((4,), 950)
    weights = min_snr_weights(scheduler, timesteps, gamma=5.0, low=per_sample)
    clamped = min_snr_weights(scheduler, timesteps, gamma=5.0, low=0.25)
    plain = min_snr_weights(scheduler, timesteps, gamma=5.0)
    torch.testing.assert_close(weights[1], clamped[1])
    torch.testing.assert_close(weights[[0, 2, 3]], plain[[0, 2, 3]])
    assert weights[1] > 100 * weights[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["diffusion.snr_clamp_low=1"], "without diffusion.snr_gamma"),
        (["diffusion.prediction_type=v_prediction", "diffusion.snr_gamma=5", "diffusion.snr_clamp_low=1",
          "diffusion.snr_clamp_captions=(top"], "a valid regular expression"),
        (["diffusion.snr_clamp_start_step=-1"], "diffusion.snr_clamp_start_step"),
        (["diffusion.snr_clamp_start_step=100"], "'diffusion.snr_clamp_start_step': expected 0 without diffusion.snr_clamp_low"),
        (["diffusion.snr_clamp_captions=top"], "'diffusion.snr_clamp_captions': expected null without diffusion.snr_clamp_low"),
        (["diffusion.snr_clamp_end_step=100"], "'diffusion.snr_clamp_end_step': expected null without diffusion.snr_clamp_low"),
        (["diffusion.prediction_type=v_prediction", "diffusion.snr_gamma=5", "diffusion.snr_clamp_low=1",
          "diffusion.snr_clamp_start_step=500", "diffusion.snr_clamp_end_step=500"],
         "null or more than diffusion.snr_clamp_start_step=500"),
        (["diffusion.snr_clamp_end_step=0"], "diffusion.snr_clamp_end_step"),
        (["diffusion.snr_clamp_from_timestep=700"], "'diffusion.snr_clamp_from_timestep': expected 0 without diffusion.snr_clamp_low"),
        (["diffusion.snr_clamp_pool=4"], "'diffusion.snr_clamp_pool': expected 1 without diffusion.snr_clamp_low"),
        (["diffusion.snr_clamp_pool=0"], "diffusion.snr_clamp_pool"),
        (["train.band_boundary=1000"], "'train.band_boundary': expected null or a timestep between 0 and 1000"),
        (["train.band_boundary=0"], "train.band_boundary"),
        (["train.band_boundary=700", "diffusion.timestep_sampling=logit_normal"], "'train.band_boundary': expected null with"),
        (["train.band_boundary=700", "model.high_noise_boundary=700"], "'train.band_boundary': expected null with model.high"),
        (["train.band_boundary=700", "train.high_band_every=1"], "train.high_band_every"),
        (["model.high_noise_boundary=1000"], "'model.high_noise_boundary': expected null or a timestep between 0 and 1000"),
        (["model.high_noise_pretrained=runs/x/pipeline"], "'model.high_noise_pretrained': expected null without model.high"),
        (["model.high_noise_pretrained=runs/x/pipeline", "model.high_noise_boundary=250"],
         "'diffusion.timestep_range': expected \\[low, high\\] with high <= model.high_noise_boundary=250"),
        (["model.high_noise_pretrained=runs/x/pipeline", "model.high_noise_boundary=250", "diffusion.timestep_range=[0,500]"],
         "'diffusion.timestep_range': expected \\[low, high\\] with high <= model.high_noise_boundary=250"),
        (["low_noise_expert.max_steps=400", "low_noise_expert.boundary=1000"],
         "'low_noise_expert.boundary': expected a timestep between 0 and 1000"),
        (["low_noise_expert.max_steps=400", "model.high_noise_boundary=700"],
         "'low_noise_expert.max_steps': expected 0 with model.high_noise_boundary"),
        (["low_noise_expert.max_steps=-1"], "low_noise_expert.max_steps"),
        (["diffusion.timestep_range=[700,1200]"], "'diffusion.timestep_range': expected null or \\[low, high\\]"),
        (["diffusion.timestep_range=[700,1000]", "diffusion.timestep_sampling=logit_normal"],
         "'diffusion.timestep_sampling': expected uniform with diffusion.timestep_range"),
        (["diffusion.snr_gamma=5", "diffusion.snr_clamp_low=6"], "at most diffusion.snr_gamma=5.0"),
        (["diffusion.snr_gamma=5", "diffusion.snr_clamp_low=1"], "with prediction_type epsilon"),
    ],
)
def test_snr_clamp_low_is_refused_where_it_cannot_mean_anything(overrides, message):
    from latentdiff.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_adaptive_weighting_starts_as_the_plain_loss_and_learns_the_expected_loss_of_each_noise_level():
    """EDM2's learned weighting: u(t) = 0 at first (the loss is unchanged); trained on errors whose
    size depends on t, exp(u(t)) converges to the mean error at each t, so L / exp(u) is about 1 everywhere."""
    from latentdiff.diffusion import AdaptiveLossWeighting, diffusion_loss

    scheduler = _scheduler("v_prediction", zero_snr=True)
    latents = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    denoiser = lambda x, t, c: x * 0.5  # noqa: E731
    plain = diffusion_loss(denoiser, scheduler, latents, None, generator=torch.Generator().manual_seed(1))
    weighting = AdaptiveLossWeighting(scheduler.config.num_train_timesteps)
    weighted = diffusion_loss(
        denoiser, scheduler, latents, None, generator=torch.Generator().manual_seed(1), adaptive_weighting=weighting
    )
    torch.testing.assert_close(weighted.loss, plain.loss)
    torch.testing.assert_close(weighted.per_sample, plain.per_sample)

    def expected_error(t: torch.Tensor) -> torch.Tensor:  # 0.01 at t = 0 up to 1 at t = T: two decades
        return 0.01 * 100 ** (t.float() / 1000)

    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 600)
    generator = torch.Generator().manual_seed(2)
    for _ in range(600):
        t = torch.randint(0, 1000, (256,), generator=generator)
        error = expected_error(t) * torch.empty(256).exponential_(generator=generator)  # noisy, with that mean
        log_expected = weighting(t)
        loss = (error / log_expected.exp() + log_expected).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    t = torch.arange(50, 1000, 100)
    ratio = weighting(t).exp().detach() / expected_error(t)
    assert ((ratio > 0.8) & (ratio < 1.25)).all(), ratio


def test_caption_gap_of_a_small_dataset_uses_what_it_has(monkeypatch, caplog):
    import latentdiff.data.loading
    from latentdiff.config import ConfigError, DataConfig
    from latentdiff.trainer.probes import held_examples

    def fake_dataset(size):
        examples = [{"pixel_values": torch.zeros(3, 8, 8), "caption": f"caption {i}"} for i in range(size)]
        return lambda data, seed, batch_size: examples[:2] + [None] + examples[2:]  # one unusable example

    monkeypatch.setattr(latentdiff.data.loading, "make_training_dataset", fake_dataset(10))
    with caplog.at_level("WARNING"):
        pixels, captions = held_examples(DataConfig(source="imagefolder", name="x"), seed=0, num_images=64)
    assert pixels.shape[0] == len(captions) == 8 and "the caption gap uses 8" in caplog.text
    monkeypatch.setattr(latentdiff.data.loading, "make_training_dataset", fake_dataset(3))
    with pytest.raises(ConfigError, match="train.caption_gap_steps=0"):
        held_examples(DataConfig(source="imagefolder", name="x"), seed=0, num_images=64)


def test_only_cross_attention_gives_the_finest_level_text_attention_without_self_attention():
    from latentdiff.config import ConfigError, load_config
    from latentdiff.models.builders import build_unet

    cross_everywhere = [
        "model.unet.down_block_types=[CrossAttnDownBlock2D,CrossAttnDownBlock2D]",
        "model.unet.up_block_types=[CrossAttnUpBlock2D,CrossAttnUpBlock2D]",
        "model.unet.block_out_channels=[32,32]", "model.unet.norm_num_groups=8",
        "model.text_encoder.hidden_size=16", "model.text_encoder.num_attention_heads=2",
    ]
    config = load_config(overrides=[*cross_everywhere, "model.unet.only_cross_attention=[true,false]"])
    unet = build_unet(config.model, 8)
    finest_down = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    finest_up = unet.up_blocks[-1].attentions[0].transformer_blocks[0]
    coarse = unet.down_blocks[1].attentions[0].transformer_blocks[0]
    assert finest_down.attn1.is_cross_attention and finest_up.attn1.is_cross_attention  # the up path mirrors it
    assert not coarse.attn1.is_cross_attention  # self-attention over the image where not asked
    out = unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 16)).sample
    assert out.shape == (2, 4, 8, 8)
    with pytest.raises(ConfigError, match="one true/false per down block"):
        load_config(overrides=[*cross_everywhere, "model.unet.only_cross_attention=[true]"])


def test_noise_level_experts_send_each_sample_to_the_unet_of_its_timestep():
    import copy

    from latentdiff.config import load_config
    from latentdiff.models import build_components
    from latentdiff.models.experts import NoiseLevelExperts

    torch.manual_seed(0)
    unet = build_components(load_config(overrides={"model.preset": "tiny"}).model, 32)["unet"]
    expert = copy.deepcopy(unet)
    with torch.no_grad():
        for parameter in expert.parameters():
            parameter.add_(0.05)
    experts = NoiseLevelExperts(unet, expert, boundary=700)
    sample = torch.randn(3, 4, 16, 16)
    context = torch.randn(3, 77, unet.config.cross_attention_dim)
    timesteps = torch.tensor([100, 700, 999])
    output = experts(sample, timesteps, context).sample
    torch.testing.assert_close(output[:1], unet(sample[:1], timesteps[:1], context[:1]).sample)
    torch.testing.assert_close(output[1:], expert(sample[1:], timesteps[1:], context[1:]).sample)
    # a batch that is all the U-Net's still gives the expert's parameters a (zero) gradient
    experts(sample, torch.tensor([1, 2, 3]), context).sample.square().mean().backward()
    assert all(p.grad is not None and not p.grad.any() for p in expert.parameters())
    assert all(p.grad is not None for p in unet.parameters())


def test_the_snr_clamp_from_a_timestep_weighs_only_the_samples_at_or_above_it():
    from latentdiff.diffusion import diffusion_loss, min_snr_weights

    scheduler = _scheduler("v_prediction", zero_snr=True)
    latents = torch.randn(64, 4, 8, 8)

    def loss(**kwargs):
        return diffusion_loss(lambda x, t, c: torch.zeros_like(x), scheduler, latents, None, snr_gamma=5.0,
                              generator=torch.Generator().manual_seed(0), **kwargs)

    plain, clamped = loss(), loss(snr_clamp_low=0.25, snr_clamp_from_timestep=700)
    t = plain.timesteps
    assert torch.equal(t, clamped.timesteps) and (t >= 700).any() and (t < 700).any()
    ratio = clamped.per_sample / plain.per_sample
    expected = min_snr_weights(scheduler, t, 5.0, low=0.25) / min_snr_weights(scheduler, t, 5.0)
    torch.testing.assert_close(ratio[t >= 700], expected[t >= 700])
    torch.testing.assert_close(ratio[t < 700], torch.ones_like(ratio[t < 700]))


def test_timesteps_drawn_within_a_range_stay_in_it():
    from latentdiff.diffusion import TimestepSampling, sample_timesteps

    generator = torch.Generator().manual_seed(0)
    t = sample_timesteps(1000, 4096, TimestepSampling(low=700), generator)
    assert t.min() >= 700 and t.max() <= 999 and t.min() < 710 and t.max() > 990
    t = sample_timesteps(1000, 4096, TimestepSampling(low=0, high=700), generator)
    assert t.max() <= 699
    with pytest.raises(ValueError, match="needs uniform sampling"):
        sample_timesteps(1000, 4, TimestepSampling(kind="logit_normal", low=700), generator)
    with pytest.raises(ValueError, match=r"must lie within \[0, 1000\)"):
        sample_timesteps(1000, 4, TimestepSampling(low=700, high=1200), generator)


def test_positional_unet_starts_as_the_stock_unet_and_adds_its_coordinates_after_conv_in():
    from diffusers import UNet2DConditionModel

    from latentdiff.config import load_config
    from latentdiff.models.builders import build_unet
    from latentdiff.models.unet import PositionalUNet2DConditionModel, position_features

    config = load_config(overrides={"model.preset": "tiny", "model.unet.position_frequencies": 3})
    torch.manual_seed(0)
    unet = build_unet(config.model, 16)
    assert isinstance(unet, PositionalUNet2DConditionModel) and unet.config.position_frequencies == 3
    stock = UNet2DConditionModel.from_config({k: v for k, v in unet.config.items() if k != "position_frequencies"})
    missing, unexpected = stock.load_state_dict(unet.state_dict(), strict=False)
    assert not missing and unexpected == ["position_proj.weight", "position_proj.bias"]
    sample, timesteps = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    # the projection starts at zero: a new model is the stock one
    torch.testing.assert_close(unet(sample, timesteps, context).sample, stock(sample, timesteps, context).sample)

    features = position_features(16, 16, 3)
    assert features.shape == (12, 16, 16)
    assert not torch.equal(features[:, 0, 0], features[:, 15, 15])  # every place has its own features ...
    torch.testing.assert_close(features[:6, :, 0], features[:6, :, 9])  # row channels do not vary along a row,
    torch.testing.assert_close(features[6:, 0, :], features[6:, 9, :])  # column channels not along a column
    with torch.no_grad():
        torch.nn.init.normal_(unet.position_proj.weight)
    seen = {}
    unet.conv_in.register_forward_hook(lambda module, inputs, output: seen.setdefault("conv_in", output))
    unet(sample, timesteps, context)
    expected = stock.conv_in(sample) + unet.position_proj(features[None])
    torch.testing.assert_close(seen["conv_in"], expected)
    assert not torch.allclose(unet(sample, timesteps, context).sample, stock(sample, timesteps, context).sample)


def test_positional_unet_is_saved_and_loaded_by_diffusers_and_by_the_builders(tmp_path):
    import json

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from latentdiff import LatentPipeline, PositionalUNet2DConditionModel
    from latentdiff.config import ConfigError, load_config
    from latentdiff.models.builders import build_unet
    from latentdiff.testing import tiny_components

    components = tiny_components(seed=0)
    stock_unet = components["unet"]
    torch.manual_seed(1)
    unet = PositionalUNet2DConditionModel(position_frequencies=2, **stock_unet.config)
    with torch.no_grad():
        torch.nn.init.normal_(unet.position_proj.weight)
    LatentPipeline(**{**components, "unet": unet}).save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["unet"] == ["latentdiff", "PositionalUNet2DConditionModel"]
    for loaded in (LatentPipeline.from_pretrained(tmp_path / "pipe"),
                   StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None)):
        assert type(loaded.unet) is PositionalUNet2DConditionModel
        torch.testing.assert_close(loaded.unet.position_proj.weight, unet.position_proj.weight)

    # model.unet.pretrained: a positional U-Net loads as one, a stock U-Net stays stock
    stock_unet.save_pretrained(tmp_path / "stock")
    for folder, expected_class in ((tmp_path / "pipe" / "unet", PositionalUNet2DConditionModel),
                                   (tmp_path / "stock", UNet2DConditionModel)):
        config = load_config(overrides={"model.preset": "tiny", "model.unet.pretrained": str(folder)})
        assert type(build_unet(config.model, 16)) is expected_class
    with pytest.raises(ConfigError, match="model.unet.position_frequencies"):
        load_config(overrides={"model.preset": "tiny", "model.unet.position_frequencies": -1})
    with pytest.raises(ValueError, match="position_frequencies must be an integer >= 0"):
        PositionalUNet2DConditionModel(position_frequencies=1.5, **stock_unet.config)


def test_a_loaded_unet_records_the_latent_size_it_is_trained_at(tmp_path):
    # A pipeline draws at unet.config.sample_size by default: a U-Net trained on at another resolution (model.unet
    # .pretrained, or a frozen high-noise expert) must be saved with the run's latent size, not the one it was
    # first built for; its weights stay as loaded.
    import json

    from latentdiff.config import load_config
    from latentdiff.models import build_components
    from latentdiff.models.builders import vae_scale_factor

    config = load_config(overrides={"model.preset": "tiny"})
    factor = vae_scale_factor(config.model)
    unet = build_components(config.model, 8 * factor)["unet"]
    assert unet.config.sample_size == 8
    unet.save_pretrained(tmp_path / "unet")
    loads = (("unet", {"model.unet.pretrained": str(tmp_path / "unet")}),
             ("unet_high_noise", {"model.high_noise_pretrained": str(tmp_path / "unet"), "model.high_noise_boundary": 250,
                                  "diffusion.timestep_range": [0, 250]}))
    for name, overrides in loads:
        model_config = load_config(overrides={"model.preset": "tiny", **overrides}).model
        loaded = build_components(model_config, 16 * factor)[name]
        assert loaded.config.sample_size == 16, name
        torch.testing.assert_close(loaded.state_dict(), unet.state_dict())
        assert build_components(model_config, 8 * factor)[name].config.sample_size == 8, name
    loaded.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["sample_size"] == 16


def test_snr_clamp_pool_gives_the_clamps_added_weight_to_the_coarse_error_only():
    from latentdiff.diffusion import diffusion_loss, min_snr_weights

    scheduler = _scheduler("v_prediction", zero_snr=True)
    latents = torch.randn(16, 4, 8, 8)
    alphas = scheduler.alphas_cumprod

    def denoiser_with_error(error: torch.Tensor):
        def denoiser(noisy, timesteps, context):  # the exact v target, recovered from x_t and x_0, plus `error`
            a = alphas[timesteps].sqrt()[:, None, None, None]
            s = (1 - alphas[timesteps]).sqrt()[:, None, None, None]
            noise = (noisy - a * latents) / s.clamp(min=1e-6)
            return a * noise - s * latents + error
        return denoiser

    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    checkerboard = ((rows + cols) % 2 * 2 - 1).float().expand(16, 4, 8, 8)  # no coarse part at all
    for error, clamped_share in ((checkerboard, False), (torch.ones(16, 4, 8, 8), True)):  # all coarse
        output = diffusion_loss(denoiser_with_error(error), scheduler, latents, None, snr_gamma=5.0,
                                generator=torch.Generator().manual_seed(0), snr_clamp_low=0.25, snr_clamp_pool=4)
        expected = min_snr_weights(scheduler, output.timesteps, 5.0, low=0.25 if clamped_share else 0.0)
        torch.testing.assert_close(output.per_sample, expected, atol=2e-4, rtol=1e-3)
    # pool 1 is the plain clamp: the whole error takes the clamped weight
    output = diffusion_loss(denoiser_with_error(checkerboard), scheduler, latents, None, snr_gamma=5.0,
                            generator=torch.Generator().manual_seed(0), snr_clamp_low=0.25)
    torch.testing.assert_close(output.per_sample, min_snr_weights(scheduler, output.timesteps, 5.0, low=0.25),
                               atol=2e-4, rtol=1e-3)


def test_autoguidance_with_the_model_itself_as_guide_is_the_model_alone():
    """D_guide + w (D - D_guide) is D for any w when the guide is the model; another guide changes the image."""
    from latentdiff.pipelines import LatentPipeline
    from latentdiff.testing import load_bench_script, tiny_components

    script = load_bench_script("autoguidance")
    pipeline, other = LatentPipeline(**tiny_components(seed=0)), LatentPipeline(**tiny_components(seed=1))
    other.vae = pipeline.vae
    call = dict(prompt=["a red circle", "a blue square"], num_inference_steps=2, output_type="np")

    def sample(pipe, guidance):
        return pipe(**call, guidance_scale=guidance, generator=torch.Generator().manual_seed(0)).images

    alone, classifier_free = sample(pipeline, 1.0), sample(pipeline, 2.0)
    with script.autoguided(pipeline, pipeline):
        np.testing.assert_allclose(sample(pipeline, 3.0), alone, atol=1e-5)
    with script.autoguided(pipeline, other):
        assert np.abs(sample(pipeline, 3.0) - alone).max() > 1e-3
    with script.autoguided(pipeline, pipeline, cfg=2.0):  # the guide's term vanishes: classifier-free guidance alone
        np.testing.assert_allclose(sample(pipeline, 3.0), classifier_free, atol=1e-5)
    assert "encode_prompt" not in pipeline.__dict__ and "forward" not in pipeline.unet.__dict__
    assert script.same_autoencoder(pipeline, other) and not script.same_autoencoder(pipeline, LatentPipeline(**tiny_components(seed=1)))


def test_eval_breakdown_splits_relations_by_word_and_counts_by_outcome():
    from latentdiff.testing import load_bench_script

    script = load_bench_script("eval_breakdown")

    def image(task, prompt, passed, drawn=0, objects=None):
        return {"task": task, "prompt": prompt, "passed": passed, "judged": {"objects": objects or [{}] * drawn}}

    def obj(color, shape, position):
        return {"color": color, "shape": shape, "size": "large", "position": position}

    red_circle, blue_square = ("red", "circle"), ("blue", "square")
    parts = script.breakdown([
        image("relation", "a red circle above a blue square", True),
        image("relation", "a red circle above a blue square", False, objects=[obj(*red_circle, "at the bottom"), obj(*blue_square, "in the center")]),
        image("relation", "a red circle above a blue square", False, objects=[obj(*red_circle, "on the left"), obj(*blue_square, "on the right")]),
        image("relation", "a red circle above a blue square", False, objects=[obj(*red_circle, "on the left")]),
        image("relation", "a green square to the left of a red circle", False,
              objects=[obj("green", "square", "at the top"), obj(*red_circle, "at the bottom")]),
        image("counting", "two red circles", True, drawn=2),
        image("counting", "two red circles", False, drawn=3),
        image("counting", "three blue squares", False, drawn=4),
        image("counting", "three blue squares", False, drawn=2),
        image("counting", "three blue squares", False, drawn=3),
        image("position", "a red circle at the top", False),
        image("shape", "a triangle", True, objects=[obj("red", "triangle", "at the top") | {"size": "small"}]),
        image("shape", "a triangle", False, objects=[obj("red", "circle", "at the top") | {"size": "small"}]),
        image("shape", "a triangle on a white background", False),
        image("color", "a red shape", True, objects=[obj("red", "square", "at the top")]),
        image("single_object", "a red circle", True, objects=[obj(*red_circle, "at the top"), obj(*red_circle, "at the bottom")]),
        image("unseen", "a purple triangle", False),
    ])
    assert parts["one_object"] == {"none": {False: 2}, "one small": {True: 1, False: 1}, "one large": {True: 1}, "several": {True: 1}}
    assert parts["one_object_by_background"] == {
        ("position", False): {"images": 1, "passed": 0, "none drawn": 1},
        ("shape", False): {"images": 2, "passed": 1, "none drawn": 0},
        ("shape", True): {"images": 1, "passed": 0, "none drawn": 1},
        ("color", False): {"images": 1, "passed": 1, "none drawn": 0},
        ("single_object", False): {"images": 1, "passed": 1, "none drawn": 0},
    }
    assert parts["relation"] == {"to the left of": {"one line": 1}, "above": {"passed": 1, "reversed": 1, "one line": 1, "missing object": 1}}
    assert parts["counting"] == {2: {"right": 1, "+1": 1}, 3: {"+1": 1, "-1": 1, "right number, wrong kind": 1}}
    assert parts["two_objects"] == {"relation": {"passed": 1, "both pairs drawn": 3, "one pair only": 1}}

    # The tasks with two different objects, by what was drawn of the two named (color, shape) pairs.
    binding = "a red circle and an orange square"
    parts = script.breakdown([
        image("color_binding", binding, True, objects=[obj(*red_circle, "at the top"), obj("orange", "square", "at the bottom")]),
        image("color_binding", binding, False, objects=[obj("red", "square", "at the top"), obj("orange", "circle", "at the bottom")]),
        image("color_binding", binding, False, objects=[obj("red", "square", "at the top"), obj("orange", "square", "at the bottom")]),
        image("color_binding", binding, False, objects=[obj("orange", "circle", "at the top"), obj("orange", "square", "at the bottom")]),
        image("color_binding", binding, False, objects=[obj(*red_circle, "at the top")]),
        image("two_objects", "a blue square and a green triangle", False, objects=[obj(*red_circle, "at the top")]),
    ])
    assert parts["two_objects"] == {
        "color_binding": {"passed": 1, "paired the other way": 1, "one shape for both": 1, "one color for both": 1, "one pair only": 1},
        "two_objects": {"neither pair": 1},
    }
    with pytest.raises(ValueError, match="a two-object prompt names two colored shapes, got 1"):
        script.breakdown([image("two_objects", "a red circle and a square", False)])
    with pytest.raises(ValueError, match="no relation word"):
        script.breakdown([image("relation", "a red circle near a blue square", False)])
    with pytest.raises(ValueError, match="a relation prompt reads"):
        script.breakdown([image("relation", "the red circle is above the blue square", False)])
    with pytest.raises(ValueError, match="a counting prompt starts with one of"):
        script.breakdown([image("counting", "several red circles", False)])


def test_eval_breakdown_measures_the_text_encoder_on_one_word_caption_pairs(tmp_path):
    from latentdiff.pipelines import LatentPipeline
    from latentdiff.testing import load_bench_script, tiny_components

    script = load_bench_script("eval_breakdown")
    LatentPipeline(**tiny_components(seed=0)).save_pretrained(tmp_path / "model", model_card=False)
    distances = script.text_distances(str(tmp_path / "model"), {"same": ("a red circle", "a red circle"),
                                                                 "other": ("a red circle", "three blue squares")})
    assert distances["same"] == 0.0
    assert distances["other"] > 0.0


@pytest.mark.parametrize("count_only_captions", [False, True])
def test_caption_gap_holds_each_shapes_scene_with_its_full_description(count_only_captions):
    """The held batch's true caption is the scene's whole description, whatever other templates the run's
    data writes (one caption per image: the description alone, not a random template)."""
    from latentdiff.config import load_config
    from latentdiff.data.loading import shapes_scene_options
    from latentdiff.data.shapes import full_caption, make_shapes_dataset
    from latentdiff.trainer.probes import HELD_SCENES_SEED_OFFSET, held_examples

    config = load_config(Path(__file__).parents[1] / "configs" / "shapes.yaml",
                         [f"data.shapes.count_only_captions={count_only_captions}"])
    pixels, captions = held_examples(config.data, config.seed, num_images=8)
    shapes = config.data.shapes
    scenes = make_shapes_dataset(8, seed=shapes.seed + HELD_SCENES_SEED_OFFSET, image_size=config.data.resolution,
                                 progress_bar=False, **shapes_scene_options(shapes))["scene"]
    assert pixels.shape[0] == 8
    assert captions == [full_caption(scene) for scene in scenes]


def test_shapes_by_noise_level_judges_every_object_of_every_scene_at_every_strength():
    from collections import Counter

    from latentdiff.data.shapes import ShapesOptions, make_shapes_sample
    from latentdiff.eval.judge import RECONSTRUCTION_SEED
    from latentdiff.pipelines import LatentImg2ImgPipeline
    from latentdiff.testing import load_bench_script, tiny_components

    script = load_bench_script("shapes_by_noise_level")
    pipe = LatentImg2ImgPipeline(**tiny_components())
    pipe.set_progress_bar_config(disable=True)
    report = script.shapes_by_noise_level(pipe, [0.0, 0.5], num_scenes=6, batch_size=4, guidance_scale=1.0)
    one_step = script.shapes_by_noise_level(pipe, [0.3], num_scenes=6, batch_size=4, one_step=True)
    objects = Counter(obj["size"] for i in range(6) for obj in make_shapes_sample(i, RECONSTRUCTION_SEED, 64, ShapesOptions.create())["scene"]["objects"])
    assert list(report) == [0.0, 0.5] and list(one_step) == [0.3]
    for counts in [*report.values(), *one_step.values()]:
        assert {size: sum(outcomes.values()) for size, outcomes in counts.items()} == dict(objects)
        assert all(set(outcomes) <= {"same shape", "another shape", "missing"} for outcomes in counts.values())
    table = script.markdown_table({0.1: {"small": {"same shape": 3, "another shape": 1}}})
    assert table.splitlines()[-1] == "| 0.1 | 3/4 (0.75) / 1 / 0 |"
    with pytest.raises(ValueError, match=r"strengths must be one or more numbers in \[0, 1\], got \[1.5\]"):
        script.shapes_by_noise_level(pipe, [1.5], num_scenes=2)
    with pytest.raises(ValueError, match="caption must be 'full' or 'empty', got 'none'"):
        script.shapes_by_noise_level(pipe, [0.1], num_scenes=2, caption="none")


def test_foreground_weights_mark_what_differs_from_the_background_in_the_low_band_only():
    from latentdiff.diffusion import foreground_weights

    latents = torch.full((2, 4, 8, 8), -0.5)  # a plain background
    latents[:, :, 2:4, 2:4] = 2.5  # an object: 6 standard deviations from the background over the 4 channels
    latents[:, 0, 6, 6] = 1.0  # a faint latent: 1.5 from the background, half marked
    weights = foreground_weights(latents, torch.tensor([100, 600]), weight=4.0, until=250)
    assert weights.shape == (2, 1, 8, 8)
    assert weights[0, 0, 2:4, 2:4].eq(5.0).all() and weights[0, 0, 6, 6] == 3.0
    assert weights[0].sum() == 64 + 4 * 4 + 2  # the background keeps weight 1
    assert weights[1].eq(1.0).all()  # t = 600 is past `until`


def test_diffusion_loss_weights_the_foreground_error_of_low_noise_samples():
    from latentdiff.config import ConfigError, load_config
    from latentdiff.diffusion import diffusion_loss, foreground_weights

    scheduler = _scheduler("sample")
    latents = torch.randn(32, 4, 8, 8)
    zeros = lambda noisy, t, c: torch.zeros_like(noisy)  # noqa: E731 (the error is the clean latent itself)
    plain = diffusion_loss(zeros, scheduler, latents, None, generator=torch.Generator().manual_seed(0))
    weighted = diffusion_loss(zeros, scheduler, latents, None, generator=torch.Generator().manual_seed(0),
                              foreground_weight=4.0, foreground_until=500)
    assert torch.equal(plain.timesteps, weighted.timesteps)
    low = plain.timesteps < 500
    assert 0 < low.sum() < 32
    torch.testing.assert_close(weighted.per_sample[~low], plain.per_sample[~low])  # high noise: unchanged
    expected = (latents.square() * foreground_weights(latents, plain.timesteps, 4.0, 500)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(weighted.per_sample, expected)
    assert (weighted.per_sample[low] > plain.per_sample[low]).all()

    assert load_config(overrides=["diffusion.foreground_loss_weight=2"]).diffusion.foreground_loss_until == 250
    with pytest.raises(ConfigError, match="'diffusion.foreground_loss_until'.*timestep between 1 and 1000"):
        load_config(overrides=["diffusion.foreground_loss_weight=2", "diffusion.foreground_loss_until=1001"])
    with pytest.raises(ConfigError, match="'diffusion.foreground_loss_weight'"):
        load_config(overrides=["diffusion.foreground_loss_weight=-1"])
    with pytest.raises(ConfigError, match="'diffusion.foreground_loss_weight'.*snr_clamp_pool"):
        shapes = Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml"  # min-SNR with its clamp
        load_config(shapes, ["diffusion.foreground_loss_weight=2", "diffusion.snr_clamp_pool=2"])
    load_config(overrides=["diffusion.num_train_timesteps=100"])  # the unused `until` of 250 is no error


def test_a_unet_level_without_attention_needs_no_whole_heads():
    # The first level of the shapes U-Net has no attention (DownBlock2D / UpBlock2D), so its width need not be a
    # multiple of attention_head_dim: [16, 64, 64] with heads of 32 channels builds; the attending levels still must.
    from latentdiff.config import ConfigError, load_config
    from latentdiff.models.builders import build_unet

    narrow = {"model.preset": "small", "model.unet.block_out_channels": [16, 64, 64], "model.unet.norm_num_groups": 16}
    unet = build_unet(load_config(overrides=narrow).model, 16)
    assert list(unet.config.block_out_channels) == [16, 64, 64]
    assert unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.heads == 2  # 64 channels in heads of 32
    sample = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, 8, unet.config.cross_attention_dim)
    assert unet(sample, torch.tensor([10, 900]), context).sample.shape == sample.shape
    with pytest.raises(ConfigError, match=r"48 is not divisible by attention_head_dim \(32\) and norm_num_groups"):
        build_unet(load_config(overrides={**narrow, "model.unet.block_out_channels": [16, 48, 64]}).model, 16)
    with pytest.raises(ConfigError, match=r"24 is not divisible by norm_num_groups \(16\)"):
        build_unet(load_config(overrides={**narrow, "model.unet.block_out_channels": [24, 64, 64]}).model, 16)

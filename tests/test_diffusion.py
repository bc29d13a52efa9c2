"""The training objective (latentdiff/diffusion.py) against its formulas: the noised latent and each prediction
target, min-SNR-gamma weights per prediction type (a zero-terminal-SNR schedule included), offset-noise
statistics, and the loss with an oracle denoiser. CPU, float64 where a formula is compared."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from latentdiff.config import DiffusionConfig
from latentdiff.diffusion import diffusion_loss, make_noise_scheduler, min_snr_weights, sample_noise, training_target

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def scheduler_for(prediction_type: str, zero_snr: bool = False) -> DDPMScheduler:
    if zero_snr and prediction_type == "epsilon":  # make_noise_scheduler refuses it; the weights must still be finite
        return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             rescale_betas_zero_snr=True, prediction_type="epsilon")
    return make_noise_scheduler(DiffusionConfig(prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr))


def draws(batch: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn(batch, 4, 8, 8, generator=generator, dtype=torch.float64)
    timesteps = torch.tensor([0, 1, 250, 500, 998, 999])[:batch]
    return latents, noise, timesteps


def alpha_bar(scheduler, timesteps):
    return scheduler.alphas_cumprod.to(torch.float64)[timesteps].view(-1, 1, 1, 1)


@pytest.mark.parametrize(
    "prediction_type, zero_snr",  # epsilon at zero terminal SNR is refused (see the next test)
    [("epsilon", False), ("v_prediction", False), ("sample", False), ("v_prediction", True), ("sample", True)],
)
def test_noised_latent_and_target_follow_their_formulas(prediction_type, zero_snr):
    scheduler = scheduler_for(prediction_type, zero_snr)
    latents, noise, timesteps = draws()
    abar = alpha_bar(scheduler, timesteps)
    # DDPM eq. 4
    noisy = scheduler.add_noise(latents, noise, timesteps)
    torch.testing.assert_close(noisy, abar.sqrt() * latents + (1 - abar).sqrt() * noise)
    target = training_target(scheduler, latents, noise, timesteps)
    expected = {
        "epsilon": noise,
        "v_prediction": abar.sqrt() * noise - (1 - abar).sqrt() * latents,  # Salimans & Ho 2022, Sec. 4
        "sample": latents,
    }[prediction_type]
    torch.testing.assert_close(target, expected)
    if prediction_type == "v_prediction":  # v recovers x_0 = sqrt(abar) x_t - sqrt(1 - abar) v, at every t
        torch.testing.assert_close(abar.sqrt() * noisy - (1 - abar).sqrt() * target, latents)


def test_zero_terminal_snr_schedule_ends_at_pure_noise_and_needs_v_or_sample():
    scheduler = scheduler_for("v_prediction", zero_snr=True)
    assert float(scheduler.alphas_cumprod[-1]) == 0.0  # x_T is pure noise (Lin et al. 2024, Alg. 1)
    assert scheduler.config.timestep_spacing == "trailing"  # samplers start at t = T
    assert float(scheduler_for("v_prediction").alphas_cumprod[-1]) > 0
    with pytest.raises(ValueError, match="rescale_betas_zero_snr=true needs diffusion.prediction_type"):
        make_noise_scheduler(DiffusionConfig(prediction_type="epsilon", rescale_betas_zero_snr=True))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_min_snr_weights_per_prediction_type(prediction_type, zero_snr):
    """Hang et al. 2023, eq. 8: min(SNR, gamma) in x_0 space; / SNR for epsilon, / (SNR + 1) for v."""
    scheduler = scheduler_for(prediction_type, zero_snr)
    gamma = 5.0
    timesteps = torch.arange(scheduler.config.num_train_timesteps)
    weights = min_snr_weights(scheduler, timesteps, gamma).double()
    abar = scheduler.alphas_cumprod.double()
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        expected = torch.where(snr > 0, clipped / snr, torch.ones_like(snr))
    elif prediction_type == "v_prediction":
        expected = clipped / (snr + 1)
    else:
        expected = clipped
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-7)
    # Low noise (SNR > gamma): clipped; high noise: the plain loss (epsilon), SNR / (SNR + 1) (v), SNR (x_0).
    low, high = 0, scheduler.config.num_train_timesteps - 1
    assert snr[low] > gamma and snr[high] < gamma
    if prediction_type == "epsilon":
        assert weights[low] == pytest.approx(gamma / float(snr[low]), rel=1e-5) and weights[high] == pytest.approx(1.0)
    if zero_snr:  # SNR(T) = 0: v and x_0 targets get no weight at t = T, epsilon keeps weight 1, nothing is NaN
        assert float(snr[high]) == 0.0
        assert float(weights[high]) == (1.0 if prediction_type == "epsilon" else 0.0)


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_offset_noise_statistics(offset):
    """Guttenberg 2023: one N(0, offset^2) shift per sample and channel on top of N(0, I) noise."""
    latents = torch.zeros(4096, 4, 8, 8)
    noise = sample_noise(latents, offset, torch.Generator().manual_seed(0))
    assert noise.shape == latents.shape
    channel_means = noise.mean(dim=(2, 3))
    # Var(channel mean) = offset^2 + 1 / (H W); total variance 1 + offset^2; mean 0.
    assert channel_means.var().item() == pytest.approx(offset**2 + 1 / 64, rel=0.05)
    assert noise.var().item() == pytest.approx(1 + offset**2, rel=0.03)
    assert abs(noise.mean().item()) < 0.02 + offset * 0.03
    # Within a channel of one sample the shift is constant: the residual is plain unit noise.
    assert (noise - channel_means[..., None, None]).var().item() == pytest.approx(1 - 1 / 64, rel=0.02)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_loss_is_zero_for_an_oracle_and_the_target_energy_for_a_zero_model(prediction_type):
    """The model is an argument: an oracle that knows x_0 recovers the target from x_t, so the loss is 0."""
    scheduler = scheduler_for(prediction_type)
    latents = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    condition = torch.zeros(8, 77, 32, dtype=torch.float64)

    def oracle(noisy, timesteps, encoder_hidden_states):
        assert encoder_hidden_states is condition
        abar = alpha_bar(scheduler, timesteps)
        eps = (noisy - abar.sqrt() * latents) / (1 - abar).sqrt()
        return training_target(scheduler, latents, eps, timesteps)

    result = diffusion_loss(oracle, scheduler, latents, condition, generator=torch.Generator().manual_seed(2))
    assert result.loss.item() < 1e-12 and result.per_sample.shape == (8,)
    assert ((result.timesteps >= 0) & (result.timesteps < scheduler.config.num_train_timesteps)).all()

    seen = {}

    def zero_model(noisy, timesteps, encoder_hidden_states):
        seen["noisy"], seen["timesteps"] = noisy, timesteps
        return torch.zeros_like(noisy)

    weighted = diffusion_loss(zero_model, scheduler, latents, condition, snr_gamma=5.0,
                              generator=torch.Generator().manual_seed(3))
    eps = (seen["noisy"] - alpha_bar(scheduler, seen["timesteps"]).sqrt() * latents) / (
        1 - alpha_bar(scheduler, seen["timesteps"])
    ).sqrt()
    target = training_target(scheduler, latents, eps, seen["timesteps"])
    plain = target.pow(2).mean(dim=(1, 2, 3))
    expected = plain * min_snr_weights(scheduler, seen["timesteps"], 5.0).double()
    torch.testing.assert_close(weighted.per_sample.double(), expected, rtol=1e-5, atol=1e-6)  # float32 loss

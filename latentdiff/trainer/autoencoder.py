"""Losses for training the autoencoder (stage 1) and the latent scale it hands to stage 2.

The objective follows Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion
Models", Sec. 3 and App. G) and Esser et al. 2021 ("Taming Transformers", Sec. 3.2):

    L = |x - D(E(x))|_1 + w_kl * KL(q(z|x) || N(0, I)) [+ w_p * L_perceptual] [+ w_adv * L_GAN]

The reconstruction and KL terms always apply. The perceptual term needs VGG16 weights and the
adversarial term a discriminator trained alongside; both are options that stay off by default (no
weights can be downloaded here). Diffusers ships the autoencoder but none of these losses, so they
are written here.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError


def reconstruction_loss(images: torch.Tensor, reconstructions: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """The pixel reconstruction term: mean absolute error (``l1``) or mean squared error (``mse``).

    MSE weighs large errors more: on images that are mostly plain background, the few pixels of small
    objects then drive learning sooner than under L1.
    """
    difference = images.float() - reconstructions.float()
    if kind == "l1":
        return difference.abs().mean()
    if kind == "mse":
        return difference.pow(2).mean()
    raise ValueError(f"reconstruction loss must be 'l1' or 'mse', got {kind!r}")


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) of a diagonal Gaussian posterior, averaged per latent element.

    Kingma & Welling 2014, "Auto-Encoding Variational Bayes", App. B:
    ``KL = 1/2 * sum(mu^2 + sigma^2 - 1 - log sigma^2)``.
    """
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def downsample(tensor: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinear downsampling by an integer ``factor`` with antialiasing (the scale-equivariance term's)."""
    return F.interpolate(tensor, scale_factor=1 / factor, mode="bilinear", antialias=True, align_corners=False)


def decoder_parameters(vae) -> list[nn.Parameter]:
    """The decoder side of an ``AutoencoderKL``: the decoder and ``post_quant_conv``, what a decoder-only fine-tune
    trains (the encoder, and with it the latents already in use, left as they are)."""
    return [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]


class AutoencoderForTraining(nn.Module):
    """Encode, sample ``z ~ q(z|x)`` and decode in one ``forward``, returning what the losses need.

    ``AutoencoderKL.forward`` returns only the reconstruction; the KL term also needs the posterior.
    Going through one ``forward`` (instead of calling ``encode`` and ``decode`` on the unwrapped model)
    keeps DistributedDataParallel's gradient synchronisation in the loop.

    With ``scale_equivariance_factor``, the forward also decodes the latent downsampled by that factor,
    for the scale-equivariance term (:func:`scale_equivariance_loss`); otherwise that output is ``None``.
    With ``decoder_only`` (the decoder fine-tune at the end of stage 1, ``vae_train.decoder_finetune_steps``),
    the encoder runs without gradient and the decoder reads the posterior mean: what a sampler ends on is a
    denoised estimate, not a draw, and no random numbers are taken, so stage 2 gets the same latent scale
    and draws as without the fine-tune. The posterior is returned detached: its KL term is logged but trains
    nothing.
    """

    def __init__(self, vae, scale_equivariance_factor: int | None = None):
        super().__init__()
        self.vae = vae
        self.scale_equivariance_factor = scale_equivariance_factor

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None, decoder_only: bool = False):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not decoder_only):
            posterior = self.vae.encode(images).latent_dist
        latents = posterior.mean if decoder_only else posterior.sample(generator=generator)
        reconstructions = self.vae.decode(latents).sample
        downscaled = None
        if self.scale_equivariance_factor:
            downscaled = self.vae.decode(downsample(latents, self.scale_equivariance_factor)).sample
        return reconstructions, posterior.mean, posterior.logvar, downscaled


def scale_equivariance_loss(images: torch.Tensor, downscaled_reconstructions: torch.Tensor, factor: int,
                            kind: str = "l1") -> torch.Tensor:
    """The decoder, given a latent downsampled by ``factor``, must render the image downsampled by it.

    Skorokhodov et al. 2025, "Improving the Diffusability of Autoencoders" (ICML 2025): autoencoder
    latents carry more high-frequency power than images do, which a diffusion model, generating coarse to
    fine, learns slowly; asking the decoder to be scale-equivariant removes it. ``downscaled_reconstructions``
    is :class:`AutoencoderForTraining`'s fourth output; the distance is the pixel loss's.
    """
    return reconstruction_loss(downsample(images, factor), downscaled_reconstructions, kind)


class VGGPerceptualLoss(nn.Module):
    """Distance between VGG16 features of two images (Johnson et al. 2016; Zhang et al. 2018 without the
    learned linear heads of LPIPS). Needs torchvision's ``vgg16`` weights from a local file."""

    LAYERS = (3, 8, 15, 22)  # relu1_2, relu2_2, relu3_3, relu4_3

    def __init__(self, weights_path: str):
        super().__init__()
        if not weights_path or not os.path.isfile(weights_path):
            raise ConfigError(
                f"vae_train.lpips_weights={weights_path!r}: the perceptual loss needs torchvision VGG16 weights "
                "from a local file (.pth or .safetensors); set vae_train.perceptual_weight=0 to train without it"
            )
        from torchvision.models import vgg16

        network = vgg16()
        if weights_path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(weights_path)
        else:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
        self.features = network.features[: self.LAYERS[-1] + 1].eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        x = ((images.float() + 1) / 2 - self.mean) / self.std
        y = ((reconstructions.float() + 1) / 2 - self.mean) / self.std
        loss = torch.zeros((), device=images.device)
        for index, layer in enumerate(self.features):
            x, y = layer(x), layer(y)
            if index in self.LAYERS:
                loss = loss + F.mse_loss(F.normalize(x, dim=1), F.normalize(y, dim=1))
        return loss


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, "pix2pix", Sec. 3.2.2), as used for the autoencoders of
    Esser et al. 2021 and Rombach et al. 2022: one real/fake logit per image patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for index in range(1, layers + 1):
            previous, width = width, channels * min(2**index, 8)
            stride = 2 if index < layers else 1
            blocks += [nn.Conv2d(previous, width, 4, stride, 1, bias=False), nn.GroupNorm(min(32, width // 4), width), nn.LeakyReLU(0.2)]
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.network = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator (Lim & Ye 2017; Esser et al. 2021, eq. 5 with the hinge form)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The autoencoder's adversarial term: make the discriminator score reconstructions as real."""
    return -logits_fake.mean()


@torch.no_grad()
def measure_scaling_factor(vae, batches, generator: torch.Generator | None = None) -> float:
    """``1 / std`` of latents sampled from ``q(z|x)`` over the given image batches.

    Rombach et al. 2022, Sec. 4.3.2 / App. G: rescaling the latents to unit variance before diffusion
    ("we rescale the latents component-wise by 1/sigma, estimated from the first batch of data");
    Stable Diffusion's 0.18215 was found this way. Here it is measured over several batches.
    """
    total, total_sq, count = 0.0, 0.0, 0
    for pixel_values in batches:
        latents = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.sample(generator=generator).double()
        total += latents.sum().item()
        total_sq += (latents**2).sum().item()
        count += latents.numel()
    if count == 0:
        raise ValueError("no images to measure the latent scaling factor on")
    mean = total / count
    std = max(total_sq / count - mean**2, 1e-12) ** 0.5
    return 1.0 / std


@torch.no_grad()
def normalize_latents(vae, batches, generator: torch.Generator | None = None) -> tuple[list[float], list[float]]:
    """Fold a per-channel standardization of the latents into the autoencoder itself.

    Diffusion assumes zero-mean, unit-variance data, but an autoencoder trained from scratch gives
    neither (the default's first one: channel means -0.05 to -0.94, stds 0.48 to 1.53 after the
    single ``scaling_factor``). Rombach et al. 2022 (App. G) rescale by one global factor; here each
    channel ``c`` is standardized, ``z' = (z - mu_c) / sigma_c``, measured on samples of ``q(z|x)``
    over ``batches``, and written into the two 1x1 convolutions around the latent:

    - ``quant_conv`` (moments): the mean half becomes ``(mean - mu) / sigma``, the log-variance
      half ``logvar - 2 log sigma``, so ``q(z'|x)`` is exactly the standardized posterior;
    - ``post_quant_conv``: its weights take ``sigma`` per input channel and its bias ``W @ mu``, so
      decoding ``z'`` gives what decoding ``z`` gave.

    ``scaling_factor`` becomes 1. A stock ``StableDiffusionPipeline`` (which only divides by
    ``scaling_factor``) therefore still decodes correctly, and nothing else has to know.

    Returns the measured ``(mu, sigma)`` per channel.
    """
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise ValueError("normalize_latents needs an AutoencoderKL with quant_conv and post_quant_conv")
    total, total_sq, count = None, None, 0
    for pixel_values in batches:
        latents = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.sample(generator=generator).double()
        sums, squares = latents.sum(dim=(0, 2, 3)), (latents**2).sum(dim=(0, 2, 3))
        total = sums if total is None else total + sums
        total_sq = squares if total_sq is None else total_sq + squares
        count += latents.numel() // latents.shape[1]
    if count == 0:
        raise ValueError("no images to measure the latent statistics on")
    mu = total / count
    sigma = (total_sq / count - mu**2).clamp(min=1e-12).sqrt()
    channels = mu.numel()
    quant, post = vae.quant_conv, vae.post_quant_conv
    mu_w, sigma_w = mu.to(quant.weight.dtype), sigma.to(quant.weight.dtype)
    bias_mu, bias_sigma = mu.to(post.weight.dtype), sigma.to(post.weight.dtype)
    quant.weight[:channels] /= sigma_w.view(-1, 1, 1, 1)
    quant.bias[:channels] = (quant.bias[:channels] - mu_w) / sigma_w
    quant.bias[channels:] -= 2 * sigma_w.log()
    post.bias += post.weight[:, :, 0, 0] @ bias_mu
    post.weight *= bias_sigma.view(1, -1, 1, 1)
    vae.register_to_config(scaling_factor=1.0)
    return mu.tolist(), sigma.tolist()


def vae_reconstructor(vae, batch_size: int = 64, on_latents=None, transform_latents=None):
    """A function from uint8 images ``(N, H, W, 3)`` to their reconstructions through ``vae`` (encode to
    the posterior mean, decode), as :func:`latentdiff.eval.judge.reconstruction_agreement` takes it.
    Pixels are converted with Diffusers' ``VaeImageProcessor`` as the pipelines convert them.
    ``on_latents``, if given, is called with each chunk's latents (unscaled posterior means);
    ``transform_latents``, if given, maps them to what is decoded (e.g. a blur, to see which of the
    latents' detail the decoder needs)."""
    from diffusers.image_processor import VaeImageProcessor

    @torch.no_grad()
    def reconstruct(images):
        pixels = VaeImageProcessor.normalize(VaeImageProcessor.numpy_to_pt(images.astype("float32") / 255.0))
        outputs = []
        for chunk in pixels.split(batch_size):
            latents = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist.mode()
            if on_latents is not None:
                on_latents(latents)
            if transform_latents is not None:
                latents = transform_latents(latents)
            outputs.append(vae.decode(latents).sample.float().cpu())
        decoded = VaeImageProcessor.pt_to_numpy(VaeImageProcessor.denormalize(torch.cat(outputs)))
        return (decoded * 255).round().astype("uint8")

    return reconstruct

"""What the training step feeds the U-Net: token ids of the captions and scaled latents of the images."""

from __future__ import annotations

import torch


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded / truncated to the tokenizer's context (77 for CLIP), as the pipelines do."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def latent_scale_and_shift(vae) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` of a VAE config; latents are ``(z - shift) * scale``."""
    scale = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return scale, float(shift)


@torch.no_grad()
def encode_images(vae, pixel_values: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Scaled latents ``z ~ q(z | x)`` of images in [-1, 1] (Rombach et al. 2022, Sec. 3 and App. G).

    ``vae=None`` is a pixel-space model: the images are the "latents".
    """
    if vae is None:
        return pixel_values
    scale, shift = latent_scale_and_shift(vae)
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample(generator=generator)
    return (latents - shift) * scale

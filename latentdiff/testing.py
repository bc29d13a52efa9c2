"""Tiny random components for tests and examples (as Diffusers' own pipeline tests build them)."""

from __future__ import annotations

import torch

from .config import load_config


def tiny_components(seed: int = 0, resolution: int = 32, text_encoder_kind: str = "clip") -> dict[str, object]:
    """A complete set of untrained Stable-Diffusion-layout components, seeded.

    ``vae``, ``unet``, ``text_encoder``, ``tokenizer`` (CLIP, offline) and ``scheduler`` (DDIM,
    Stable Diffusion's schedule); every forward pass takes milliseconds on a CPU. The VAE
    downsamples by 2, so ``resolution`` 32 gives 16x16x4 latents.
    """
    from diffusers import DDIMScheduler

    from .models import build_components

    config = load_config(overrides={"model.preset": "tiny", "model.text_encoder.kind": text_encoder_kind})
    torch.manual_seed(seed)
    components = build_components(config.model, resolution)
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    components["scheduler"] = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return components

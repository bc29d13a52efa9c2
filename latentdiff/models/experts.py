"""Two U-Nets for two bands of noise levels: a high-noise expert for ``t >= boundary``, the U-Net below.

Balaji et al. 2022, "eDiff-I: Text-to-Image Diffusion Models with an Ensemble of Expert Denoisers": the
denoiser behaves differently along the sampling path (at high noise it lays out what the text names, at low
noise it renders), so one network per band of noise levels does better than one shared by all. On the
built-in shapes the band where an object's place is decided (t >= 700) needs a loss weight that costs the
other bands their shapes and counts when one U-Net is trained with it; an expert of its own gives that band
its own weighting. (Trained together from scratch in the shapes default's minutes, the two do not yet beat
one U-Net: docs/conditioning.md, sixth round.)

Saved in the Diffusers layout as Wan 2.2's pipelines save their two transformers, with the switch given as
``boundary_ratio`` (the expert denoises ``t >= boundary_ratio * num_train_timesteps``), except that here the
U-Net of the low noise levels keeps the name ``unet``, which every Stable Diffusion loader reads, and the
expert is the extra component ``unet_high_noise``.

Written here because Diffusers' Stable Diffusion pipelines and training examples have one U-Net.
"""

from __future__ import annotations

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

__all__ = ["NoiseLevelExperts"]


class NoiseLevelExperts(torch.nn.Module):
    """The denoiser of training: called like a ``UNet2DConditionModel`` on a batch of mixed timesteps, each
    sample goes to the expert of its timestep (pipelines switch experts per step instead:
    :meth:`latentdiff.pipelines.LatentDiffusionMixin.noise_level_experts`).

    Args:
        unet: the denoiser of ``t < boundary``.
        high_noise: the denoiser of ``t >= boundary``, of the same input and output shapes.
        boundary: the first timestep of ``high_noise``.

    Each expert runs on its own samples; one that has none runs on one sample with weight 0, so that every
    parameter takes part in every step, as distributed data parallel expects.
    """

    def __init__(self, unet: torch.nn.Module, high_noise: torch.nn.Module, boundary: float):
        super().__init__()
        if not 0 < boundary:
            raise ValueError(f"boundary must be a positive timestep, got {boundary!r}")
        self.unet = unet
        self.high_noise = high_noise
        self.boundary = float(boundary)

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> UNet2DConditionOutput:
        timesteps = torch.as_tensor(timestep, device=sample.device).flatten()
        timesteps = timesteps.expand(sample.shape[0]) if timesteps.numel() == 1 else timesteps
        high = timesteps >= self.boundary
        output = sample.new_empty(sample.shape)
        for expert, mine in ((self.unet, ~high), (self.high_noise, high)):
            if mine.any():
                output[mine] = expert(sample[mine], timesteps[mine], encoder_hidden_states[mine]).sample.to(output.dtype)
            else:  # a zero-weight pass, so that the expert's parameters still take part in the step
                unused = expert(sample[:1], timesteps[:1], encoder_hidden_states[:1]).sample
                output = output + 0.0 * unused.sum()
        return UNet2DConditionOutput(sample=output)

"""A ``UNet2DConditionModel`` that knows where on the image each of its features is.

Why it exists: a convolutional U-Net has no absolute position. At high noise its input is noise with zero
mean everywhere, so the only cue to where a feature sits is the zero padding at the borders, which reaches
the middle of a 16x16 latent only through many layers; a model that must put "a red circle at the top left"
in its place has to learn that cue first (Liu et al. 2018, "An intriguing failing of convolutional neural
networks and the CoordConv solution"). Transformers get absolute positions from an embedding (Vaswani et
al. 2017; Peebles & Xie 2023, DiT); Diffusers' ``UNet2DConditionModel`` has no such option, so this class
adds one: Fourier features of each latent's normalized coordinates, projected by a learned 1x1 convolution
(initialized to zero, so a new model starts as the stock one) and added to the output of ``conv_in``.

Everything else is the stock class: the same config keys plus ``position_frequencies``, the same weights
plus ``position_proj``, the same ``forward``. A pipeline folder records it as ``["latentdiff",
"PositionalUNet2DConditionModel"]``, so Diffusers' loaders (``StableDiffusionPipeline.from_pretrained``
included) build it once latentdiff is imported. On the shapes default it did not make places followed
(docs/conditioning.md, seventh round): there the top band's training limits, not the U-Net's reach.
"""

from __future__ import annotations

import math

import torch
from diffusers import UNet2DConditionModel


def position_features(height: int, width: int, frequencies: int, device=None, dtype=None) -> torch.Tensor:
    """``(4 * frequencies, height, width)``: sin and cos of ``k * pi * u`` for k = 1..frequencies, for the
    row and the column coordinate ``u`` of each pixel's center, scaled to [-1, 1]: relative to the image, so a
    place keeps its features at any resolution (up to the pixel grid)."""
    rows = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2 - 1
    cols = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 - 1
    k = torch.arange(1, frequencies + 1, device=device, dtype=torch.float32) * math.pi
    row_angles = (k[:, None] * rows[None, :])[:, :, None].expand(-1, -1, width)
    col_angles = (k[:, None] * cols[None, :])[:, None, :].expand(-1, height, -1)
    features = torch.cat([row_angles.sin(), row_angles.cos(), col_angles.sin(), col_angles.cos()])
    return features.to(dtype=dtype)


class PositionalUNet2DConditionModel(UNet2DConditionModel):
    """``UNet2DConditionModel`` with absolute positions added after ``conv_in`` (see the module docstring).

    Args:
        position_frequencies: frequencies per axis of the Fourier features (4 per frequency in all);
            0 gives the stock model.
        **kwargs: every argument of ``UNet2DConditionModel``.
    """

    def __init__(self, position_frequencies: int = 4, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(position_frequencies, int) or position_frequencies < 0:
            raise ValueError(f"position_frequencies must be an integer >= 0, got {position_frequencies!r}")
        # Stock UNet2DConditionModel.__init__ registered its own arguments; this one is ours.
        self.register_to_config(position_frequencies=position_frequencies)
        self.position_proj = None
        if position_frequencies:
            self.position_proj = torch.nn.Conv2d(4 * position_frequencies, self.conv_in.out_channels, kernel_size=1)
            torch.nn.init.zeros_(self.position_proj.weight)
            torch.nn.init.zeros_(self.position_proj.bias)
            # A hook rather than a copy of UNet2DConditionModel.forward (about 300 lines): conv_in's output
            # is the one place every later block reads from.
            self.conv_in.register_forward_hook(self._add_positions)

    def _add_positions(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        features = position_features(
            output.shape[-2], output.shape[-1], self.config.position_frequencies, output.device, output.dtype
        )
        return output + self.position_proj(features[None])

    @staticmethod
    def _get_init_keys(input_class):
        # Diffusers reads a model's config keys from its __init__ signature; ours takes the stock ones as
        # **kwargs, so name them (ConfigMixin.extract_init_dict, from_config, from_pretrained).
        keys = set(UNet2DConditionModel._get_init_keys(UNet2DConditionModel))
        if isinstance(input_class, type) and issubclass(input_class, PositionalUNet2DConditionModel):
            keys.add("position_frequencies")
        return keys


def saved_unet_class(name_or_path: str, subfolder: str | None = None) -> type[UNet2DConditionModel]:
    """The class to load a saved U-Net with: ours when its config has absolute positions, else the stock one
    (which keeps a fine-tuned stock U-Net stock). A folder that cannot be read gives the stock class, whose
    ``from_pretrained`` then reports what is missing."""
    try:
        config = UNet2DConditionModel.load_config(name_or_path, **({"subfolder": subfolder} if subfolder else {}))
    except (OSError, ValueError):
        return UNet2DConditionModel
    return PositionalUNet2DConditionModel if config.get("position_frequencies") else UNet2DConditionModel


# Record the class under its public path, so a pipeline's model_index.json lists it as
# ["latentdiff", "PositionalUNet2DConditionModel"] (as for OpenCLIPTextModel).
PositionalUNet2DConditionModel.__module__ = "latentdiff"

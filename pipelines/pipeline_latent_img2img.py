"""Image-to-image with a latent (or pixel-space) diffusion model: :class:`LatentImg2ImgPipeline`.

SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential
Equations"): the input image is encoded, noised to an intermediate time t0 = `strength` x T of the
forward process, x_t0 = sqrt(alpha_bar_t0) z_0 + sqrt(1 - alpha_bar_t0) eps (Ho et al. 2020, Eq. 4),
and denoised from there under the prompt. `strength` 1 starts from the schedule's noisiest step
(nearly nothing of the image is left), `strength` 0 returns the image's reconstruction.

It *is* a ``diffusers.StableDiffusionImg2ImgPipeline`` (same images on the same components, scheduler
and seed; every loader and argument of it) with what
:class:`~latentdiff.pipelines.pipeline_latent.LatentDiffusionMixin` adds. It takes the components of
:class:`~latentdiff.pipelines.LatentPipeline`, so ``LatentImg2ImgPipeline.from_pipe(pipe)`` shares its weights.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.utils.torch_utils import randn_tensor

from .pipeline_latent import LatentDiffusionMixin, _is_number


def image_count_and_size(image) -> tuple[int, int, int, int | None]:
    """`(number of images, height, width, channels or None)` of a pipeline image input, without converting it."""
    items = image if isinstance(image, list) else [image]
    count, first = 0, items[0]
    for item in items:
        count += item.shape[0] if isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4 else 1
    if isinstance(first, PIL.Image.Image):
        return count, first.height, first.width, None
    if isinstance(first, np.ndarray):  # (H, W), (H, W, C) or (N, H, W, C)
        if first.ndim == 2:
            return count, first.shape[0], first.shape[1], 1
        return count, first.shape[-3], first.shape[-2], first.shape[-1]
    return count, first.shape[-2], first.shape[-1], first.shape[-3] if first.ndim >= 3 else 1


def check_image_input(pipe, image, batch_size: int, latent_channels: int | None = None) -> tuple[int, int, bool]:
    """Check a pipeline's `image` (one for every prompt, or one per prompt; RGB; a multiple of the autoencoder's
    factor in size; a tensor of `latent_channels` channels counts as latents) and return its height, width and
    whether it holds latents."""
    if image is None:
        raise ValueError("`image` is required: the starting image (or images).")
    items = image if isinstance(image, list) else [image]
    if not items or not all(isinstance(item, (PIL.Image.Image, np.ndarray, torch.Tensor)) for item in items):
        raise ValueError(
            "`image` has to be a PIL image, a numpy array, a torch tensor or a non-empty list of them,"
            f" but is {type(image).__name__}."
        )
    if len({type(item) for item in items}) > 1:
        raise ValueError("`image` lists have to hold items of one type (all PIL, all numpy or all torch).")
    image_count, height, width, channels = image_count_and_size(image)
    if image_count not in (1, batch_size):
        raise ValueError(
            f"`image` holds {image_count} images but the prompt batch has {batch_size}; pass one image, or one per prompt."
        )
    is_latent = isinstance(items[0], torch.Tensor) and latent_channels is not None and channels == latent_channels
    if isinstance(items[0], PIL.Image.Image):
        if any(item.mode != "RGB" for item in items):
            modes = sorted({item.mode for item in items})
            raise ValueError(f"`image` has to be RGB, got PIL mode(s) {modes}; convert with `image.convert('RGB')`.")
        if len({item.size for item in items}) > 1:
            raise ValueError(f"`image` holds images of different sizes {sorted({i.size for i in items})} (WxH).")
    elif isinstance(items[0], np.ndarray) and channels != 3:
        raise ValueError(f"`image` arrays need 3 (RGB) channels, last axis, got {channels}.")
    elif isinstance(items[0], torch.Tensor) and channels != 3 and not is_latent:
        expected = "3 (RGB)" + (f" or {latent_channels} (latents)" if latent_channels else "")
        raise ValueError(f"`image` tensors need {expected} channels, got {channels}.")
    elif not is_latent and not isinstance(items[0], PIL.Image.Image):
        if any(not (item.dtype.kind == "f" if isinstance(item, np.ndarray) else item.is_floating_point()) for item in items):
            raise ValueError(f"`image` arrays and tensors hold floats in [0, 1] (divide uint8 pixels by 255), got {items[0].dtype}.")
        low, high = min(float(item.min()) for item in items), max(float(item.max()) for item in items)
        if low < 0 or high > 1:
            raise ValueError(f"`image` values have to lie in [0, 1], got [{low:g}, {high:g}].")
    if not is_latent and (height % pipe.vae_scale_factor or width % pipe.vae_scale_factor):
        raise ValueError(
            f"`image` height and width have to be divisible by {pipe.vae_scale_factor} (the autoencoder's"
            f" downsampling factor) but are {height} and {width}."
        )
    return height, width, is_latent


class LatentImg2ImgPipeline(LatentDiffusionMixin, StableDiffusionImg2ImgPipeline):
    r"""Text-guided image-to-image generation (SDEdit) with a latent diffusion model, or a pixel-space one when
    `vae` is `None`: a [`StableDiffusionImg2ImgPipeline`] with what [`LatentDiffusionMixin`] adds.

    Examples:
        ```py
        >>> from diffusers.utils import load_image
        >>> from latentdiff import LatentImg2ImgPipeline
        >>> pipe = LatentImg2ImgPipeline.from_pretrained("runs/shapes/pipeline")
        >>> image = pipe("a blue square at the top left", image=load_image("circle.png"), strength=0.6).images[0]
        ```
    """

    def prepare_latents(self, image, timestep, batch_size, num_images_per_prompt, dtype, device, generator=None):
        """SDEdit's starting point: the image's latents z_0, noised to `timestep` with the scheduler's `add_noise`.

        One image serves every prompt; one image per prompt serves that prompt's `num_images_per_prompt` images.
        An empty `timestep` (no denoising step, `strength` ~ 0) returns z_0 itself. Unlike Diffusers', this honours
        the autoencoder's `shift_factor` and a pixel-space model.
        """
        image = image.to(device=device, dtype=dtype)
        repeats = batch_size * num_images_per_prompt // image.shape[0]

        def expand(tensor):
            return torch.cat([tensor[i : i + 1] for i in range(tensor.shape[0]) for _ in range(repeats)])

        if self.vae is not None and image.shape[1] == self.latent_channels:
            init_latents = expand(image)
        elif isinstance(generator, list):
            init_latents = self.encode_image_to_latents(expand(image), generator)
        else:
            init_latents = expand(self.encode_image_to_latents(image, generator))
        if timestep is None or not len(timestep):
            return init_latents
        noise = randn_tensor(init_latents.shape, generator=generator, device=device, dtype=dtype)
        return self.scheduler.add_noise(init_latents, noise, timestep)

    def check_call_inputs(self, arguments: dict, batch_size: int) -> None:
        """`strength` in [0, 1] (0 returns the image's reconstruction); `image` one for every prompt or one per prompt,
        RGB (arrays and tensors in [0, 1]), a multiple of `vae_scale_factor` in size; a tensor with the autoencoder's
        latent channel count is taken as latents."""
        strength = arguments["strength"]
        if not _is_number(strength) or not 0 <= strength <= 1:
            raise ValueError(f"`strength` has to be a number in [0.0, 1.0] but is {strength!r}.")
        check_image_input(self, arguments["image"], batch_size, self.latent_channels if self.vae is not None else None)

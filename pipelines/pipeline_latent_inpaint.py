# Adapted from Diffusers' `pipeline_stable_diffusion_inpaint.py` and `pipeline_repaint.py`
# (Copyright 2026 The HuggingFace Team, Apache License 2.0).
"""Inpainting with any latent (or pixel-space) text-to-image model: :class:`LatentInpaintPipeline`.

The white part of a mask is repainted under a prompt; the black part is kept. Two kinds of U-Net:

* **Any text-to-image U-Net** (as many input channels as the latents): the known region is blended in
  at every step (Meng et al. 2022, "SDEdit"; Lugmayr et al. 2022, "RePaint", Alg. 1 lines 5-8):
  after each denoising step to timestep t, the latent outside the mask is replaced by the image's own
  latent z_0 noised to t, ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps`` (Ho et al. 2020, Eq. 4).
  The mask is reduced to latent size by max-pooling, so every latent cell that holds a repainted
  pixel is generated.
* **RePaint resampling** (``jump_n_sample > 1``): plain blending conditions the generated part on the
  known part only through the U-Net's view of the noisy latent, which leaves visible seams. RePaint
  goes back up the chain every ``jump_length`` steps, ``jump_n_sample - 1`` times, and denoises again,
  so that the two parts agree (RePaint Sec. 4.2, Fig. 3 and 9; the schedule is :func:`repaint_schedule`).
  A jump from the sampler's timestep s to an earlier timestep t draws from the forward process,
  ``q(z_t | z_s) = N(sqrt(abar_t / abar_s) z_s, (1 - abar_t / abar_s) I)`` (Ho et al. 2020, Eq. 2
  composed over the steps between s and t), so it works between the few timesteps of a DDIM or
  DPM-Solver schedule as well as between DDPM's single steps.
* **An inpainting U-Net** (Stable Diffusion inpainting layout: ``2 * latent_channels + 1`` input
  channels): the U-Net is conditioned on the mask and on the latents of the masked image (Rombach et
  al. 2022, Sec. 4.5), and no blending is needed.

In every case the decoded image is pasted onto the input under the full-resolution mask, so the
pixels outside the mask are the input's, exactly (``feather`` widens the pasted edge into a
linear ramp outside the mask; pixels farther than ``feather`` from the mask stay exact). It is a
``diffusers.StableDiffusionInpaintPipeline`` (its loaders: LoRA, textual inversion, ...) with what
:class:`~latentdiff.pipelines.pipeline_latent.LatentDiffusionMixin` adds, and its own denoising loop for the
resampling; with jump_n_sample=1 and a 4- or 9-channel U-Net it gives Diffusers' latents. It takes the
components of :class:`~latentdiff.pipelines.LatentPipeline` (``LatentInpaintPipeline.from_pipe(pipe)``).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    RePaintScheduler,
    StableDiffusionInpaintPipeline,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor
from scipy import ndimage

from .pipeline_latent import (
    LatentDiffusionMixin,
    LatentPipelineOutput,
    _is_number,
    _is_positive_int,
    denoising_call,
)
from .pipeline_latent_img2img import check_image_input

#: A mask value (in [0, 1], after conversion to one channel) at or above this is repainted.
MASK_THRESHOLD = 0.5
#: ITU-R 601-2 luma weights: what PIL's ``convert("L")`` applies to RGB, applied to RGB arrays too.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
#: Schedulers that RePaint resampling can jump back in (see `LatentInpaintPipeline.check_inputs`).
RESAMPLING_SCHEDULERS = (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler)



def repaint_schedule(num_steps: int, jump_length: int = 1, jump_n_sample: int = 1) -> list[int]:
    r"""The order in which RePaint visits the sampler's steps (Lugmayr et al. 2022, Sec. 4.2 and Fig. 9).

    Returns step indices: index ``i`` is the latent at the sampler's ``i``-th timestep (``0``: the initial
    noise; ``num_steps``: the final sample). A step ``i -> i + 1`` is one denoising step, one U-Net call at
    ``timesteps[i]``; a decrease ``i -> i - jump_length`` is a jump back up the chain with the forward process
    (no U-Net call). Counted from the end of the chain, at every ``jump_length``-th state (and never at the final
    sample) the chain goes back ``jump_length`` steps, ``jump_n_sample - 1`` times, so each stretch is denoised
    ``jump_n_sample`` times. The number of U-Net calls is therefore (N steps, jump length j, r samples)::

        N + (r - 1) * j * len(range(0, N - j, j))

    ``jump_n_sample = 1`` (or ``jump_length >= num_steps``) gives the plain chain ``[0, 1, ..., num_steps]``.

    The pattern is the one of RePaint's ``get_schedule_jump``, taken from Diffusers' ``RePaintScheduler`` (run with
    one training step per sampler step, so that its timesteps are the levels ``num_steps - 1 ... 0``); RePaint
    goes back one level at a time, here the consecutive levels of a jump are merged into one draw of
    ``q(z_t | z_s)``, which has the same distribution as their composition.

    Example: ``repaint_schedule(4, jump_length=3, jump_n_sample=2) == [0, 1, 2, 3, 0, 1, 2, 3, 4]`` (7 U-Net calls).
    """
    for name, value in (("num_steps", num_steps), ("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` has to be a positive integer but is {value!r}.")
    pattern = RePaintScheduler(num_train_timesteps=num_steps)
    pattern.set_timesteps(num_steps, jump_length=jump_length, jump_n_sample=jump_n_sample)
    # RePaint's levels run from num_steps - 1 (pure noise) to -1 (the sample): level l is step index N - 1 - l.
    visited = [num_steps - 1 - int(level) for level in pattern.timesteps.tolist()] + [num_steps]
    schedule = [visited[0]]
    for index in visited[1:]:
        if index < schedule[-1] and len(schedule) >= 2 and schedule[-1] < schedule[-2]:
            schedule[-1] = index  # one more level of the same jump
        else:
            schedule.append(index)
    return schedule


def mask_to_tensor(mask_image, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """Masks as a float tensor of zeros and ones, `(N, 1, H, W)`: 1 = repaint (white), 0 = keep (black).

    Conversion rules, applied before any check of the mask's content:

    * a PIL image of any mode is converted to 8-bit grayscale with `image.convert("L")` (RGB by the ITU-R 601-2
      luma `L = 0.299 R + 0.587 G + 0.114 B`; an alpha channel is ignored) and divided by 255;
    * a numpy array is `(H, W)`, `(H, W, C)` or `(N, H, W, C)`, a torch tensor `(H, W)`, `(C, H, W)` or
      `(N, C, H, W)`, with `C` = 1, or 3 (RGB, reduced to the same luma); values are booleans, `uint8` (divided
      by 255) or floats in [0, 1];
    * a list holds one mask per entry, all of one size;
    * then every value at or above `threshold` becomes 1 (repaint), every other 0 (keep).

    Raises:
        ValueError: for what cannot be converted: another type, channel count or layout, integers other than
            `uint8`, floats outside [0, 1], a list of masks of different sizes, a threshold outside (0, 1].
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"`mask_threshold` has to be a number in (0, 1] but is {threshold!r}.")
    items = mask_image if isinstance(mask_image, list) else [mask_image]
    if not items:
        raise ValueError("`mask_image` is an empty list; pass one mask, or one per prompt.")
    masks = []
    for item in items:
        if isinstance(item, PIL.Image.Image):
            values = torch.from_numpy(np.asarray(item.convert("L"), dtype=np.float32) / 255.0)[None, None]
        elif isinstance(item, (np.ndarray, torch.Tensor)):
            values = _array_mask_to_tensor(item)
        else:
            raise ValueError(
                "`mask_image` has to be a PIL image, a numpy array, a torch tensor or a list of them, but is"
                f" {type(item).__name__}."
            )
        masks.append(values)
    sizes = sorted({tuple(mask.shape[-2:]) for mask in masks})
    if len(sizes) > 1:
        raise ValueError(f"`mask_image` holds masks of different sizes {sizes} (HxW); pass masks of one size.")
    return (torch.cat(masks) >= threshold).to(torch.float32)


def _array_mask_to_tensor(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """One numpy / torch mask (see :func:`mask_to_tensor`) as float values in [0, 1], `(N, 1, H, W)`."""
    is_numpy = isinstance(mask, np.ndarray)
    shape = tuple(mask.shape)
    values = torch.from_numpy(np.ascontiguousarray(mask)) if is_numpy else mask.detach().cpu()
    if values.ndim == 2:
        values = values[None, None]
    elif values.ndim in (3, 4):
        if is_numpy:  # channels last
            values = values[None] if values.ndim == 3 else values
            values = values.permute(0, 3, 1, 2)
        elif values.ndim == 3:
            values = values[None]
    else:
        raise ValueError(f"`mask_image` arrays and tensors have 2 to 4 dimensions, got shape {shape}.")
    channels = values.shape[1]
    if channels not in (1, 3):
        layout = "(H, W, C) or (N, H, W, C)" if is_numpy else "(C, H, W) or (N, C, H, W)"
        raise ValueError(
            f"`mask_image` of shape {shape} has {channels} channels (layout {layout}); a mask has 1 channel, or 3"
            " (RGB, converted to luma)."
        )
    if values.dtype == torch.bool:
        values = values.to(torch.float32)
    elif values.dtype == torch.uint8:
        values = values.to(torch.float32) / 255.0
    elif values.is_floating_point():
        values = values.to(torch.float32)
        if values.numel() and (values.min() < 0 or values.max() > 1):
            raise ValueError(
                f"`mask_image` float values have to lie in [0, 1], got [{values.min().item():g},"
                f" {values.max().item():g}]."
            )
    else:
        raise ValueError(
            f"`mask_image` of dtype {mask.dtype}: integer masks have to be uint8 (0 to 255); pass booleans, uint8 or"
            " floats in [0, 1]."
        )
    if channels == 3:
        weights = torch.tensor(LUMA_WEIGHTS, dtype=torch.float32).view(1, 3, 1, 1)
        values = (values * weights).sum(dim=1, keepdim=True)
    return values


def feather_alpha(mask: torch.Tensor, feather: int) -> torch.Tensor:
    """The weight of the generated image when it is pasted onto the input: 1 inside the mask, a linear ramp
    `1 - d / (feather + 1)` at distance `d` (pixels, Euclidean) outside it, and 0 from distance `feather + 1` on.

    `mask` is `(N, 1, H, W)` of zeros and ones; `feather = 0` returns the mask itself. The distances come from
    `scipy.ndimage.distance_transform_edt`. An empty mask gives zeros.
    """
    if feather == 0:
        return mask
    alphas = []
    for single in mask[:, 0].cpu().numpy() > 0.5:
        if not single.any():
            alphas.append(np.zeros(single.shape, dtype=np.float32))
            continue
        distance = ndimage.distance_transform_edt(~single)  # 0 inside the mask
        alphas.append(np.clip(1.0 - distance / (feather + 1), 0.0, 1.0).astype(np.float32))
    return torch.from_numpy(np.stack(alphas))[:, None].to(mask.device)


class LatentInpaintPipeline(LatentDiffusionMixin, StableDiffusionInpaintPipeline):
    r"""Text-guided inpainting with any latent text-to-image model (blending with optional RePaint resampling), with
    a Stable-Diffusion-inpainting-layout U-Net (mask conditioning), or with a pixel-space model (`vae=None`).

    Examples:
        ```py
        >>> from PIL import Image
        >>> from latentdiff import LatentInpaintPipeline

        >>> pipe = LatentInpaintPipeline.from_pretrained("runs/shapes/pipeline")
        >>> image = Image.open("scene.png").convert("RGB")
        >>> mask = Image.open("mask.png")  # white: repaint, black: keep
        >>> result = pipe("a blue square at the top left", image=image, mask_image=mask, jump_length=5, jump_n_sample=3)
        ```
    """

    def check_call_inputs(self, arguments: dict, batch_size: int) -> None:
        """`strength` in (0, 1], the RePaint arguments and scheduler, the U-Net's channels, the image and the mask."""
        strength, num_inference_steps = arguments["strength"], arguments["num_inference_steps"]
        feather, jump_length, jump_n_sample = arguments["feather"], arguments["jump_length"], arguments["jump_n_sample"]
        if not _is_number(strength) or not 0 < strength <= 1:
            raise ValueError(f"`strength` has to be a number in (0.0, 1.0] but is {strength!r}.")
        num_steps = min(int(num_inference_steps * strength), num_inference_steps)
        if num_steps < 1:
            message = f"`strength`={strength} of `num_inference_steps`={num_inference_steps} leaves no denoising step"
            raise ValueError(message + "; raise one of them.")
        if not _is_positive_int(feather + 1 if _is_number(feather) else feather):
            raise ValueError(f"`feather` has to be a non-negative integer (pixels) but is {feather!r}.")
        for name, value in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
            if not _is_positive_int(value):
                raise ValueError(f"`{name}` has to be a positive integer but is {value!r}.")
        if jump_n_sample > 1:
            if jump_length >= num_steps:
                raise ValueError(
                    f"`jump_length`={jump_length} leaves no room to jump back in a chain of {num_steps} denoising"
                    f" steps; RePaint resampling needs `jump_length` < {num_steps} (or `jump_n_sample=1`)."
                )
            # Jumping back needs a sampler whose state at a step is the latent alone (DDIM, DDPM) or can be restarted
            # there (DPM-Solver's multistep history is cleared by `set_timesteps`, and `set_begin_index` points it at
            # the step), in the variance-preserving parametrization that q(z_t | z_s) is written in. Euler-type
            # samplers work on sigma-scaled latents and PNDM keeps a step counter, so they are refused.
            if not isinstance(self.scheduler, RESAMPLING_SCHEDULERS) or self.scheduler.config.get("use_flow_sigmas"):
                names = ", ".join(cls.__name__ for cls in RESAMPLING_SCHEDULERS)
                raise ValueError(
                    f"RePaint resampling (`jump_n_sample` > 1) jumps back up the chain, which works with {names}"
                    f" but not with {type(self.scheduler).__name__}; switch with"
                    " `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)` or use `jump_n_sample=1`."
                )

        in_channels = self.unet.config.in_channels
        if in_channels not in (self.latent_channels, 2 * self.latent_channels + 1):
            raise ValueError(
                f"The U-Net takes {in_channels} input channels; inpainting needs {self.latent_channels} (the latents:"
                f" blending) or {2 * self.latent_channels + 1} (latents, mask and masked-image latents: an"
                " inpainting U-Net)."
            )
        height, width = self.check_image_and_mask(
            arguments["image"], arguments["mask_image"], arguments["mask_threshold"], batch_size
        )
        self.check_latents(arguments["latents"], batch_size * arguments["num_images_per_prompt"], height, width)

    def check_image_and_mask(self, image, mask_image, mask_threshold, batch_size: int) -> tuple[int, int]:
        """Check the image(s) and the mask(s) (converted by the documented rules, then of the image's size); return
        the height and width of the output."""
        height, width, _ = check_image_input(self, image, batch_size)
        if mask_image is None:
            raise ValueError("`mask_image` is required: white (1) where to repaint, black (0) where to keep.")
        mask = mask_to_tensor(mask_image, mask_threshold)
        if mask.shape[0] not in (1, batch_size):
            raise ValueError(
                f"`mask_image` holds {mask.shape[0]} masks but the prompt batch has {batch_size}; pass one mask, or"
                " one per prompt."
            )
        if tuple(mask.shape[-2:]) != (height, width):
            raise ValueError(
                f"`mask_image` is {mask.shape[-2]}x{mask.shape[-1]} (HxW) but `image` is {height}x{width}; the mask"
                " has to cover the image pixel for pixel."
            )
        return height, width

    def preprocess_image_and_mask(
        self, image: PipelineImageInput, mask_image, mask_threshold: float = MASK_THRESHOLD, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The input pixels in [0, 1], `(n, 3, H, W)`, and the binary masks, `(n, 1, H, W)`, with `n` = 1 or the
        number of prompts (a single image or mask serves every prompt). See :func:`mask_to_tensor` for the mask."""
        pixels = self.pixel_processor.preprocess(image).to(torch.float32)
        mask = mask_to_tensor(mask_image, mask_threshold)
        count = max(pixels.shape[0], mask.shape[0])
        return self._expand(pixels, count), self._expand(mask, count)

    @staticmethod
    def _expand(tensor: torch.Tensor, total: int) -> torch.Tensor:
        """Each item `total // len(tensor)` times in a row (the order of the prompt embeddings). `torch.cat` keeps
        the memory format, so the U-Net computes exactly as in Diffusers."""
        repeats = total // tensor.shape[0]
        if repeats == 1:
            return tensor
        return torch.cat([tensor[i : i + 1] for i in range(tensor.shape[0]) for _ in range(repeats)])

    def encode_expanded(self, images: torch.Tensor, num_images: int, generator=None) -> torch.Tensor:
        """Latents of `images` (`1` or one per prompt, in [-1, 1]) for all `num_images` outputs.

        With one generator the distinct images are encoded once and repeated (as Diffusers does); with a list, every
        output's image is encoded with that output's generator.
        """
        if isinstance(generator, list):
            return self.encode_image_to_latents(self._expand(images, num_images), generator)
        return self._expand(self.encode_image_to_latents(images, generator), num_images)

    def alpha_bar(self, step_index: int, timestep: torch.Tensor) -> torch.Tensor:
        r"""abar_t of the latent at the scheduler's step `step_index` (timestep `timestep`): the signal variance of
        `z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps`. DPM-Solver reads it from its sigmas (`abar = 1 / (1 +
        sigma^2)`, so that Karras or exponential sigmas count), DDIM and DDPM from `alphas_cumprod`."""
        if isinstance(self.scheduler, DPMSolverMultistepScheduler):
            sigma = self.scheduler.sigmas[step_index].to(torch.float64)
            return 1.0 / (1.0 + sigma**2)
        return self.scheduler.alphas_cumprod[int(timestep)].to(torch.float64)

    def jump_back(
        self,
        latents: torch.Tensor,
        from_index: int,
        to_index: int,
        timesteps: torch.Tensor,
        step_offset: int,
        generator=None,
    ) -> torch.Tensor:
        r"""Go back up the chain from step `from_index` to the earlier step `to_index` (RePaint, Alg. 1 line 10).

        Draws from the forward process between the two timesteps s = `timesteps[from_index]` and t =
        `timesteps[to_index]` (Ho et al. 2020, Eq. 2, composed over the steps in between):

        .. math::
            z_t = \sqrt{\bar\alpha_t / \bar\alpha_s}\, z_s + \sqrt{1 - \bar\alpha_t / \bar\alpha_s}\, \epsilon

        with fresh noise from `generator` (one generator per image when a list). Then the scheduler is restarted
        at that step (`set_timesteps` clears DPM-Solver's history; `set_begin_index` points it at the step;
        DDIM and DDPM keep no state). `step_offset` is the index of `timesteps[0]` in the full schedule.

        Diffusers' `RePaintScheduler` is not used for the steps (only for the jump pattern, in
        :func:`repaint_schedule`): its `step` is DDIM's update for epsilon-prediction alone, on its own evenly spaced
        timesteps, with the known part re-noised inside it under the opposite mask convention (1 = keep), and its
        `undo_step` walks back one training step at a time. Here the model's own scheduler takes the denoising steps
        (any prediction type, timestep spacing, DPM-Solver), and a jump is one closed-form draw between its timesteps.
        """
        ratio = self.alpha_bar(step_offset + to_index, timesteps[to_index]) / self.alpha_bar(
            step_offset + from_index, timesteps[from_index]
        )
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        latents = ratio.sqrt().to(latents.dtype) * latents + (1 - ratio).sqrt().to(latents.dtype) * noise
        self.scheduler.set_timesteps(self.scheduler.num_inference_steps, device=latents.device)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(step_offset + to_index)
        return latents

    def paste(
        self, generated: torch.Tensor, pixels: torch.Tensor, mask: torch.Tensor, feather: int = 0
    ) -> torch.Tensor:
        """The generated images (in [-1, 1]) pasted onto the input `pixels` (in [0, 1]) under `mask`: the result, in
        [0, 1], equals `pixels` exactly wherever the mask (widened by :func:`feather_alpha`) is 0."""
        generated = (generated.to(torch.float32) / 2 + 0.5).clamp(0, 1)  # VaeImageProcessor.denormalize
        alpha = feather_alpha(mask, feather).to(generated.device)
        pixels = pixels.to(generated.device)
        blended = torch.lerp(pixels, generated, alpha)
        return torch.where(alpha == 0, pixels, torch.where(alpha == 1, generated, blended))

    @torch.no_grad()
    @denoising_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput = None,
        mask_image: PipelineImageInput = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        jump_length: int = 1,
        jump_n_sample: int = 1,
        strength: float = 1.0,
        feather: int = 0,
        mask_threshold: float = MASK_THRESHOLD,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: PipelineCallback | MultiPipelineCallbacks | Any | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> LatentPipelineOutput | tuple:
        r"""Repaint the white part of `mask_image` under a prompt; the output equals `image` outside the mask.

        The arguments of `LatentPipeline.__call__` (steps, guidance, `guidance_interval` and `negative_prompt` default
        to the model's saved ones), and:
            image: one RGB image for every prompt, or one per prompt (arrays `(H, W, 3)`, tensors `(3, H, W)`, or
                batched, hold floats in [0, 1]); a multiple of `vae_scale_factor` in size; the output has its size.
            mask_image: white (1) where to repaint, black (0) where to keep, of the image's size; converted as
                :func:`mask_to_tensor` documents; max-pooled to latent size for blending (a latent cell is generated
                when any of its pixels is white), nearest-downsampled for an inpainting U-Net, as it was trained.
            jump_length, jump_n_sample: RePaint's j and r (:func:`repaint_schedule`); `jump_n_sample=1` is plain
                blending; more needs `DDIMScheduler`, `DDPMScheduler` or `DPMSolverMultistepScheduler`.
            strength: in (0, 1]: 1 starts the masked area from pure noise; less from the image noised to
                `strength` x T (SDEdit), running the last `int(num_inference_steps * strength)` steps.
            feather: width in pixels of the blended edge outside the mask (:func:`feather_alpha`) when the result
                is pasted onto `image`; pixels farther than this from the mask are the input's, exactly.
            mask_threshold: mask values at or above this are repainted.
            latents: the noise eps `(batch, latent channels, height / f, width / f)`: the start of the chain, and
                the noise of the known region at every step.
            output_type: `"latent"` gives the final latents, before decoding and pasting.
            callback_on_step_end: called after each U-Net call, as `(self, call_index, timestep, callback_kwargs)`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        num_inference_steps = self.sampling_default("num_inference_steps", num_inference_steps)
        guidance_scale = self.sampling_default("guidance_scale", guidance_scale)
        if negative_prompt_embeds is None:
            negative_prompt = self.carried_negative_prompt(prompt, self.sampling_default("negative_prompt", negative_prompt))
        # 1. Check inputs, before any model runs
        batch_size = self.check_all_inputs(locals())
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        num_images = batch_size * num_images_per_prompt

        device = self._execution_device

        # 3. Preprocess image and mask: pixels in [0, 1] and a binary mask, one each, or one per prompt
        pixels, mask = self.preprocess_image_and_mask(image, mask_image, mask_threshold, generator)
        empty = [index for index in range(mask.shape[0]) if not mask[index].any()]
        if empty:
            which = "every mask" if len(empty) == mask.shape[0] else f"the mask(s) at {empty}"
            message = f"`mask_image`: {which} is empty (black everywhere: nothing to repaint), so the input image is"
            warnings.warn(message + " returned there unchanged.", UserWarning, stacklevel=2)
        pixels, mask = pixels.to(device), mask.to(device)
        if len(empty) == mask.shape[0]:
            if output_type == "latent":  # the image's own latents
                dtype = self.vae.dtype if self.vae is not None else self.unet.dtype
                image = self.encode_expanded(2 * pixels.to(dtype) - 1, num_images, generator)
            else:
                image = self.image_processor.postprocess(
                    self._expand(pixels, num_images), output_type=output_type, do_denormalize=[False] * num_images
                )
            return LatentPipelineOutput(images=image) if return_dict else (image,)

        # 4. Encode input prompt
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=(cross_attention_kwargs or {}).get("scale"),
            clip_skip=self.clip_skip,
        )
        # For classifier free guidance, we need to do two forward passes.
        # Here we concatenate the unconditional and text embeddings into a single batch
        # to avoid doing two forward passes
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        dtype = prompt_embeds.dtype

        # 5. Set timesteps: the last `strength` part of the schedule, visited in RePaint's order
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self.check_timesteps(num_inference_steps)
        timesteps, num_steps = self.get_timesteps(num_inference_steps, strength, device)
        step_offset = len(self.scheduler.timesteps) - len(timesteps)
        schedule = repaint_schedule(num_steps, jump_length, jump_n_sample)
        num_unet_calls = sum(after == before + 1 for before, after in zip(schedule, schedule[1:]))

        # 6. Prepare latent variables. The random draws come in Diffusers' order: the image's latents (when needed),
        # the noise, then the masked image's latents (inpainting U-Net).
        is_inpainting_unet = self.unet.config.in_channels == 2 * self.latent_channels + 1
        images = 2 * pixels.to(dtype) - 1
        image_latents = None
        if not is_inpainting_unet or strength < 1.0:
            image_latents = self.encode_expanded(images, num_images, generator)
        latent_shape = (
            num_images,
            self.latent_channels,
            pixels.shape[-2] // self.vae_scale_factor,
            pixels.shape[-1] // self.vae_scale_factor,
        )
        if latents is None:
            noise = randn_tensor(latent_shape, generator=generator, device=device, dtype=dtype)
        else:
            noise = latents.to(device=device, dtype=dtype)
        if strength < 1.0:
            latents = self.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(num_images))
        else:
            latents = noise * self.scheduler.init_noise_sigma

        # 7. Prepare the mask at latent size: max-pooled for blending, nearest-downsampled (as Stable Diffusion
        # inpainting was trained) for the U-Net's mask channel, with the masked image's latents
        mask_full = self._expand(mask, num_images)
        blend_mask = F.max_pool2d(mask_full, self.vae_scale_factor) if self.vae_scale_factor > 1 else mask_full
        blend_mask = blend_mask.to(dtype)
        if is_inpainting_unet:
            mask_condition = F.interpolate(mask_full, size=latent_shape[-2:]).to(dtype)
            masked_image_latents = self.encode_expanded(images * (mask < 0.5), num_images, generator).to(dtype)
            if self.do_classifier_free_guidance:
                mask_condition = torch.cat([mask_condition] * 2)
                masked_image_latents = torch.cat([masked_image_latents] * 2)

        # 8. Prepare extra step kwargs.
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 9. Denoising loop, with RePaint's jumps back up the chain
        self._num_timesteps = num_unet_calls
        call_index = 0
        with self.progress_bar(total=num_unet_calls) as progress_bar:
            for index, next_index in zip(schedule, schedule[1:]):
                if self.interrupt:
                    continue
                if next_index < index:
                    latents = self.jump_back(latents, index, next_index, timesteps, step_offset, generator)
                    continue
                t = timesteps[index]

                # expand the latents if we are doing classifier free guidance
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                if is_inpainting_unet:
                    latent_model_input = torch.cat([latent_model_input, mask_condition, masked_image_latents], dim=1)

                # predict the noise residual
                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=prompt_embeds,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    return_dict=False,
                )[0]

                # perform guidance
                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)

                if self.do_classifier_free_guidance and guidance_rescale > 0.0:
                    noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=guidance_rescale)

                # compute the previous noisy sample x_t -> x_t-1
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                # the known region: the image's latents noised to the new timestep (clean after the last step)
                if not is_inpainting_unet:
                    known_latents = image_latents
                    if next_index < len(timesteps):
                        known_timestep = timesteps[next_index : next_index + 1]
                        known_latents = self.scheduler.add_noise(image_latents, noise, known_timestep)
                    latents = (1 - blend_mask) * known_latents + blend_mask * latents

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, call_index, t, callback_kwargs)

                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                call_index += 1
                progress_bar.update()

        # 10. Decode, and paste onto the input under the full-resolution mask
        if output_type == "latent":
            image = latents
        else:
            generated = self.decode_latents_to_image(latents, generator=generator)
            image = self.paste(generated, self._expand(pixels, num_images), mask_full, feather)
            image = self.image_processor.postprocess(
                image, output_type=output_type, do_denormalize=[False] * num_images
            )

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)

        return LatentPipelineOutput(images=image)

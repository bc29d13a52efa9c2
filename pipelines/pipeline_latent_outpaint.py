# Adapted from Diffusers' `pipeline_stable_diffusion_inpaint.py` and `pipeline_repaint.py`
# (Copyright 2026 The HuggingFace Team, Apache License 2.0).
"""Outpainting with any latent (or pixel-space) text-to-image model: :class:`LatentOutpaintPipeline`.

The canvas is extended by given amounts of pixels on each side (or to a target size, the image
centred), the new area is given a starting content (``fill``: noise, the image's edge pixels
stretched outwards, or a blur of them), and then it is inpainted exactly as
:class:`~latentdiff.pipelines.LatentInpaintPipeline` does, with the new area as the mask:

* with any text-to-image U-Net, the image's own latents are blended in outside the new area at every
  step, optionally with RePaint resampling (Lugmayr et al. 2022, "RePaint": ``jump_length``,
  ``jump_n_sample``), which goes back up the chain so that the new area agrees with the image;
* with an inpainting U-Net (Stable Diffusion inpainting layout), it is conditioned on the mask and the
  masked canvas instead.

The decoded canvas is pasted onto the extended input, so its middle equals the input image pixel for
pixel (``feather`` widens the pasted edge into the image by that many pixels). The fill shapes the
result when ``strength < 1`` (the new area starts from the fill noised to ``strength`` x T, SDEdit) and
through what the encoder sees near the border; at ``strength = 1`` the new area starts from pure noise.
It takes the components of :class:`~latentdiff.pipelines.LatentPipeline`:
``LatentOutpaintPipeline(**pipe.components)`` and ``LatentOutpaintPipeline.from_pipe(pipe)`` share its
weights. The inpainting steps are copies of ``pipeline_latent_inpaint.py``'s (Diffusers' single-file
policy), marked ``# Copied from``.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    ModelMixin,
    RePaintScheduler,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from scipy import ndimage
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from latentdiff.hub import PipelineHubMixin

from .pipeline_latent import OUTPUT_TYPES, LatentPipelineOutput

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from PIL import Image
        >>> from latentdiff import LatentOutpaintPipeline

        >>> pipe = LatentOutpaintPipeline.from_pretrained("runs/shapes/pipeline")
        >>> image = Image.open("scene.png").convert("RGB")  # 64 x 64
        >>> wide = pipe("two blue squares", image=image, left=32, right=32).images[0]  # 128 x 64
        ```
"""

#: The starting contents of the new area (see `LatentOutpaintPipeline.extend_canvas`).
FILL_MODES = ("noise", "edge", "blur")
# Copied from latentdiff.pipelines.pipeline_latent_inpaint.RESAMPLING_SCHEDULERS
RESAMPLING_SCHEDULERS = (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler)


# Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.rescale_noise_cfg
def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale=0.0):
    r"""
    Rescales `noise_cfg` tensor based on `guidance_rescale` to improve image quality and fix overexposure. Based on
    Section 3.4 from [Common Diffusion Noise Schedules and Sample Steps are
    Flawed](https://huggingface.co/papers/2305.08891).
    """
    std_text = noise_pred_text.std(dim=list(range(1, noise_pred_text.ndim)), keepdim=True)
    std_cfg = noise_cfg.std(dim=list(range(1, noise_cfg.ndim)), keepdim=True)
    # rescale the results from guidance (fixes overexposure)
    noise_pred_rescaled = noise_cfg * (std_text / std_cfg)
    # mix with the original results from guidance by factor guidance_rescale to avoid "plain looking" images
    noise_cfg = guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg
    return noise_cfg


# Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img.retrieve_latents
def retrieve_latents(
    encoder_output: torch.Tensor, generator: torch.Generator | None = None, sample_mode: str = "sample"
):
    if hasattr(encoder_output, "latent_dist") and sample_mode == "sample":
        return encoder_output.latent_dist.sample(generator)
    elif hasattr(encoder_output, "latent_dist") and sample_mode == "argmax":
        return encoder_output.latent_dist.mode()
    elif hasattr(encoder_output, "latents"):
        return encoder_output.latents
    else:
        raise AttributeError("Could not access latents of provided encoder_output")


# Copied from latentdiff.pipelines.pipeline_latent_img2img._image_count_and_size
def _image_count_and_size(image) -> tuple[int, int, int, int | None]:
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
    # (C, H, W) or (N, C, H, W)
    return count, first.shape[-2], first.shape[-1], first.shape[-3] if first.ndim >= 3 else 1


# Copied from latentdiff.pipelines.pipeline_latent_inpaint.repaint_schedule
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


# Copied from latentdiff.pipelines.pipeline_latent_inpaint.feather_alpha
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


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of `(N, C, H, W)` images, standard deviation `sigma` pixels, borders replicated.

    Written here because torchvision's `gaussian_blur` pads by reflection, which needs the kernel's radius to be
    smaller than the image, and the blur fill is as wide as the new area.
    """
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    images = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), horizontal, groups=channels)
    return F.conv2d(F.pad(images, (0, 0, radius, radius), mode="replicate"), vertical, groups=channels)


class LatentOutpaintPipeline(PipelineHubMixin, DiffusionPipeline, StableDiffusionMixin):
    r"""
    Text-guided outpainting: extend the canvas and fill the new area, with any latent text-to-image model (blending
    with optional RePaint resampling), with a Stable-Diffusion-inpainting-layout U-Net, or with a pixel-space model.

    This model inherits from [`DiffusionPipeline`] and [`~latentdiff.hub.PipelineHubMixin`] (safe loading, model
    card, `push_to_hub`). The components are those of [`~latentdiff.pipelines.LatentPipeline`].

    Args:
        vae ([`AutoencoderKL`] or `None`):
            Autoencoder between images and latents; `None` for a pixel-space model.
        text_encoder ([`~transformers.CLIPTextModel`] or a [`ModelMixin`] text tower):
            Any module whose call on token ids returns the hidden states at index `0`.
        tokenizer ([`~transformers.CLIPTokenizer`]):
            Tokenizer of the text encoder.
        unet ([`UNet2DConditionModel`]):
            The denoiser: `in_channels` equal to the latent channels (blending), or `2 * latent channels + 1` (an
            inpainting U-Net: latents, mask and masked-image latents).
        scheduler ([`SchedulerMixin`]):
            Any Diffusers scheduler with `add_noise`; RePaint resampling needs `DDIMScheduler`, `DDPMScheduler` or
            `DPMSolverMultistepScheduler`.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    # Copied from latentdiff.pipelines.pipeline_latent_inpaint.LatentInpaintPipeline.__init__
    def __init__(
        self,
        vae: AutoencoderKL | None,
        text_encoder: PreTrainedModel | ModelMixin,
        tokenizer: PreTrainedTokenizerBase,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
    ):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        # The model's own sampling settings (e.g. {"guidance_scale": 4.0}): read by `from_pretrained` from
        # `latentdiff.json`, written back by `save_pretrained`.
        self.sampling_defaults: dict = {}
        # Pixel space (no autoencoder): the "latents" are the image itself, at full size, in [-1, 1].
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.latent_channels = self.vae.config.latent_channels if self.vae is not None else 3
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # Input pixels stay in [0, 1] and at their size, so that they can be pasted back exactly.
        self.pixel_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_resize=False, do_normalize=False
        )

    # Copied from latentdiff.pipelines.pipeline_latent.LatentPipeline.encode_prompt
    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
    ):
        r"""
        Encodes the prompt into text encoder hidden states (as `StableDiffusionPipeline.encode_prompt`, without LoRA
        and textual inversion; a single `negative_prompt` string applies to every prompt, and `clip_skip` applies
        to the negative prompt too).

        Args:
            prompt (`str` or `list[str]`, *optional*):
                prompt to be encoded
            device: (`torch.device`):
                torch device
            num_images_per_prompt (`int`):
                number of images that should be generated per prompt
            do_classifier_free_guidance (`bool`):
                whether to use classifier free guidance or not
            negative_prompt (`str` or `list[str]`, *optional*):
                The prompt or prompts not to guide the image generation. Ignored when not using guidance.
            prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated text embeddings. If not provided, they are computed from `prompt`.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated negative text embeddings. If not provided, they are computed from `negative_prompt`.
            clip_skip (`int`, *optional*):
                Number of layers to be skipped from the text encoder: 1 uses the output of the pre-final layer.
        """
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]

        if prompt_embeds is None:
            text_inputs = self.tokenizer(
                prompt,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            text_input_ids = text_inputs.input_ids
            untruncated_ids = self.tokenizer(prompt, padding="longest", return_tensors="pt").input_ids

            if untruncated_ids.shape[-1] >= text_input_ids.shape[-1] and not torch.equal(
                text_input_ids, untruncated_ids
            ):
                removed_text = self.tokenizer.batch_decode(
                    untruncated_ids[:, self.tokenizer.model_max_length - 1 : -1]
                )
                logger.warning(
                    "`prompt` was truncated: the text encoder reads at most"
                    f" {self.tokenizer.model_max_length} tokens; dropped: {removed_text}"
                )

            prompt_embeds = self._encode_token_ids(text_input_ids, text_inputs.attention_mask, device, clip_skip)

        if self.text_encoder is not None:
            prompt_embeds_dtype = self.text_encoder.dtype
        elif self.unet is not None:
            prompt_embeds_dtype = self.unet.dtype
        else:
            prompt_embeds_dtype = prompt_embeds.dtype

        prompt_embeds = prompt_embeds.to(dtype=prompt_embeds_dtype, device=device)

        bs_embed, seq_len, _ = prompt_embeds.shape
        # duplicate text embeddings for each generation per prompt, using mps friendly method
        prompt_embeds = prompt_embeds.repeat(1, num_images_per_prompt, 1)
        prompt_embeds = prompt_embeds.view(bs_embed * num_images_per_prompt, seq_len, -1)

        # get unconditional embeddings for classifier free guidance
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None:
                uncond_tokens = [""] * batch_size
            elif isinstance(negative_prompt, str):
                uncond_tokens = [negative_prompt] * batch_size
            else:
                uncond_tokens = list(negative_prompt)

            max_length = prompt_embeds.shape[1]
            uncond_input = self.tokenizer(
                uncond_tokens,
                padding="max_length",
                max_length=max_length,
                truncation=True,
                return_tensors="pt",
            )
            # Read from the same layer as the prompt (Diffusers reads the last layer here whatever `clip_skip`),
            # so that guidance contrasts two embeddings of one kind.
            negative_prompt_embeds = self._encode_token_ids(
                uncond_input.input_ids, uncond_input.attention_mask, device, clip_skip
            )

        if do_classifier_free_guidance:
            # duplicate unconditional embeddings for each generation per prompt, using mps friendly method
            seq_len = negative_prompt_embeds.shape[1]

            negative_prompt_embeds = negative_prompt_embeds.to(dtype=prompt_embeds_dtype, device=device)

            negative_prompt_embeds = negative_prompt_embeds.repeat(1, num_images_per_prompt, 1)
            negative_prompt_embeds = negative_prompt_embeds.view(batch_size * num_images_per_prompt, seq_len, -1)

        return prompt_embeds, negative_prompt_embeds

    # Copied from latentdiff.pipelines.pipeline_latent.LatentPipeline._encode_token_ids
    def _encode_token_ids(self, input_ids, attention_mask, device, clip_skip=None) -> torch.Tensor:
        """Hidden states of the text encoder for `input_ids`, read through its public call only.

        Any text encoder whose call returns the last hidden states at index 0 works. `clip_skip` also needs
        `output_hidden_states=True` and the final layer norm as `text_model.final_layer_norm` (CLIP) or
        `final_layer_norm`.
        """
        encoder_kwargs = {}
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            encoder_kwargs["attention_mask"] = attention_mask.to(device)
        if clip_skip is None:
            return self.text_encoder(input_ids.to(device), **encoder_kwargs)[0]

        final_layer_norm = getattr(getattr(self.text_encoder, "text_model", None), "final_layer_norm", None)
        final_layer_norm = final_layer_norm or getattr(self.text_encoder, "final_layer_norm", None)
        if final_layer_norm is None:
            raise ValueError(
                f"`clip_skip`: the text encoder {type(self.text_encoder).__name__} exposes no final layer norm "
                "(`text_model.final_layer_norm` or `final_layer_norm`), so intermediate layers cannot be used; "
                "leave `clip_skip=None`"
            )
        outputs = self.text_encoder(input_ids.to(device), output_hidden_states=True, **encoder_kwargs)
        hidden_states = getattr(outputs, "hidden_states", None)
        if hidden_states is None:
            raise ValueError(
                f"`clip_skip`: the text encoder {type(self.text_encoder).__name__} returned no hidden states "
                "for `output_hidden_states=True`; leave `clip_skip=None`"
            )
        if clip_skip + 1 > len(hidden_states):
            raise ValueError(
                f"`clip_skip`={clip_skip} skips more layers than the text encoder has ({len(hidden_states) - 1})"
            )
        # The last hidden state passes through the final layer norm; an earlier one must too.
        return final_layer_norm(hidden_states[-(clip_skip + 1)])

    # Copied from latentdiff.pipelines.pipeline_latent.LatentPipeline.prepare_extra_step_kwargs
    def prepare_extra_step_kwargs(self, generator, eta):
        # prepare extra kwargs for the scheduler step, since not all schedulers have the same signature
        # eta (η) is only used with the DDIMScheduler, it will be ignored for other schedulers.
        # eta corresponds to η in DDIM paper: https://huggingface.co/papers/2010.02502
        # and should be between [0, 1]

        accepts_eta = "eta" in set(inspect.signature(self.scheduler.step).parameters.keys())
        extra_step_kwargs = {}
        if accepts_eta:
            extra_step_kwargs["eta"] = eta

        # check if the scheduler accepts generator
        accepts_generator = "generator" in set(inspect.signature(self.scheduler.step).parameters.keys())
        if accepts_generator:
            extra_step_kwargs["generator"] = generator
        return extra_step_kwargs

    def check_inputs(
        self,
        prompt,
        image,
        left,
        right,
        top,
        bottom,
        height,
        width,
        fill,
        strength,
        num_inference_steps,
        jump_length=1,
        jump_n_sample=1,
        feather=0,
        num_images_per_prompt=1,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        latents=None,
        generator=None,
        output_type="pil",
        clip_skip=None,
        callback_on_step_end_tensor_inputs=None,
    ):
        """Raise a `ValueError` naming the argument at the first invalid input, before any model runs."""
        batch_size = self.check_sampling_inputs(
            prompt,
            strength,
            num_inference_steps,
            jump_length,
            jump_n_sample,
            feather,
            num_images_per_prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            generator,
            output_type,
            clip_skip,
            callback_on_step_end_tensor_inputs,
        )
        image_height, image_width = self.check_image(image, batch_size)
        left, right, top, bottom = self.canvas_padding(
            image_height, image_width, left, right, top, bottom, height, width
        )
        if fill not in FILL_MODES:
            raise ValueError(f"`fill` has to be one of {FILL_MODES} but is {fill!r}.")
        self.check_latents(
            latents, batch_size * num_images_per_prompt, image_height + top + bottom, image_width + left + right
        )

    def canvas_padding(
        self,
        image_height: int,
        image_width: int,
        left: int = 0,
        right: int = 0,
        top: int = 0,
        bottom: int = 0,
        height: int | None = None,
        width: int | None = None,
    ) -> tuple[int, int, int, int]:
        """The pixels to add `(left, right, top, bottom)`: as given, or, for a target `height` / `width`, the difference
        split between the two sides (the image centred; the odd latent cell, if any, goes right / bottom).

        Raises:
            ValueError: an amount that is negative or not a multiple of `vae_scale_factor` (the new area has to cover
                whole latent cells), a target smaller than the image or not a multiple of it, both amounts and a
                target, or nothing to add.
        """
        factor = self.vae_scale_factor
        sides = {"left": left, "right": right, "top": top, "bottom": bottom}
        for name, value in sides.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` has to be a non-negative integer (pixels to add) but is {value!r}.")
        if height is not None or width is not None:
            if any(sides.values()):
                raise ValueError(
                    "Pass either the pixels to add (`left`, `right`, `top`, `bottom`) or a target size (`height`,"
                    " `width`), not both."
                )
            for name, target, size in (("height", height, image_height), ("width", width, image_width)):
                if target is None:
                    continue
                if isinstance(target, bool) or not isinstance(target, int) or target < size or target % factor:
                    raise ValueError(
                        f"`{name}` has to be an integer multiple of {factor} (the autoencoder's factor) of at least"
                        f" the image's {name} {size}, but is {target!r}."
                    )
            extra_height = (height if height is not None else image_height) - image_height
            extra_width = (width if width is not None else image_width) - image_width
            top = extra_height // 2 // factor * factor
            left = extra_width // 2 // factor * factor
            sides = {"left": left, "right": extra_width - left, "top": top, "bottom": extra_height - top}
        for name, value in sides.items():
            if value % factor:
                raise ValueError(
                    f"`{name}`={value} is not a multiple of {factor} (the autoencoder's downsampling factor); the new"
                    " area has to cover whole latent cells."
                )
        if not any(sides.values()):
            raise ValueError(
                "Nothing to outpaint: give `left`, `right`, `top` or `bottom` > 0, or a `height` / `width` larger than"
                " the image."
            )
        return sides["left"], sides["right"], sides["top"], sides["bottom"]

    def extend_canvas(
        self,
        pixels: torch.Tensor,
        left: int,
        right: int,
        top: int,
        bottom: int,
        fill: str = "edge",
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The extended canvas `(n, 3, H + top + bottom, W + left + right)` in [0, 1], with the image `pixels`
        (`(n, 3, H, W)`) unchanged in it, and the mask of the new area `(n, 1, ...)` (1 = new).

        The new area's starting content (`fill`):

        * `"edge"`: the image's border pixels stretched outwards (replicate padding);
        * `"blur"`: the same, blurred with a Gaussian of standard deviation a quarter of the widest side added (at
          least 1 pixel), so that only the edge colours carry over;
        * `"noise"`: uniform noise in [0, 1], drawn from `generator` (the first one of a list).
        """
        padding = (left, right, top, bottom)
        stretched = F.pad(pixels, padding, mode="replicate")
        if fill == "edge":
            canvas = stretched
        elif fill == "blur":
            canvas = gaussian_blur(stretched, sigma=max(1.0, max(padding) / 4))
        elif fill == "noise":
            fill_generator = generator[0] if isinstance(generator, list) else generator
            noise_device = fill_generator.device if fill_generator is not None else pixels.device
            canvas = torch.rand(stretched.shape, generator=fill_generator, device=noise_device).to(stretched)
        else:
            raise ValueError(f"`fill` has to be one of {FILL_MODES} but is {fill!r}.")
        mask = torch.ones_like(stretched[:, :1])
        mask[:, :, top : top + pixels.shape[-2], left : left + pixels.shape[-1]] = 0
        canvas = torch.where(mask.bool(), canvas, stretched)  # the image itself, exactly, in the middle
        return canvas, mask

    # Copied from latentdiff.pipelines.pipeline_latent_inpaint.LatentInpaintPipeline.check_sampling_inputs
    def check_sampling_inputs(
        self,
        prompt,
        strength,
        num_inference_steps,
        jump_length=1,
        jump_n_sample=1,
        feather=0,
        num_images_per_prompt=1,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        generator=None,
        output_type="pil",
        clip_skip=None,
        callback_on_step_end_tensor_inputs=None,
    ) -> int:
        """Check everything but the image, the mask and `latents` (the prompts, the sampling and RePaint arguments,
        and that the U-Net's input channels suit inpainting); return the number of prompts."""
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise ValueError(f"`strength` has to be a number in (0.0, 1.0] but is {strength!r}.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` has to be a positive integer but is {num_inference_steps!r}.")
        num_steps = min(int(num_inference_steps * strength), num_inference_steps)
        if num_steps < 1:
            raise ValueError(
                f"`strength`={strength} of `num_inference_steps`={num_inference_steps} leaves no denoising step;"
                " raise one of them."
            )
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(
                f"`num_images_per_prompt` has to be a positive integer but is {num_images_per_prompt!r}."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` has to be one of {OUTPUT_TYPES} but is {output_type!r}.")
        if clip_skip is not None and (not isinstance(clip_skip, int) or clip_skip < 0):
            raise ValueError(f"`clip_skip` has to be a non-negative integer or None but is {clip_skip!r}.")
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found"
                f" {[k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]}"
            )

        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        elif prompt is None and prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`.")
        elif prompt is not None and not (
            isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))
        ):
            raise ValueError(f"`prompt` has to be a string or a non-empty list of strings but is {prompt!r}.")
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]

        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            if not isinstance(negative_prompt, list) or not all(isinstance(p, str) for p in negative_prompt):
                raise ValueError(
                    f"`negative_prompt` has to be a string or a list of strings but is {negative_prompt!r}."
                )
            if len(negative_prompt) != batch_size:
                raise ValueError(
                    f"`negative_prompt` has {len(negative_prompt)} entries but the prompt batch has {batch_size};"
                    " pass one negative prompt per prompt, or a single string for all of them."
                )
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    "`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, but"
                    f" got: `prompt_embeds` {tuple(prompt_embeds.shape)} != `negative_prompt_embeds`"
                    f" {tuple(negative_prompt_embeds.shape)}."
                )

        num_images = batch_size * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != num_images:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators, but {num_images} images are requested"
                f" ({batch_size} prompts x {num_images_per_prompt} images per prompt); pass one per image."
            )

        if isinstance(feather, bool) or not isinstance(feather, int) or feather < 0:
            raise ValueError(f"`feather` has to be a non-negative integer (pixels) but is {feather!r}.")
        for name, value in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
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
            if not isinstance(self.scheduler, RESAMPLING_SCHEDULERS) or getattr(
                self.scheduler.config, "use_flow_sigmas", False
            ):
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
        return batch_size

    # Copied from latentdiff.pipelines.pipeline_latent_inpaint.LatentInpaintPipeline.check_image
    def check_image(self, image, batch_size: int) -> tuple[int, int]:
        """Check the input image(s) (one, or one per prompt; RGB; floats in [0, 1]; a multiple of the autoencoder's
        factor in size) and return their height and width."""
        if image is None:
            raise ValueError("`image` is required: the image (or images) to inpaint.")
        items = image if isinstance(image, list) else [image]
        if not items or not all(isinstance(item, (PIL.Image.Image, np.ndarray, torch.Tensor)) for item in items):
            raise ValueError(
                "`image` has to be a PIL image, a numpy array, a torch tensor or a non-empty list of them,"
                f" but is {type(image).__name__}."
            )
        if len({type(item) for item in items}) > 1:
            raise ValueError("`image` lists have to hold items of one type (all PIL, all numpy or all torch).")
        image_count, height, width, channels = _image_count_and_size(image)
        if image_count not in (1, batch_size):
            raise ValueError(
                f"`image` holds {image_count} images but the prompt batch has {batch_size}; pass one image, or"
                " one per prompt."
            )
        if isinstance(items[0], PIL.Image.Image):
            if any(item.mode != "RGB" for item in items):
                modes = sorted({item.mode for item in items})
                raise ValueError(
                    f"`image` has to be RGB, got PIL mode(s) {modes}; convert with `image.convert('RGB')`."
                )
            if len({item.size for item in items}) > 1:
                raise ValueError(f"`image` holds images of different sizes {sorted({i.size for i in items})} (WxH).")
        else:
            if channels != 3:
                layout = "last axis" if isinstance(items[0], np.ndarray) else "axis -3"
                raise ValueError(f"`image` arrays and tensors need 3 (RGB) channels ({layout}), got {channels}.")
            if any(not (item.dtype.kind == "f" if isinstance(item, np.ndarray) else item.is_floating_point())
                   for item in items):
                raise ValueError(
                    "`image` arrays and tensors hold floats in [0, 1] (divide uint8 pixels by 255), got"
                    f" {items[0].dtype}."
                )
            low, high = min(float(item.min()) for item in items), max(float(item.max()) for item in items)
            if low < 0 or high > 1:
                raise ValueError(f"`image` values have to lie in [0, 1], got [{low:g}, {high:g}].")
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(
                f"`image` height and width have to be divisible by {self.vae_scale_factor} (the autoencoder's"
                f" downsampling factor) but are {height} and {width}."
            )
        return height, width

    # Copied from latentdiff.pipelines.pipeline_latent_inpaint.LatentInpaintPipeline.check_latents
    def check_latents(self, latents, num_images: int, height: int, width: int) -> None:
        """Check the shape of user-given noise `latents` for `num_images` outputs of `height` x `width` pixels."""
        if latents is not None:
            expected = (
                num_images,
                self.latent_channels,
                height // self.vae_scale_factor,
                width // self.vae_scale_factor,
            )
            if tuple(latents.shape) != expected:
                raise ValueError(f"`latents` has to have shape {expected} but has {tuple(latents.shape)}.")

    # Copied from latentdiff.pipelines.pipeline_latent_inpaint.LatentInpaintPipeline._expand
    @staticmethod
    def _expand(tensor: torch.Tensor, total: int) -> torch.Tensor:
        """Each item `total // len(tensor)` times in a row (the order of the prompt embeddings). `torch.cat` keeps
        the memory format, so the U-Net computes exactly as in Diffusers."""
        repeats = total // tensor.shape[0]
        if repeats == 1:
            return tensor
        return torch.cat([tensor[i : i + 1] for i in range(tensor.shape[0]) for _ in range(repeats)])

    # Copied from latentdiff.pipelines.pipeline_latent_img2img.LatentImg2ImgPipeline.encode_image_to_latents
    def encode_image_to_latents(self, image: torch.Tensor, generator=None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents z_0 = (E(x) - shift) * scale; a pixel-space pipeline keeps the image.

        With a list of generators, image `i` is encoded with `generator[i]`.
        """
        if self.vae is None:
            return image
        if isinstance(generator, list):
            latents = [
                retrieve_latents(self.vae.encode(image[i : i + 1]), generator=generator[i])
                for i in range(image.shape[0])
            ]
            latents = torch.cat(latents, dim=0)
        else:
            latents = retrieve_latents(self.vae.encode(image), generator=generator)
        shift_factor = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift_factor) * self.vae.config.scaling_factor

    # Copied from latentdiff.pipelines.pipeline_latent_inpaint.LatentInpaintPipeline.encode_expanded
    def encode_expanded(self, images: torch.Tensor, num_images: int, generator=None) -> torch.Tensor:
        """Latents of `images` (`1` or one per prompt, in [-1, 1]) for all `num_images` outputs.

        With one generator the distinct images are encoded once and repeated (as Diffusers does); with a list, every
        output's image is encoded with that output's generator.
        """
        if isinstance(generator, list):
            return self.encode_image_to_latents(self._expand(images, num_images), generator)
        return self._expand(self.encode_image_to_latents(images, generator), num_images)

    # Copied from latentdiff.pipelines.pipeline_latent.LatentPipeline.decode_latents_to_image
    def decode_latents_to_image(self, latents: torch.Tensor, generator=None) -> torch.Tensor:
        """Latents -> images in [-1, 1] (`B x 3 x H x W`): undo the latent scale and shift, then decode.

        A pixel-space pipeline (`vae=None`) only clamps its samples to [-1, 1].
        """
        if self.vae is None:
            return latents.clamp(-1, 1)
        shift_factor = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents / self.vae.config.scaling_factor + shift_factor
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False, generator=generator)[0]

    # Copied from latentdiff.pipelines.pipeline_latent.LatentPipeline.check_timesteps
    def check_timesteps(self, num_inference_steps: int) -> None:
        """Raise a `ValueError` when the scheduler's timesteps (after `set_timesteps`) reach past the training ones.

        Diffusers' SD-style configs ("leading" spacing, steps_offset=1) give timestep 1000 of 1000 when
        `num_inference_steps` equals the training steps (diffusers issue #10003); say so before it fails deep inside.
        """
        scheduler_config = self.scheduler.config
        last_timestep = int(self.scheduler.timesteps.max()) if len(self.scheduler.timesteps) else 0
        if last_timestep >= scheduler_config.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} with this scheduler's timestep_spacing="
                f"{scheduler_config.get('timestep_spacing')!r} and steps_offset={scheduler_config.get('steps_offset')} "
                f"reaches timestep {last_timestep}, past the model's {scheduler_config.num_train_timesteps} training "
                "timesteps; use fewer steps or a scheduler built with steps_offset=0 or timestep_spacing='trailing' "
                "(Scheduler.from_config(config, steps_offset=0))"
            )

    # Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img.StableDiffusionImg2ImgPipeline.get_timesteps
    def get_timesteps(self, num_inference_steps, strength, device):
        # get the original timestep using init_timestep
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)

        t_start = max(num_inference_steps - init_timestep, 0)
        timesteps = self.scheduler.timesteps[t_start * self.scheduler.order :]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start * self.scheduler.order)

        return timesteps, num_inference_steps - t_start

    # Copied from latentdiff.pipelines.pipeline_latent_inpaint.LatentInpaintPipeline.alpha_bar
    def alpha_bar(self, step_index: int, timestep: torch.Tensor) -> torch.Tensor:
        r"""abar_t of the latent at the scheduler's step `step_index` (timestep `timestep`): the signal variance of
        `z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps`. DPM-Solver reads it from its sigmas (`abar = 1 / (1 +
        sigma^2)`, so that Karras or exponential sigmas count), DDIM and DDPM from `alphas_cumprod`."""
        if isinstance(self.scheduler, DPMSolverMultistepScheduler):
            sigma = self.scheduler.sigmas[step_index].to(torch.float64)
            return 1.0 / (1.0 + sigma**2)
        return self.scheduler.alphas_cumprod[int(timestep)].to(torch.float64)

    # Copied from latentdiff.pipelines.pipeline_latent_inpaint.LatentInpaintPipeline.jump_back
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

    # Copied from latentdiff.pipelines.pipeline_latent_inpaint.LatentInpaintPipeline.paste
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

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def guidance_rescale(self):
        return self._guidance_rescale

    @property
    def clip_skip(self):
        return self._clip_skip

    # `guidance_scale` is the guidance weight w of equation (2) of the Imagen paper
    # (https://huggingface.co/papers/2205.11487): `guidance_scale = 1` means no classifier-free guidance.
    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput = None,
        left: int = 0,
        right: int = 0,
        top: int = 0,
        bottom: int = 0,
        height: int | None = None,
        width: int | None = None,
        fill: str = "edge",
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        jump_length: int = 1,
        jump_n_sample: int = 1,
        strength: float = 1.0,
        feather: int = 0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
    ) -> LatentPipelineOutput | tuple:
        r"""
        Extend `image` by `left` / `right` / `top` / `bottom` pixels (or to `height` x `width`) and paint the new
        area under a prompt; the output's middle equals `image`.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompt or prompts to guide image generation (describing the whole extended image). If not
                defined, pass `prompt_embeds`.
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The image(s) to extend: one for every prompt, or one per prompt. RGB; arrays `(H, W, 3)` and tensors
                `(3, H, W)` (or batched) hold floats in [0, 1]. Height and width are multiples of `vae_scale_factor`.
            left, right, top, bottom (`int`, *optional*, default to 0):
                Pixels to add on each side: multiples of `vae_scale_factor`, at least one of them positive.
            height, width (`int`, *optional*):
                Instead of the sides: the size of the extended image (multiples of `vae_scale_factor`, at least the
                image's), with the image centred (see `canvas_padding`).
            fill (`str`, *optional*, defaults to `"edge"`):
                The new area's starting content: `"edge"`, `"blur"` or `"noise"` (see `extend_canvas`). It shapes
                the result when `strength < 1`.
            negative_prompt (`str` or `list[str]`, *optional*):
                What to guide away from: one string for every prompt, or one per prompt.
            num_inference_steps (`int`, *optional*, defaults to 50):
                The number of denoising steps of the sampler's schedule (RePaint resampling adds U-Net calls; see
                :func:`repaint_schedule`).
            guidance_scale (`float`, *optional*, defaults to 7.5):
                Classifier-free guidance weight w (Ho & Salimans 2022); on when `guidance_scale > 1`.
            jump_length (`int`, *optional*, defaults to 1):
                RePaint's j: how many steps each resampling jump goes back up the chain.
            jump_n_sample (`int`, *optional*, defaults to 1):
                RePaint's r: how many times each stretch of `jump_length` steps is denoised; 1 is plain blending.
                More needs `DDIMScheduler`, `DDPMScheduler` or `DPMSolverMultistepScheduler`.
            strength (`float`, *optional*, defaults to 1.0):
                In (0, 1]: 1 starts the new area from pure noise; less starts from the filled canvas noised to
                `strength` x T (SDEdit) and runs the last `int(num_inference_steps * strength)` steps.
            feather (`int`, *optional*, defaults to 0):
                Width in pixels of the blended edge inside the image when the result is pasted onto the canvas;
                pixels farther than this from the new area are the input's, exactly.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                The number of images to generate per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Generator(s) for the noise fill, the encoder's sample, the noise and the resampling jumps, one per
                image when a list; the result is a function of them.
            latents (`torch.Tensor`, *optional*):
                The noise eps of shape `(batch, latent channels, height / f, width / f)` of the extended image.
            prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated text embeddings, instead of `prompt`.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated negative text embeddings, instead of `negative_prompt`.
            eta (`float`, *optional*, defaults to 0.0):
                The η of the DDIM paper (Song et al. 2021); only used by `DDIMScheduler`.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"` (the final latents, before decoding and pasting).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return a [`LatentPipelineOutput`] instead of a plain tuple.
            callback_on_step_end (`Callable`, `PipelineCallback`, `MultiPipelineCallbacks`, *optional*):
                Called after each U-Net call as `callback_on_step_end(self, call_index, timestep, callback_kwargs)`;
                may return replacements for the tensors in `callback_kwargs`.
            callback_on_step_end_tensor_inputs (`list`, *optional*):
                The tensors passed to `callback_on_step_end`, from `self._callback_tensor_inputs`.
            guidance_rescale (`float`, *optional*, defaults to 0.0):
                Guidance rescale factor φ of Lin et al. 2024, Sec. 3.4.
            clip_skip (`int`, *optional*):
                Number of final text-encoder layers to skip (1: use the pre-final layer).

        Examples:

        Returns:
            [`LatentPipelineOutput`] or `tuple`: the extended images, as `LatentPipelineOutput(images=...)` or
            `(images,)`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            image,
            left,
            right,
            top,
            bottom,
            height,
            width,
            fill,
            strength,
            num_inference_steps,
            jump_length,
            jump_n_sample,
            feather,
            num_images_per_prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            latents,
            generator,
            output_type,
            clip_skip,
            callback_on_step_end_tensor_inputs,
        )

        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._interrupt = False

        # 2. Define call parameters
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        num_images = batch_size * num_images_per_prompt

        device = self._execution_device

        # 3. Extend the canvas: the image in the middle, the fill around it, the mask white on the new area
        image_pixels = self.pixel_processor.preprocess(image).to(torch.float32)
        image_height, image_width = image_pixels.shape[-2:]
        padding = self.canvas_padding(image_height, image_width, left, right, top, bottom, height, width)
        pixels, mask = self.extend_canvas(image_pixels, *padding, fill=fill, generator=generator)
        pixels, mask = pixels.to(device), mask.to(device)

        # 4. Encode input prompt
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
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
                    return_dict=False,
                )[0]

                # perform guidance
                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)

                if self.do_classifier_free_guidance and self.guidance_rescale > 0.0:
                    noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=self.guidance_rescale)

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

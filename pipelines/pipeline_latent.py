# Adapted from Diffusers' `pipeline_stable_diffusion.py`
# (Copyright 2026 The HuggingFace Team, Apache License 2.0).
"""Text-to-image with a latent (or pixel-space) diffusion model: :class:`LatentPipeline`.

The pipeline of Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion
Models"): a text encoder turns the prompt into the U-Net's cross-attention context, the U-Net
denoises Gaussian noise in the autoencoder's latent space under classifier-free guidance (Ho &
Salimans 2022), and the autoencoder's decoder maps the result to pixels. It is
``diffusers.StableDiffusionPipeline`` without the safety checker, IP-adapter and LoRA plumbing;
on the same components, scheduler and seed both give the same images. Two additions:

* ``vae=None``: a pixel-space model (Ho et al. 2020), whose "latents" are the pixels in [-1, 1];
* :meth:`LatentPipeline.interpolate`: frames between two seeds by spherical interpolation of the
  initial noise and deterministic DDIM sampling (Song et al. 2021, Sec. 5.3).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, ModelMixin, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from latentdiff.hub import PipelineHubMixin

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from latentdiff import LatentPipeline
        >>> from latentdiff.models.schedulers import scheduler_from_name

        >>> pipe = LatentPipeline.from_pretrained("runs/shapes/pipeline")
        >>> pipe.scheduler = scheduler_from_name("dpm", pipe.scheduler.config)
        >>> image = pipe("a red circle at the top left", num_inference_steps=25).images[0]
        >>> image.save("circle.png")
        ```
"""


@dataclass
class LatentPipelineOutput(BaseOutput):
    """Output of the latentdiff pipelines.

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The generated images: a list of PIL images, or an array / tensor of shape
            `(batch_size, height, width, 3)` (`np`) or `(batch_size, 3, height, width)` (`pt`, `latent`).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


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


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995) -> torch.Tensor:
    r"""Spherical linear interpolation between two tensors (Shoemake 1985), as used for the initial
    noise of DDIM in Song et al. 2021, "Denoising Diffusion Implicit Models", Sec. 5.3:

    .. math::
        x_T^{(t)} = \frac{\sin((1 - t)\theta)}{\sin\theta} x_T^{(0)} + \frac{\sin(t\theta)}{\sin\theta} x_T^{(1)},
        \qquad \theta = \arccos\frac{\langle x_T^{(0)}, x_T^{(1)} \rangle}{\|x_T^{(0)}\| \|x_T^{(1)}\|}

    Unlike the linear blend, this keeps the norm of high-dimensional Gaussian noise, so every frame
    is a plausible starting point. Nearly parallel inputs (``|cos θ| > dot_threshold``) are blended
    linearly. Computed in float64; ``t = 0`` and ``t = 1`` return ``v0`` and ``v1`` exactly.
    """
    a, b = v0.double(), v1.double()
    cos_theta = (a.flatten() @ b.flatten()) / (a.norm() * b.norm())
    if cos_theta.abs() > dot_threshold:
        mixed = (1 - t) * a + t * b
    else:
        theta = torch.arccos(cos_theta)
        mixed = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return mixed.to(v0.dtype)


class LatentPipeline(PipelineHubMixin, DiffusionPipeline, StableDiffusionMixin):
    r"""
    Text-to-image generation with a latent diffusion model (or a pixel-space one when `vae` is `None`).

    This model inherits from [`DiffusionPipeline`] (saving, loading, device placement) and from
    [`~latentdiff.hub.PipelineHubMixin`]: `from_pretrained` refuses pickle weights unless
    `allow_pickle=True` and ignores a Stable Diffusion folder's `safety_checker` and
    `feature_extractor`; `save_pretrained` writes safetensors and a model card; `push_to_hub`
    uploads with `huggingface_hub`.

    Args:
        vae ([`AutoencoderKL`] or `None`):
            Autoencoder between images and latents; its `config.scaling_factor` (and `shift_factor`, if set)
            scale the latents. `None` for a pixel-space model.
        text_encoder ([`~transformers.CLIPTextModel`] or a [`ModelMixin`] text tower):
            Any module whose call on token ids returns the hidden states at index `0`, such as
            [`~latentdiff.models.text_encoders.OpenCLIPTextModel`].
        tokenizer ([`~transformers.CLIPTokenizer`]):
            Tokenizer of the text encoder.
        unet ([`UNet2DConditionModel`]):
            The denoiser, conditioned on the text encoder's hidden states.
        scheduler ([`SchedulerMixin`]):
            Any Diffusers scheduler (see `latentdiff.models.schedulers.scheduler_from_name`).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

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
        # Pixel space (no autoencoder): the "latents" are the image itself, at full size.
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

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

    # Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.prepare_extra_step_kwargs
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
        height,
        width,
        num_inference_steps,
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
        if height % self.vae_scale_factor != 0 or width % self.vae_scale_factor != 0:
            raise ValueError(
                f"`height` and `width` have to be divisible by {self.vae_scale_factor} (the autoencoder's"
                f" downsampling factor) but are {height} and {width}."
            )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` has to be a positive integer but is {num_inference_steps!r}.")
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
        if latents is not None:
            expected = (
                num_images,
                self.unet.config.in_channels,
                height // self.vae_scale_factor,
                width // self.vae_scale_factor,
            )
            if tuple(latents.shape) != expected:
                raise ValueError(f"`latents` has to have shape {expected} but has {tuple(latents.shape)}.")

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator, latents=None):
        """The initial noise x_T, scaled by the scheduler's `init_noise_sigma` (as in `StableDiffusionPipeline`)."""
        shape = (
            batch_size,
            num_channels_latents,
            int(height) // self.vae_scale_factor,
            int(width) // self.vae_scale_factor,
        )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)

        # scale the initial noise by the standard deviation required by the scheduler
        latents = latents * self.scheduler.init_noise_sigma
        return latents

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

    def decode_latents_to_image(self, latents: torch.Tensor, generator=None) -> torch.Tensor:
        """Latents -> images in [-1, 1] (`B x 3 x H x W`): undo the latent scale and shift, then decode.

        A pixel-space pipeline (`vae=None`) only clamps its samples to [-1, 1].
        """
        if self.vae is None:
            return latents.clamp(-1, 1)
        shift_factor = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents / self.vae.config.scaling_factor + shift_factor
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False, generator=generator)[0]

    def default_height_width(self) -> tuple[int, int]:
        """The size the U-Net was built for: `unet.config.sample_size` times the autoencoder's factor."""
        sample_size = self.unet.config.sample_size
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        return height * self.vae_scale_factor, width * self.vae_scale_factor

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
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
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
        Generate images from text.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompt or prompts to guide image generation. If not defined, pass `prompt_embeds`.
            negative_prompt (`str` or `list[str]`, *optional*):
                What to guide away from: one string for every prompt, or one per prompt. Ignored without
                guidance (`guidance_scale <= 1`).
            height (`int`, *optional*, defaults to `self.unet.config.sample_size * self.vae_scale_factor`):
                The height in pixels of the generated image; a multiple of `vae_scale_factor`.
            width (`int`, *optional*, defaults to `self.unet.config.sample_size * self.vae_scale_factor`):
                The width in pixels of the generated image; a multiple of `vae_scale_factor`.
            num_inference_steps (`int`, *optional*, defaults to 50):
                The number of denoising steps (at least 1).
            guidance_scale (`float`, *optional*, defaults to 7.5):
                Classifier-free guidance weight w (Ho & Salimans 2022): `eps = eps_uncond + w (eps_text -
                eps_uncond)`. Guidance is on when `guidance_scale > 1`.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                The number of images to generate per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Generator(s) for the initial noise (and stochastic schedulers), one per image when a list.
            latents (`torch.Tensor`, *optional*):
                Pre-generated initial noise of shape `(batch, unet.in_channels, height / f, width / f)`,
                unscaled (the scheduler's `init_noise_sigma` is applied here).
            prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated text embeddings, instead of `prompt`.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated negative text embeddings, instead of `negative_prompt`.
            eta (`float`, *optional*, defaults to 0.0):
                The η of the DDIM paper (Song et al. 2021): 0 is deterministic DDIM. Only used by `DDIMScheduler`.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Return a [`LatentPipelineOutput`] instead of a plain tuple.
            callback_on_step_end (`Callable`, `PipelineCallback`, `MultiPipelineCallbacks`, *optional*):
                Called at the end of each denoising step as `callback_on_step_end(self, step, timestep,
                callback_kwargs)`; may return replacements for the tensors in `callback_kwargs`.
            callback_on_step_end_tensor_inputs (`list`, *optional*):
                The tensors passed to `callback_on_step_end`, from `self._callback_tensor_inputs`.
            guidance_rescale (`float`, *optional*, defaults to 0.0):
                Guidance rescale factor φ of Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
                are Flawed", Sec. 3.4; for models trained with zero terminal SNR.
            clip_skip (`int`, *optional*):
                Number of final text-encoder layers to skip (1: use the pre-final layer).

        Examples:

        Returns:
            [`LatentPipelineOutput`] or `tuple`: the images, as `LatentPipelineOutput(images=...)` or `(images,)`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to unet
        if not height or not width:
            default_height, default_width = self.default_height_width()
            height, width = height or default_height, width or default_width

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            height,
            width,
            num_inference_steps,
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

        device = self._execution_device

        # 3. Encode input prompt
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

        # 4. Prepare timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self.check_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps

        # 5. Prepare latent variables
        num_channels_latents = self.unet.config.in_channels
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            num_channels_latents,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 6. Prepare extra step kwargs.
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 7. Denoising loop
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

                # expand the latents if we are doing classifier free guidance
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

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

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)

                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 8. Decode
        if output_type == "latent":
            image = latents
        else:
            image = self.decode_latents_to_image(latents, generator=generator)
        image = self.image_processor.postprocess(image, output_type=output_type)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)

        return LatentPipelineOutput(images=image)

    @torch.no_grad()
    def interpolate(
        self,
        prompt: str,
        seed_a: int,
        seed_b: int,
        num_frames: int = 8,
        *,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        batch_size: int = 8,
        output_type: str = "pil",
    ) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        r"""Frames between the images of two seeds, by interpolating the initial noise (Song et al. 2021, Sec. 5.3).

        The initial noises of `seed_a` and `seed_b` (drawn as `__call__` draws them with
        `generator=torch.Generator().manual_seed(seed)`) are joined by spherical linear interpolation
        (:func:`slerp`) at `num_frames` evenly spaced points, and every frame is sampled with deterministic DDIM
        (η = 0), so the map from noise to image is fixed and the frames change smoothly. The DDIM scheduler is
        built from `self.scheduler.config` for this call only; `self.scheduler` is left as it was.

        The first frame equals `self(prompt, generator=torch.Generator().manual_seed(seed_a), ...)` under
        `DDIMScheduler`, the last the same for `seed_b`.

        Args:
            prompt (`str`): The prompt of every frame.
            seed_a (`int`), seed_b (`int`): The seeds of the first and the last frame.
            num_frames (`int`, defaults to 8): The number of frames, both ends included (at least 2).
            batch_size (`int`, defaults to 8): Frames denoised per pipeline call.
            negative_prompt, height, width, num_inference_steps, guidance_scale: as in `__call__`.
            output_type (`str`, defaults to `"pil"`): `"pil"` (a list of images), `"np"` or `"pt"` (one stacked
                array / tensor, frames first).

        Returns:
            The `num_frames` frames, in order.
        """
        if not isinstance(prompt, str):
            raise ValueError(f"`prompt` has to be a single string for `interpolate` but is {prompt!r}.")
        for name, seed in (("seed_a", seed_a), ("seed_b", seed_b)):
            if not isinstance(seed, int):
                raise ValueError(f"`{name}` has to be an integer seed but is {seed!r}.")
        if not isinstance(num_frames, int) or num_frames < 2:
            raise ValueError(f"`num_frames` has to be an integer >= 2 but is {num_frames!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` has to be a positive integer but is {batch_size!r}.")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"`output_type` has to be one of ('pil', 'np', 'pt') but is {output_type!r}.")
        if not height or not width:
            default_height, default_width = self.default_height_width()
            height, width = height or default_height, width or default_width
        # Fail on a bad size or step count before any noise is drawn.
        self.check_inputs(prompt, height, width, num_inference_steps, negative_prompt=negative_prompt)

        device = self._execution_device
        dtype = self.text_encoder.dtype  # the dtype `__call__` draws its noise in (that of the prompt embeddings)
        shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        # The same draw as `prepare_latents` makes for a one-image call with a seeded CPU generator.
        noise_a = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed_a), device=device, dtype=dtype)
        noise_b = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed_b), device=device, dtype=dtype)
        fractions = [index / (num_frames - 1) for index in range(num_frames)]
        noises = torch.cat([slerp(fraction, noise_a, noise_b) for fraction in fractions])

        original_scheduler = self.scheduler
        self.scheduler = DDIMScheduler.from_config(original_scheduler.config)
        try:
            frames = []
            for start in range(0, num_frames, batch_size):
                chunk = noises[start : start + batch_size]
                frames.append(
                    self(
                        prompt,
                        negative_prompt=negative_prompt,
                        height=height,
                        width=width,
                        num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale,
                        num_images_per_prompt=len(chunk),
                        latents=chunk,
                        eta=0.0,
                        output_type=output_type,
                    ).images
                )
        finally:
            self.scheduler = original_scheduler

        if output_type == "pil":
            return [frame for chunk in frames for frame in chunk]
        if output_type == "np":
            return np.concatenate(frames)
        return torch.cat(frames)

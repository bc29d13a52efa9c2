# Adapted from Diffusers' `pipeline_stable_diffusion_img2img.py`
# (Copyright 2026 The HuggingFace Team, Apache License 2.0).
"""Image-to-image with a latent (or pixel-space) diffusion model: :class:`LatentImg2ImgPipeline`.

SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential
Equations"): the input image is encoded, noised to an intermediate time t0 = `strength` x T of the
forward process, x_t0 = sqrt(alpha_bar_t0) z_0 + sqrt(1 - alpha_bar_t0) eps (Ho et al. 2020, Eq. 4),
and denoised from there under the prompt. `strength` 1 starts from the schedule's noisiest step
(nearly nothing of the image is left), `strength` 0 returns the image's reconstruction. It is
``diffusers.StableDiffusionImg2ImgPipeline`` without the safety checker, IP-adapter and LoRA
plumbing: on the same components, scheduler and seed both give the same images. It takes the components of :class:`~latentdiff.pipelines.LatentPipeline`, so
``LatentImg2ImgPipeline(**pipe.components)`` and ``LatentImg2ImgPipeline.from_pipe(pipe)`` share its
weights.
"""

from __future__ import annotations

import inspect
from typing import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ModelMixin, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from latentdiff.hub import PipelineHubMixin

from .pipeline_latent import OUTPUT_TYPES, LatentPipelineOutput

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from PIL import Image
        >>> from latentdiff import LatentImg2ImgPipeline

        >>> pipe = LatentImg2ImgPipeline.from_pretrained("runs/shapes/pipeline")
        >>> init_image = Image.open("circle.png").convert("RGB")
        >>> image = pipe("a blue square at the top left", image=init_image, strength=0.6).images[0]
        ```
"""


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


class LatentImg2ImgPipeline(PipelineHubMixin, DiffusionPipeline, StableDiffusionMixin):
    r"""
    Text-guided image-to-image generation (SDEdit) with a latent diffusion model, or a pixel-space one
    when `vae` is `None`.

    This model inherits from [`DiffusionPipeline`] and [`~latentdiff.hub.PipelineHubMixin`] (safe loading,
    model card, `push_to_hub`). The components are those of [`~latentdiff.pipelines.LatentPipeline`].

    Args:
        vae ([`AutoencoderKL`] or `None`):
            Autoencoder between images and latents; `None` for a pixel-space model.
        text_encoder ([`~transformers.CLIPTextModel`] or a [`ModelMixin`] text tower):
            Any module whose call on token ids returns the hidden states at index `0`.
        tokenizer ([`~transformers.CLIPTokenizer`]):
            Tokenizer of the text encoder.
        unet ([`UNet2DConditionModel`]):
            The denoiser, conditioned on the text encoder's hidden states.
        scheduler ([`SchedulerMixin`]):
            Any Diffusers scheduler with `add_noise` (see `latentdiff.models.schedulers.scheduler_from_name`).
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
        # A tensor `image` with the autoencoder's latent channel count is taken as latents (not when that
        # count is 3, which is an RGB image).
        self.latent_input_channels = (
            self.vae.config.latent_channels if self.vae is not None and self.vae.config.latent_channels != 3 else None
        )
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, vae_latent_channels=self.latent_input_channels
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
        strength,
        num_inference_steps,
        num_images_per_prompt=1,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        generator=None,
        output_type="pil",
        clip_skip=None,
        callback_on_step_end_tensor_inputs=None,
    ):
        """Raise a `ValueError` naming the argument at the first invalid input, before any model runs."""
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise ValueError(f"`strength` has to be a number in [0.0, 1.0] but is {strength!r}.")
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

        if image is None:
            raise ValueError("`image` is required: the image (or images) to start from.")
        items = image if isinstance(image, list) else [image]
        if not items or not all(isinstance(item, (PIL.Image.Image, np.ndarray, torch.Tensor)) for item in items):
            raise ValueError(
                "`image` has to be a PIL image, a numpy array, a torch tensor or a non-empty list of them,"
                f" but is {type(image).__name__}."
            )
        image_count, height, width, channels = _image_count_and_size(image)
        if image_count not in (1, batch_size):
            raise ValueError(
                f"`image` holds {image_count} images but the prompt batch has {batch_size}; pass one image, or"
                " one per prompt."
            )
        is_latent = isinstance(items[0], torch.Tensor) and channels == self.latent_input_channels
        if isinstance(items[0], PIL.Image.Image) and any(item.mode != "RGB" for item in items):
            modes = sorted({item.mode for item in items})
            raise ValueError(f"`image` has to be RGB, got PIL mode(s) {modes}; convert with `image.convert('RGB')`.")
        if isinstance(items[0], np.ndarray) and channels != 3:
            raise ValueError(f"`image` arrays need 3 (RGB) channels, last axis, got {channels}.")
        if isinstance(items[0], torch.Tensor) and channels != 3 and not is_latent:
            expected = "3 (RGB)" + (f" or {self.latent_input_channels} (latents)" if self.latent_input_channels else "")
            raise ValueError(f"`image` tensors need {expected} channels, got {channels}.")
        if not is_latent and (height % self.vae_scale_factor or width % self.vae_scale_factor):
            raise ValueError(
                f"`image` height and width have to be divisible by {self.vae_scale_factor} (the autoencoder's"
                f" downsampling factor) but are {height} and {width}."
            )

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

    def prepare_latents(self, image, timestep, batch_size, num_images_per_prompt, dtype, device, generator=None):
        """SDEdit's starting point: the image's latents z_0, noised to `timestep` with the scheduler's `add_noise`.

        One image serves every prompt; one image per prompt serves that prompt's `num_images_per_prompt`
        images. `timestep=None` (no denoising step, `strength` ~ 0) returns z_0 itself.
        """
        image = image.to(device=device, dtype=dtype)
        repeats = batch_size * num_images_per_prompt // image.shape[0]

        def expand(tensor):
            # each image `repeats` times in a row (the order of the prompt embeddings); `torch.cat` keeps the
            # memory format, so the U-Net computes exactly as in Diffusers
            return torch.cat([tensor[i : i + 1] for i in range(tensor.shape[0]) for _ in range(repeats)])

        if image.shape[1] == self.latent_input_channels:
            init_latents = expand(image)
        elif isinstance(generator, list):
            # one generator per output image: expand first, then encode each image with its own generator
            init_latents = self.encode_image_to_latents(expand(image), generator)
        else:
            init_latents = expand(self.encode_image_to_latents(image, generator))

        if timestep is None:
            return init_latents
        noise = randn_tensor(init_latents.shape, generator=generator, device=device, dtype=dtype)
        return self.scheduler.add_noise(init_latents, noise, timestep)

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

    @property
    def guidance_scale(self):
        return self._guidance_scale

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
        strength: float = 0.8,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
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
        clip_skip: int | None = None,
    ) -> LatentPipelineOutput | tuple:
        r"""
        Transform an image under a prompt.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompt or prompts to guide image generation. If not defined, pass `prompt_embeds`.
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The starting image(s): one for every prompt, or one per prompt. Arrays and tensors hold values in
                [0, 1]; a tensor with the autoencoder's latent channel count is taken as latents. Height and width
                are multiples of `vae_scale_factor`.
            strength (`float`, *optional*, defaults to 0.8):
                How far into the forward process the image is noised, in [0, 1] (SDEdit's t0 / T): 1 keeps
                nearly nothing of the image, 0 returns its reconstruction. `int(num_inference_steps * strength)` steps run.
            negative_prompt (`str` or `list[str]`, *optional*):
                What to guide away from: one string for every prompt, or one per prompt.
            num_inference_steps (`int`, *optional*, defaults to 50):
                The number of denoising steps of the full schedule (at least 1); `strength` selects its last part.
            guidance_scale (`float`, *optional*, defaults to 7.5):
                Classifier-free guidance weight w (Ho & Salimans 2022); on when `guidance_scale > 1`.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                The number of images to generate per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Generator(s) for the encoder's sample and the noise, one per image when a list.
            prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated text embeddings, instead of `prompt`.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated negative text embeddings, instead of `negative_prompt`.
            eta (`float`, *optional*, defaults to 0.0):
                The η of the DDIM paper (Song et al. 2021); only used by `DDIMScheduler`.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Return a [`LatentPipelineOutput`] instead of a plain tuple.
            callback_on_step_end (`Callable`, `PipelineCallback`, `MultiPipelineCallbacks`, *optional*):
                Called at the end of each denoising step as `callback_on_step_end(self, step, timestep,
                callback_kwargs)`; may return replacements for the tensors in `callback_kwargs`.
            callback_on_step_end_tensor_inputs (`list`, *optional*):
                The tensors passed to `callback_on_step_end`, from `self._callback_tensor_inputs`.
            clip_skip (`int`, *optional*):
                Number of final text-encoder layers to skip (1: use the pre-final layer).

        Examples:

        Returns:
            [`LatentPipelineOutput`] or `tuple`: the images, as `LatentPipelineOutput(images=...)` or `(images,)`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            image,
            strength,
            num_inference_steps,
            num_images_per_prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            generator,
            output_type,
            clip_skip,
            callback_on_step_end_tensor_inputs,
        )

        self._guidance_scale = guidance_scale
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

        # 4. Preprocess image
        image = self.image_processor.preprocess(image)

        # 5. Set timesteps: the last `strength` part of the schedule
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self.check_timesteps(num_inference_steps)
        timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, strength, device)
        # No step to run (strength ~ 0): the image is not noised, and comes back reconstructed.
        latent_timestep = timesteps[:1].repeat(batch_size * num_images_per_prompt) if len(timesteps) else None

        # 6. Prepare latent variables
        latents = self.prepare_latents(
            image,
            latent_timestep,
            batch_size,
            num_images_per_prompt,
            prompt_embeds.dtype,
            device,
            generator,
        )

        # 7. Prepare extra step kwargs.
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 8. Denoising loop
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

        # 9. Decode
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

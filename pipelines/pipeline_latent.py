"""Text-to-image with a latent (or pixel-space) diffusion model: :class:`LatentPipeline`, and what every
latentdiff pipeline adds to Diffusers' Stable Diffusion pipelines: :class:`LatentDiffusionMixin`.

The pipeline of Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models"): a
text encoder turns the prompt into the U-Net's cross-attention context, the U-Net denoises Gaussian noise
in the autoencoder's latent space under classifier-free guidance (Ho & Salimans 2022), and the
autoencoder's decoder maps the result to pixels. :class:`LatentPipeline` *is* a
``diffusers.StableDiffusionPipeline`` (on the same components, scheduler and seed both give the same
images), so it has its loaders and arguments: ``load_lora_weights``, ``load_textual_inversion``,
``load_ip_adapter``, ``from_single_file``, ``cross_attention_kwargs``, custom ``timesteps`` / ``sigmas``,
callbacks. What latentdiff adds is written once, in :class:`LatentDiffusionMixin`:

* ``vae=None``: a pixel-space model (Ho et al. 2020), whose "latents" are the pixels in [-1, 1];
* the model's own sampling defaults (``latentdiff.json``), used when a call gives no steps or guidance;
* stricter input checks, each a ``ValueError`` naming the argument, before any model runs;
* safetensors-only loading and saving, a model card, ``push_to_hub`` (:class:`~latentdiff.hub.PipelineHubMixin`);
* ``clip_skip`` for any text encoder that exposes its layers, read at the same layer for the negative prompt;
* ``guidance_interval``: classifier-free guidance only in a band of noise levels (Kynkäänniemi et al. 2024);
* :meth:`LatentPipeline.interpolate`: frames between two seeds by spherical interpolation of the initial
  noise and deterministic DDIM sampling (Song et al. 2021, Sec. 5.3).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import re
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, ModelMixin, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import TextualInversionLoaderMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPVisionModelWithProjection, PreTrainedModel, PreTrainedTokenizerBase

from latentdiff.hub import PipelineHubMixin
from latentdiff.models.word_context import CLIPTextModelWithWordEmbeddings

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class LatentPipelineOutput(BaseOutput):
    """Output of the latentdiff pipelines.

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The generated images: a list of PIL images, or an array / tensor of shape
            `(batch_size, height, width, 3)` (`np`) or `(batch_size, 3, height, width)` (`pt`, `latent`).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


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


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_unit_interval(name: str, value) -> None:
    """A `ValueError` naming `name` unless `value` is a number in [0, 1] (`eta`, `guidance_rescale`)."""
    if not _is_number(value) or not 0 <= value <= 1:
        raise ValueError(f"`{name}` has to be a number in [0, 1] but is {value!r}.")


def check_guidance_interval(interval) -> tuple[float, float] | None:
    """`interval` as a `(low, high)` pair of floats, or `None`; a `ValueError` unless it is `None` or two finite
    numbers with `0 <= low <= high` (training timesteps: guidance applies where `low <= t <= high`)."""
    if interval is None:
        return None
    if (
        not isinstance(interval, (tuple, list))
        or len(interval) != 2
        or not all(_is_number(value) and math.isfinite(value) for value in interval)
        or not 0 <= interval[0] <= interval[1]
    ):
        raise ValueError(
            "`guidance_interval` has to be None or a pair (low, high) of training timesteps with 0 <= low <= high "
            f"(guidance applies where low <= t <= high, e.g. (0, 600)), but is {interval!r}."
        )
    return float(interval[0]), float(interval[1])


def check_negative_prompt_carry(carry) -> str | None:
    """`carry` (a regular expression, or `None` / `""`: none); a `ValueError` unless it is one that compiles."""
    if carry is None or carry == "":
        return carry
    if not isinstance(carry, str):
        raise ValueError(f"`negative_prompt_carry` has to be None or a regular expression string, but is {carry!r}.")
    try:
        re.compile(carry)
    except re.error as error:
        raise ValueError(f"`negative_prompt_carry` {carry!r} is not a valid regular expression: {error}.") from None
    return carry


def _step_timestep(timestep) -> float:
    """The timestep of a denoising step as a number: the U-Net is called with one for the whole batch (a number, a
    0-d tensor, or one value per image)."""
    return float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)


def denoising_call(call):
    """Give a pipeline's `__call__` the keyword arguments `guidance_interval` (default: the model's saved one, else
    `None`, guidance at every step) and `negative_prompt_carry` (default: the model's saved one, else none;
    :meth:`LatentDiffusionMixin.carried_negative_prompt`), and the model's noise-level experts: the call runs inside
    :meth:`LatentDiffusionMixin.guidance_interval` and :meth:`LatentDiffusionMixin.noise_level_experts`."""

    @functools.wraps(call)
    def wrapper(self, *args, guidance_interval=None, negative_prompt_carry=None, **kwargs):
        guidance_interval = check_guidance_interval(self.sampling_default("guidance_interval", guidance_interval))
        carry = check_negative_prompt_carry(self.sampling_default("negative_prompt_carry", negative_prompt_carry))
        self._negative_prompt_carry = carry
        try:
            with self.guidance_interval(guidance_interval), self.noise_level_experts():
                return call(self, *args, **kwargs)
        finally:
            self._negative_prompt_carry = None

    return wrapper


class LatentDiffusionMixin(PipelineHubMixin):
    """What latentdiff adds to a Diffusers Stable Diffusion pipeline class, listed before it in the bases.

    The components are Stable Diffusion's without the safety checker: `vae` (`None`: pixel space), `text_encoder`
    (a `CLIPTextModel` or any module whose call on token ids returns the hidden states at index 0, such as
    `latentdiff.OpenCLIPTextModel` and `latentdiff.CLIPTextModelWithWordEmbeddings`), `tokenizer`, `unet`,
    `scheduler`, and, for IP-Adapter only, `image_encoder` (set by `load_ip_adapter`). A model with noise-level experts (:mod:`latentdiff.models.experts`) has a second
    U-Net, `unet_high_noise`, which denoises the timesteps `t >= boundary_ratio * num_train_timesteps` (the
    pipeline's config, as in Diffusers' Wan 2.2 pipelines); `unet` denoises the rest.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->unet_high_noise->unet->vae"
    _optional_components = ["vae", "image_encoder", "unet_high_noise"]
    # Folders saved before there were experts, and Stable Diffusion folders, do not list one.
    _may_be_unlisted = ("unet_high_noise",)
    _exclude_from_cpu_offload = []
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    # Loaded with an IP-Adapter (`load_ip_adapter`), never from a pipeline folder.
    _not_loaded_from_folders = ("image_encoder",)
    # Not a component, so that `pipe.components` builds a stock Stable Diffusion pipeline (with its own
    # `feature_extractor=None, safety_checker=None`); `load_ip_adapter` sets it, for `ip_adapter_image`.
    feature_extractor = None

    def __init__(
        self,
        vae: AutoencoderKL | None,
        text_encoder: PreTrainedModel | ModelMixin,
        tokenizer: PreTrainedTokenizerBase,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        unet_high_noise: UNet2DConditionModel | None = None,
        boundary_ratio: float | None = None,
    ):
        # Not Stable Diffusion's `__init__`: it requires an autoencoder and a safety checker, and rewrites the
        # scheduler configs of early SD checkpoints (steps_offset, clip_sample), which would change the sampling
        # of a model trained here.
        if (unet_high_noise is None) != (boundary_ratio is None):
            raise ValueError(
                "`unet_high_noise` and `boundary_ratio` go together (the expert denoises t >= boundary_ratio * "
                f"num_train_timesteps), but got unet_high_noise={type(unet_high_noise).__name__} and "
                f"boundary_ratio={boundary_ratio!r}"
            )
        if boundary_ratio is not None and not (_is_number(boundary_ratio) and 0 < boundary_ratio < 1):
            raise ValueError(f"`boundary_ratio` has to be a number between 0 and 1 (exclusive), but is {boundary_ratio!r}")
        DiffusionPipeline.__init__(self)
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            image_encoder=image_encoder, unet_high_noise=unet_high_noise,
        )  # fmt: skip
        self.register_to_config(boundary_ratio=boundary_ratio)
        # The model's own sampling settings (e.g. {"guidance_scale": 4.0}): read by `from_pretrained` from
        # `latentdiff.json`, written back by `save_pretrained`, used when a call gives none.
        self.sampling_defaults: dict = {}
        # Pixel space (no autoencoder): the "latents" are the image itself, at full size, in [-1, 1].
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.latent_channels = vae.config.latent_channels if vae is not None else 3
        self._is_unet_config_sample_size_int = isinstance(unet.config.sample_size, int)
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor,
            vae_latent_channels=self.latent_channels if self.latent_channels != 3 else None,
        )
        # Input pixels in [0, 1] at their size, as given, so that inpainting can paste them back exactly.
        self.pixel_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_resize=False, do_normalize=False)

    def run_safety_checker(self, image, device, dtype):
        """No safety checker: these pipelines take none (see `from_pretrained`)."""
        return image, None

    # ------------------------------------------------------------------------------------------------
    # Sampling defaults and input checks
    # ------------------------------------------------------------------------------------------------

    def sampling_default(self, name: str, value):
        """`value` if given, else the model's saved default (`latentdiff.json`), else Diffusers' own default (that of
        the Stable Diffusion pipeline this class builds on; `None` for `guidance_interval`, which is latentdiff's)."""
        if value is not None:
            return value
        if name in self.sampling_defaults:
            return self.sampling_defaults[name]
        if name in ("guidance_interval", "negative_prompt_carry"):
            return None
        for base in type(self).__mro__:
            if base.__module__.startswith("diffusers.") and "__call__" in vars(base):
                return inspect.signature(base.__call__).parameters[name].default
        raise AssertionError(f"{type(self).__name__} builds on no Diffusers pipeline")  # pragma: no cover

    def carried_negative_prompt(self, prompt, negative_prompt):
        """The negative prompt of each prompt with the part of the prompt that the call's `negative_prompt_carry` (a
        regular expression) matches appended to it: with `negative_prompt="a shape"` and the carry `" on an? \\w+
        background$"`, "a circle on a white background" is guided away from "a shape on a white background".

        Why: guidance amplifies whatever the prompt says and the negative prompt does not. A background phrase
        amplified 3.5 times asks for a plain background everywhere, over the object too: on the shapes default, shape
        prompts that name their background drew nothing in 22 of 144 images against 10 with the phrase carried
        (docs/conditioning.md, forty-ninth round). Without a carry, without a match, or without a non-empty string
        negative prompt (`""` asks for the empty caption), the negative prompt is returned as given."""
        carry = getattr(self, "_negative_prompt_carry", None)
        if not carry or not isinstance(negative_prompt, str) or not negative_prompt or prompt is None:
            return negative_prompt
        pattern = re.compile(carry)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        carried = [negative_prompt + match.group(0) if (match := pattern.search(text)) else negative_prompt
                   for text in prompts]
        return carried[0] if isinstance(prompt, str) else carried

    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance scale of the current denoising step: the call's `guidance_scale`, or 1 (the
        conditional prediction alone) at a timestep outside the call's `guidance_interval`."""
        interval, timestep = getattr(self, "_guidance_interval", None), getattr(self, "_guidance_timestep", None)
        if interval is not None and timestep is not None and not interval[0] <= timestep <= interval[1]:
            return 1.0
        return self._guidance_scale

    @contextlib.contextmanager
    def guidance_interval(self, interval: tuple[float, float] | None):
        r"""Within this context, classifier-free guidance applies only at timesteps `t` with `low <= t <= high`
        (`interval = (low, high)`, on the training scale 0 .. `num_train_timesteps - 1`); elsewhere the step uses
        the conditional prediction alone. `None`: guidance at every step.

        Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and Distribution
        Quality in Diffusion Models": guidance at the highest noise levels pulls every sample towards the
        prompt's mean image (here: the object's color averaged away, so a prompt that names no color gives an
        empty background); guidance below them keeps its gain in adherence.

        Written here because Diffusers' Stable Diffusion pipelines have no such option (its guiders, which do,
        drive the modular pipelines only): the U-Net's timestep is read by a forward pre-hook, and the
        `guidance_scale` property, which Diffusers' denoising loop reads at every step, answers for that timestep.
        The guidance batch (unconditional and conditional halves) is kept at every step.
        """
        if interval is None:
            yield
            return

        def record_timestep(module, args, kwargs):
            self._guidance_timestep = _step_timestep(args[1] if len(args) > 1 else kwargs["timestep"])

        handle = self.unet.register_forward_pre_hook(record_timestep, with_kwargs=True)
        self._guidance_interval, self._guidance_timestep = interval, None
        try:
            yield
        finally:
            handle.remove()
            self._guidance_interval = self._guidance_timestep = None

    @property
    def components(self) -> dict:
        """Diffusers' `components`, without `unet_high_noise` when the model has no expert (so that they still build
        a stock Stable Diffusion pipeline), and with `boundary_ratio` when it has one (so that they build any
        pipeline of latentdiff with the expert and its boundary)."""
        components = dict(super().components)
        if components.get("unet_high_noise") is None:
            components.pop("unet_high_noise", None)
        else:
            components["boundary_ratio"] = self.config.boundary_ratio
        return components

    @contextlib.contextmanager
    def noise_level_experts(self):
        """Within this context, a call of `unet` at a timestep `t >= boundary_ratio * num_train_timesteps` runs
        `unet_high_noise` instead (the model's high-noise expert); without an expert, nothing changes.

        Written here because Diffusers' Stable Diffusion pipelines have one U-Net (its Wan 2.2 pipelines switch
        between two transformers in their own loop): every denoising loop of these pipelines calls `self.unet`, so
        the switch is made in `unet.forward`, after the U-Net's hooks (the guidance interval's, offloading's) have
        run, and undone when the context ends.
        """
        expert = getattr(self, "unet_high_noise", None)
        if expert is None:
            yield
            return
        boundary = self.config.boundary_ratio * self.scheduler.config.num_train_timesteps
        unet = self.unet
        own_forward = unet.__dict__.get("forward")  # set by a hook (e.g. model offloading), if any
        forward = own_forward or unet.forward

        def dispatch(sample, timestep, *args, **kwargs):
            denoiser = expert if _step_timestep(timestep) >= boundary else forward
            return denoiser(sample, timestep, *args, **kwargs)

        unet.forward = dispatch
        try:
            yield
        finally:
            if own_forward is None:
                del unet.forward
            else:
                unet.forward = own_forward

    def default_height_width(self) -> tuple[int, int]:
        """The size the U-Net was built for: `unet.config.sample_size` times the autoencoder's factor."""
        sample_size = self.unet.config.sample_size
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    def check_sampling_inputs(
        self,
        prompt,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        num_inference_steps=None,
        guidance_scale=None,
        eta=0.0,
        num_images_per_prompt=1,
        generator=None,
        output_type="pil",
        clip_skip=None,
        callback_on_step_end_tensor_inputs=None,
        guidance_rescale=0.0,
    ) -> int:
        """Raise a `ValueError` naming the argument at the first invalid input, before any model runs; return the
        number of prompts. `num_inference_steps=None` is not checked (custom `timesteps` or `sigmas` give the count).

        Ranges: `num_inference_steps` a positive integer (not a bool); `guidance_scale` finite and >= 0 (guidance is
        on above 1); `guidance_rescale` and `eta` (DDIM's η: 0 deterministic, 1 DDPM-like) in [0, 1].
        """
        if num_inference_steps is not None and not _is_positive_int(num_inference_steps):
            raise ValueError(f"`num_inference_steps` has to be a positive integer but is {num_inference_steps!r}.")
        if not _is_number(guidance_scale) or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` has to be a finite number >= 0 (1: no guidance) but is {guidance_scale!r}.")
        for name, value in (("eta", eta), ("guidance_rescale", guidance_rescale)):
            check_unit_interval(name, value)
        if not _is_positive_int(num_images_per_prompt):
            raise ValueError(f"`num_images_per_prompt` has to be a positive integer but is {num_images_per_prompt!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` has to be one of {OUTPUT_TYPES} but is {output_type!r}.")
        if clip_skip is not None and (not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or clip_skip < 0):
            raise ValueError(f"`clip_skip` has to be a non-negative integer or None but is {clip_skip!r}.")
        unknown = [k for k in callback_on_step_end_tensor_inputs or () if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found {unknown}")

        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`.")
        if prompt is not None and not (
            isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))
        ):
            raise ValueError(f"`prompt` has to be a string or a non-empty list of strings but is {prompt!r}.")
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]

        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            if not isinstance(negative_prompt, list) or not all(isinstance(p, str) for p in negative_prompt):
                raise ValueError(f"`negative_prompt` has to be a string or a list of strings but is {negative_prompt!r}.")
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
        return batch_size

    def check_size(self, height, width) -> None:
        """`height` and `width` have to be positive multiples of `vae_scale_factor`."""
        f = self.vae_scale_factor
        if not all(_is_positive_int(size) and size % f == 0 for size in (height, width)):
            raise ValueError(
                f"`height` and `width` have to be divisible by {f} (the autoencoder's downsampling factor) and"
                f" positive, but are {height!r} and {width!r}."
            )

    def check_latents(self, latents, num_images: int, height: int, width: int, channels: int | None = None) -> None:
        """Check the shape of user-given noise `latents` for `num_images` outputs of `height` x `width` pixels."""
        if latents is not None:
            f = self.vae_scale_factor
            expected = (num_images, channels or self.latent_channels, height // f, width // f)
            if tuple(latents.shape) != expected:
                raise ValueError(f"`latents` has to have shape {expected} but has {tuple(latents.shape)}.")

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

    # ------------------------------------------------------------------------------------------------
    # Text, latents and pixels
    # ------------------------------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ):
        """Stable Diffusion's `encode_prompt` (LoRA scale, textual inversion), with three differences: one
        `negative_prompt` string applies to every prompt; `clip_skip` works with any text encoder that returns its
        hidden states and has a final layer norm (Diffusers reads `text_encoder.text_model`, which transformers 5's
        `CLIPTextModel` no longer has); and the negative prompt is read at the same layer as the prompt, so that
        guidance contrasts two embeddings of one kind. The negative prompt is also encoded here for a text encoder
        that joins its word embeddings along the tokens: Diffusers pads it to `prompt_embeds.shape[1]` tokens, twice
        what that encoder reads."""
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        if isinstance(negative_prompt, str) and not isinstance(prompt, str):
            negative_prompt = [negative_prompt] * batch_size
        if prompt_embeds is None:
            self._warn_if_truncated(prompt)
        joins_tokens = getattr(getattr(self.text_encoder, "config", None), "word_embeddings_axis", None) == "tokens"
        if clip_skip is not None or joins_tokens:
            if prompt_embeds is None and clip_skip is not None:
                prompt_embeds = self._encode_text(prompt, device, clip_skip)
            if do_classifier_free_guidance and negative_prompt_embeds is None:
                negative = negative_prompt if negative_prompt is not None else [""] * batch_size
                negative_prompt_embeds = self._encode_text(negative, device, clip_skip)
                negative_prompt = None
        return super().encode_prompt(
            prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale,
        )  # fmt: skip

    def _warn_if_truncated(self, prompt) -> None:
        # Diffusers warns too, on its own logger, which does not propagate to Python's root logger.
        limit = self.tokenizer.model_max_length
        for text in [prompt] if isinstance(prompt, str) else prompt:
            ids = self.tokenizer(text, truncation=False).input_ids
            if len(ids) > limit:
                dropped = self.tokenizer.decode(ids[limit - 1 : -1])
                logger.warning(f"`prompt` was truncated: the text encoder reads at most {limit} tokens; dropped: {dropped}")

    def _encode_text(self, text, device, clip_skip: int | None) -> torch.Tensor:
        if isinstance(self, TextualInversionLoaderMixin):
            text = self.maybe_convert_prompt(text, self.tokenizer)
        inputs = self.tokenizer(
            text, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        return self._encode_token_ids(inputs.input_ids, inputs.attention_mask, device, clip_skip)

    def _encode_token_ids(self, input_ids, attention_mask, device, clip_skip: int | None) -> torch.Tensor:
        """Hidden states `clip_skip` layers before the last, through the final layer norm (as the last one is);
        the text encoder's own output for `clip_skip=None`.

        Needs `output_hidden_states=True` and the final layer norm as `text_model.final_layer_norm` or
        `final_layer_norm`.
        """
        encoder_kwargs = {}
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            encoder_kwargs["attention_mask"] = attention_mask.to(device)
        if clip_skip is None:
            return self.text_encoder(input_ids.to(device), **encoder_kwargs)[0]
        name = type(self.text_encoder).__name__
        final_layer_norm = getattr(getattr(self.text_encoder, "text_model", None), "final_layer_norm", None)
        final_layer_norm = final_layer_norm or getattr(self.text_encoder, "final_layer_norm", None)
        if final_layer_norm is None:
            raise ValueError(
                f"`clip_skip`: the text encoder {name} exposes no final layer norm (`text_model.final_layer_norm` or"
                " `final_layer_norm`), so intermediate layers cannot be used; leave `clip_skip=None`"
            )
        outputs = self.text_encoder(input_ids.to(device), output_hidden_states=True, **encoder_kwargs)
        hidden_states = getattr(outputs, "hidden_states", None)
        if not hidden_states and getattr(self.text_encoder.config, "num_hidden_layers", None) == 0:
            # No layers (the shapes default): transformers 5 returns no hidden states, and the one state there is
            # (the embeddings, through the final layer norm) is the encoder's own output.
            if clip_skip:
                raise ValueError(f"`clip_skip`={clip_skip} skips more layers than the text encoder has (0)")
            return outputs[0]
        if hidden_states is None:
            raise ValueError(
                f"`clip_skip`: the text encoder {name} returned no hidden states for `output_hidden_states=True`;"
                " leave `clip_skip=None`"
            )
        if clip_skip + 1 > len(hidden_states):
            raise ValueError(f"`clip_skip`={clip_skip} skips more layers than the text encoder has ({len(hidden_states) - 1})")
        if isinstance(self.text_encoder, CLIPTextModelWithWordEmbeddings):  # the word embeddings beside the layer
            return self.text_encoder.conditioning(hidden_states, -(clip_skip + 1), input_ids=input_ids.to(device))
        return final_layer_norm(hidden_states[-(clip_skip + 1)])

    def encode_image_to_latents(self, image: torch.Tensor, generator=None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents z_0 = (E(x) - shift) * scale; a pixel-space pipeline keeps the image.

        With a list of generators, image `i` is encoded with `generator[i]`.
        """
        if self.vae is None:
            return image
        image = image.to(self.vae.dtype)
        if isinstance(generator, list):
            latents = torch.cat(
                [self.vae.encode(image[i : i + 1]).latent_dist.sample(generator[i]) for i in range(image.shape[0])]
            )
        else:
            latents = self.vae.encode(image).latent_dist.sample(generator)
        shift_factor = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift_factor) * self.vae.config.scaling_factor

    def decode_latents_to_image(self, latents: torch.Tensor, generator=None) -> torch.Tensor:
        """Latents -> images in [-1, 1] (`B x 3 x H x W`): undo the latent scale and shift, then decode.

        A pixel-space pipeline (`vae=None`) only clamps its samples to [-1, 1].
        """
        if self.vae is None:
            return latents.clamp(-1, 1)
        shift_factor = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents / self.vae.config.scaling_factor + shift_factor
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False, generator=generator)[0]

    @torch.no_grad()
    @denoising_call
    def __call__(self, *args, **kwargs) -> LatentPipelineOutput | tuple:
        r"""The Diffusers pipeline's own `__call__` (the same arguments: see its documentation), with these
        differences, written once for every pipeline built on one:

        * `num_inference_steps`, `guidance_scale` and `negative_prompt`, when not given, are the model's saved sampling
          defaults (`self.sampling_defaults`, from `latentdiff.json`), else the Diffusers pipeline's own (50, 7.5 and
          none); `negative_prompt=""` asks for the empty caption whatever the model saved;
        * `guidance_interval=(low, high)`: guidance only at timesteps `low <= t <= high` (:meth:`guidance_interval`);
          when not given, the model's saved one, else guidance at every step;
        * every argument is checked before any model runs (`check_sampling_inputs`, `check_call_inputs`): sizes are
          multiples of `vae_scale_factor` (1 in pixel space), not of 8; `eta` (DDIM's η) is in [0, 1];
        * the latents are decoded here, with the autoencoder's `shift_factor` or none in pixel space;
        * the result is a [`LatentPipelineOutput`] (there is no safety checker), or `(images,)`.
        """
        diffusers_call = next(base for base in type(self).__mro__ if base.__module__.startswith("diffusers.")).__call__
        call = inspect.signature(diffusers_call).bind(self, *args, **kwargs)
        given = dict(call.arguments)
        unknown = sorted(set(given.get("kwargs", {})) - {"callback", "callback_steps"})  # Diffusers' would ignore them
        if unknown:
            raise TypeError(f"{type(self).__name__}.__call__() got unexpected keyword arguments {unknown}")
        call.apply_defaults()
        arguments = call.arguments
        for name in ("num_inference_steps", "guidance_scale"):
            arguments[name] = self.sampling_default(name, given.get(name))
        if given.get("negative_prompt_embeds") is None:
            negative_prompt = self.sampling_default("negative_prompt", given.get("negative_prompt"))
            arguments["negative_prompt"] = self.carried_negative_prompt(arguments.get("prompt"), negative_prompt)
        custom_schedule = arguments.get("timesteps") is not None or arguments.get("sigmas") is not None
        if custom_schedule:  # the step count comes from the schedule
            arguments["num_inference_steps"] = None
        # 1. Check inputs, before any model runs
        self.check_all_inputs(arguments)
        if not custom_schedule:
            self.scheduler.set_timesteps(arguments["num_inference_steps"])
            self.check_timesteps(arguments["num_inference_steps"])
        # 2-7. The Diffusers pipeline's own steps, up to the latents
        output_type, return_dict = arguments["output_type"], arguments["return_dict"]
        arguments.update(output_type="latent", return_dict=True)
        # The call's prompts, for callbacks that read them (AttentionBindingCallback); Diffusers' loop keeps none.
        prompt = arguments.get("prompt")
        self._call_prompts = [prompt] if isinstance(prompt, str) else None if prompt is None else list(prompt)
        try:
            latents = diffusers_call(*call.args, **call.kwargs).images
        finally:
            self._call_prompts = None
        # 8. Decode
        if output_type == "latent":
            image = latents
        else:
            image = self.decode_latents_to_image(latents, generator=arguments["generator"])
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        return LatentPipelineOutput(images=image) if return_dict else (image,)

    def check_all_inputs(self, arguments: dict) -> int:
        """Check a call's arguments (by name): `check_sampling_inputs`, then `check_call_inputs`; return the number of
        prompts."""
        checked = inspect.signature(self.check_sampling_inputs).parameters
        batch_size = self.check_sampling_inputs(**{name: arguments[name] for name in checked if name in arguments})
        self.check_call_inputs(arguments, batch_size)
        return batch_size

    def check_call_inputs(self, arguments: dict, batch_size: int) -> None:
        """The checks of one pipeline's own arguments (`arguments`: the call's, by name), after `check_sampling_inputs`."""


class LatentPipeline(LatentDiffusionMixin, StableDiffusionPipeline):
    r"""Text-to-image generation with a latent diffusion model (or a pixel-space one when `vae` is `None`).

    A [`StableDiffusionPipeline`] (every argument and loader of it) with what [`LatentDiffusionMixin`] adds:
    pixel space, the model's saved sampling defaults, stricter input checks, safetensors-only loading, a model
    card and `push_to_hub` ([`~latentdiff.hub.PipelineHubMixin`]); and :meth:`interpolate`.

    Examples:
        ```py
        >>> from latentdiff import LatentPipeline

        >>> pipe = LatentPipeline.from_pretrained("runs/shapes/pipeline")
        >>> image = pipe("a red circle at the top left").images[0]  # the model's own steps and guidance
        >>> image.save("circle.png")
        ```
    """

    def check_inputs(self, prompt, height, width, *args, **kwargs):
        # Stable Diffusion's own checks (IP-Adapter arguments among them) but for the size, which it wants a multiple
        # of 8; here it is checked against the autoencoder's factor (1 in pixel space) by `check_sampling_inputs`.
        super().check_inputs(prompt, 0, 0, *args, **kwargs)

    def check_call_inputs(self, arguments: dict, batch_size: int) -> None:
        default_height, default_width = self.default_height_width()
        height, width = arguments["height"] or default_height, arguments["width"] or default_width
        self.check_size(height, width)
        num_images = batch_size * arguments["num_images_per_prompt"]
        self.check_latents(arguments["latents"], num_images, height, width, self.unet.config.in_channels)

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
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
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

        `num_frames` counts both ends (at least 2); `batch_size` frames are denoised per pipeline call; `output_type`
        is `"pil"` (a list of images), `"np"` or `"pt"` (one stacked array / tensor, frames first); the other
        arguments are those of `__call__`.

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
        if not _is_positive_int(batch_size):
            raise ValueError(f"`batch_size` has to be a positive integer but is {batch_size!r}.")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"`output_type` has to be one of ('pil', 'np', 'pt') but is {output_type!r}.")
        num_inference_steps = self.sampling_default("num_inference_steps", num_inference_steps)
        guidance_scale = self.sampling_default("guidance_scale", guidance_scale)
        default_height, default_width = self.default_height_width()
        height, width = height or default_height, width or default_width
        # Fail on a bad size or step count before any noise is drawn.
        self.check_sampling_inputs(prompt, negative_prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        self.check_size(height, width)

        device = self._execution_device
        dtype = self.text_encoder.dtype  # the dtype `__call__` draws its noise in (that of the prompt embeddings)
        shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        # The same draw as `prepare_latents` makes for a one-image call with a seeded CPU generator.
        noise_a = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed_a), device=device, dtype=dtype)
        noise_b = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed_b), device=device, dtype=dtype)
        noises = torch.cat([slerp(index / (num_frames - 1), noise_a, noise_b) for index in range(num_frames)])

        original_scheduler = self.scheduler
        self.scheduler = DDIMScheduler.from_config(original_scheduler.config)
        try:
            frames = []
            for start in range(0, num_frames, batch_size):
                chunk = noises[start : start + batch_size]
                frame = self(
                    prompt, negative_prompt=negative_prompt, height=height, width=width, eta=0.0, latents=chunk,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    num_images_per_prompt=len(chunk), output_type=output_type,
                )  # fmt: skip
                frames.append(frame.images)
        finally:
            self.scheduler = original_scheduler

        if output_type == "pil":
            return [frame for chunk in frames for frame in chunk]
        if output_type == "np":
            return np.concatenate(frames)
        return torch.cat(frames)

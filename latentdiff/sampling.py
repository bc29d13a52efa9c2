"""Sampling: the one seeded generation path (:func:`generate`), used by the command line, the eval and the
training grids; labelled image grids, validation during training, and the export of a trained model as a
pipeline folder with its sample grid and model card."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from .config import Config, SampleConfig
from .files import folder_written_in_place
from .hub import write_model_card

PIPELINE_DIR = "pipeline"
SAMPLES_FILE = "samples.png"

PIXEL_SPACE_SAMPLING = {"clip_sample": True, "clip_sample_range": 1.0, "thresholding": True, "sample_max_value": 1.0}
"""Scheduler settings of a pixel-space model (no autoencoder): every predicted x0 is clipped to the data range
[-1, 1] before the sampler steps, as in DDPM (Ho et al. 2020, Algorithm 2 with the clipping of their code) and
in Diffusers' own pixel-space pipelines (``DDPMScheduler``'s default ``clip_sample=True``).

Without it, sampling from pure noise diverges: with epsilon prediction, x0 = (x_t - sqrt(1 - abar_t) eps) /
sqrt(abar_t), and on DDPM's linear schedule sqrt(abar_t) is about 0.006 at the first step, so an epsilon error
of 0.1 is an x0 error of about 15; the next inputs are then unlike anything the network was trained on, and
it does not steer back (the first MNIST model sampled saturated noise with every sampler). ``clip_sample`` is read by DDPM and DDIM; ``thresholding`` by DPM-Solver++ (Diffusers recommends it
for pixel-space models), and with ``sample_max_value`` 1 its dynamic threshold is this same clip to [-1, 1].
Samplers with neither (Euler, PNDM) do not clip. Latents have no fixed range, so latent models keep both off.
"""


def make_pipeline(vae, text_encoder, tokenizer, unet, noise_scheduler, sampler: str = "dpm"):
    """A ``LatentPipeline`` over the given (unwrapped) modules; its scheduler is ``sampler`` built from
    the training noise schedule (DPM-Solver++ by default: good images in 25 steps). A pixel-space model
    (``vae=None``) samples with :data:`PIXEL_SPACE_SAMPLING` (saved with the pipeline, so every sampler built
    from its scheduler's config clips too). ``unet`` may be a :class:`~latentdiff.models.experts.NoiseLevelExperts`:
    the pipeline then gets its high-noise expert and boundary."""
    from .pipelines import LatentPipeline
    from .models.experts import NoiseLevelExperts
    from .models.schedulers import scheduler_from_name

    experts = {}
    if isinstance(unet, NoiseLevelExperts):
        experts = {
            "unet_high_noise": unet.high_noise,
            "boundary_ratio": unet.boundary / noise_scheduler.config.num_train_timesteps,
        }
        unet = unet.unet

    if vae is None:
        # Through `from_config`, not a dict update: keys left at their defaults are listed in the config's
        # `_use_default_values` and would be reset to the defaults again by the next `from_config`.
        noise_scheduler = type(noise_scheduler).from_config(noise_scheduler.config, **PIXEL_SPACE_SAMPLING)
    return LatentPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler_from_name(sampler, noise_scheduler.config),
        **experts,
    )


def labeled_grid(images: list[Image.Image], row_labels: list[str], columns: int, label_width: int = 0) -> Image.Image:
    """Images in rows of ``columns``, each row headed by its label (the prompt) on the left."""
    if len(images) != len(row_labels) * columns:
        raise ValueError(f"{len(images)} images do not fill {len(row_labels)} rows of {columns}")
    width, height = images[0].size
    font = _font(max(10, min(16, height // 5)))
    if not label_width:
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_width = min(360, 8 + max(int(measure.textlength(label, font=font)) for label in row_labels))
    grid = Image.new("RGB", (label_width + columns * width, len(row_labels) * height), "white")
    draw = ImageDraw.Draw(grid)
    for row, label in enumerate(row_labels):
        lines = _wrap(label, font, label_width - 8, draw)
        line_height = font.size + 2 if hasattr(font, "size") else 12
        top = row * height + max(0, (height - line_height * len(lines)) // 2)
        for index, line in enumerate(lines):
            draw.text((4, top + index * line_height), line, fill="black", font=font)
        for column in range(columns):
            grid.paste(images[row * columns + column], (label_width + column * width, row * height))
    return grid


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def generate(
    pipeline, jobs: Sequence[tuple[str, int]], batch_size: int = 32, **call_kwargs: Any
) -> Iterator[tuple[int, list[Image.Image]]]:
    """Images of ``(prompt, seed)`` jobs, in batches of ``batch_size``: yields ``(index of the batch's first job,
    images)``. Every image is drawn with its own CPU generator seeded by its job's seed, so an image depends on its
    prompt, its seed and the sampling settings only, not on the batch or on who asks: ``latentdiff generate``, the
    eval and the training grids give the same image for the same prompt and seed.

    ``call_kwargs`` go to the pipeline (``num_inference_steps``, ``guidance_scale``, ``negative_prompt``, ``height``,
    ...); steps, guidance and the negative prompt left out or ``None`` are the model's own (``pipeline.sampling_defaults``).
    """
    call_kwargs = {key: value for key, value in call_kwargs.items() if value is not None}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in chunk]
        with torch.no_grad():
            output = pipeline([prompt for prompt, _ in chunk], generator=generators, **call_kwargs)
        images = list(output.images if hasattr(output, "images") else output[0])
        if len(images) != len(chunk):
            raise RuntimeError(f"the pipeline returned {len(images)} images for {len(chunk)} prompts")
        yield start, images


def sample_images(pipeline, prompts: list[str], sample: SampleConfig, device: torch.device | str | None = None,
                  batch_size: int = 32) -> list[Image.Image]:
    """``sample.images_per_prompt`` images per prompt, prompt by prompt, through :func:`generate`: image ``j`` of
    every prompt is drawn with seed ``sample.seed + j``."""
    from .models.schedulers import scheduler_from_name

    if device is not None:
        pipeline.to(device)
    pipeline.scheduler = scheduler_from_name(sample.scheduler, pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    jobs = [(prompt, sample.seed + j) for prompt in prompts for j in range(sample.images_per_prompt)]
    settings = {"num_inference_steps": sample.num_inference_steps, "guidance_scale": sample.guidance_scale,
                "guidance_interval": sample.guidance_interval, "negative_prompt": sample.negative_prompt,
                "negative_prompt_carry": sample.negative_prompt_carry}
    return [image for _, batch in generate(pipeline, jobs, batch_size, **settings) for image in batch]


def sample_grid(pipeline, sample: SampleConfig, device: torch.device | str | None = None) -> Image.Image:
    """The labelled grid of ``sample.prompts`` (rows) x ``sample.images_per_prompt`` (columns)."""
    images = sample_images(pipeline, list(sample.prompts), sample, device)
    return labeled_grid(images, list(sample.prompts), sample.images_per_prompt)


def export_pipeline(pipeline, config: Config, training_state=None, device: torch.device | str | None = None) -> str:
    """Save ``pipeline`` as ``<output_dir>/pipeline`` with ``samples.png`` and a model card.

    Written into a temporary folder and renamed into place, so an interrupted export never leaves a
    half-written pipeline folder behind.
    """
    folder = os.path.join(config.output_dir, PIPELINE_DIR)
    with folder_written_in_place(folder) as partial:
        pipeline.save_pretrained(partial, safe_serialization=True)
        grid = sample_grid(pipeline, config.sample, device)
        grid.save(os.path.join(partial, SAMPLES_FILE))
        write_model_card(partial, config=config, training_state=training_state, sample_grid=SAMPLES_FILE)
    return folder

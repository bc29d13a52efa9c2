"""What a training run logs about its text conditioning, besides the loss.

Two probes, both cheap next to the training steps they watch:

- :class:`CaptionGapProbe`, the caption gap by noise level: on a fixed held batch, the error of the
  U-Net's ``x_0`` estimate with the true, the empty and a shuffled caption, in bands of ``t``
  (:func:`latentdiff.diffusion.caption_gap`). A model that reads its text has true < empty <
  shuffled; the high bands are where layout, color and shape are decided, so a gap that stays at
  zero there means the model ignores its prompts however low the loss.
- :func:`adherence_probe`: a few prompts of the shapes suite, one image each, few sampling steps,
  judged like ``latentdiff eval``; logged at each validation as a curve of when the run starts to
  follow its prompts.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from ..config import ConfigError, DataConfig
from ..diffusion import CaptionGap, caption_gap

logger = logging.getLogger(__name__)

#: Seed offset of the held scenes: far from any ``data.shapes.seed`` a config would use for training.
HELD_SCENES_SEED_OFFSET = 1_000_003


def held_examples(data: DataConfig, seed: int, num_images: int) -> tuple[torch.Tensor, list[str]]:
    """``num_images`` fixed ``(pixel_values, captions)`` for the caption gap.

    For the built-in shapes: fresh scenes from another seed, never seen in training, each with its full
    description (:func:`~latentdiff.data.shapes.full_caption`). For any other
    source: the first ``num_images`` usable examples of the training data (the gap then also
    measures how well those were learned); a dataset with fewer gives the largest multiple of 4 it
    has, with a warning.
    """
    from ..data.loading import make_training_dataset

    if data.source == "shapes":
        # The full description of each scene: the caption that tells the most, so the gap measures how
        # much of what a caption can say the model uses.
        shapes = dataclasses.replace(
            data.shapes, seed=data.shapes.seed + HELD_SCENES_SEED_OFFSET, num_samples=num_images,
            full_caption=True, captions_per_image=1,
        )
        data = dataclasses.replace(data, shapes=shapes, streaming=False, max_samples=None)
    dataset = make_training_dataset(data, seed, batch_size=num_images)
    pixel_values, captions = [], []
    for example in dataset:
        if example is not None:
            pixel_values.append(example["pixel_values"])
            captions.append(example["caption"])
        if len(captions) == num_images:
            break
    if len(captions) < num_images:
        usable = len(captions) - len(captions) % 4
        if usable == 0:
            raise ConfigError(
                f"train.caption_gap_images={num_images}: the caption gap needs at least 4 usable examples and "
                f"the data has {len(captions)}; set train.caption_gap_steps=0 to measure no caption gap"
            )
        logger.warning(
            "train.caption_gap_images=%d but the data has %d usable examples: the caption gap uses %d",
            num_images, len(captions), usable,
        )
        pixel_values, captions = pixel_values[:usable], captions[:usable]
    return torch.stack(pixel_values), captions


class CaptionGapProbe:
    """The caption gap of a training run on a fixed held batch (see the module docstring).

    Built once before training: the held images are encoded by the frozen autoencoder (posterior
    mean) and their noise is drawn from a generator of its own, so measuring never touches the
    training's random streams and a resumed run measures the same thing.

    Args:
        latents: scaled clean latents of the held images, ``[N, C, H, W]``.
        captions: their captions.
        encode_text: ``captions -> encoder_hidden_states`` with the text encoder as it is now.
        num_bands: equal bands of ``t``; ``N`` must be a multiple of it.
        seed: seed of the held noise.
    """

    def __init__(self, latents: torch.Tensor, captions: list[str], encode_text, num_bands: int = 4, seed: int = 0):
        if len(captions) < 2:
            raise ValueError("the caption gap needs at least two held images (one caption is shuffled onto another)")
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.latents = latents
        self.noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        self.captions = list(captions)
        # Each image gets the caption of the next one: a derangement, so no image keeps its own.
        self.shuffled_captions = self.captions[1:] + self.captions[:1]
        self.encode_text = encode_text
        self.num_bands = num_bands
        self.history: list[dict[str, Any]] = []

    @torch.no_grad()
    def measure(self, denoiser, scheduler, step: int) -> CaptionGap:
        """The gap now; also appended to :attr:`history` with its step."""
        true_states = self.encode_text(self.captions)
        gap = caption_gap(
            denoiser,
            scheduler,
            self.latents,
            true_states,
            self.encode_text([""] * len(self.captions)),
            self.encode_text(self.shuffled_captions),
            self.noise,
            num_bands=self.num_bands,
        )
        self.history.append({"step": step, **dataclasses.asdict(gap)})
        return gap


def adherence_probe(
    pipeline, holdout, prompts_per_task: int, steps: int, guidance: float, device=None, guidance_interval=None,
    negative_prompt=None, negative_prompt_carry=None,
) -> dict[str, float]:
    """Overall and per-task accuracy of ``pipeline`` on ``prompts_per_task`` prompts of each task of the
    shapes suite, one image each, ``steps`` DPM-Solver++ steps: a quick curve, not ``latentdiff eval``."""
    from ..eval.adherence import evaluate_adherence, select_prompts
    from ..eval.suite import shapes_suite

    suite = select_prompts(shapes_suite(holdout), max_prompts_per_task=prompts_per_task)
    results = evaluate_adherence(
        pipeline, suite, images_per_prompt=1, steps=steps, scheduler="dpm", guidance=guidance,
        guidance_interval=guidance_interval, negative_prompt=negative_prompt,
        negative_prompt_carry=negative_prompt_carry, progress=False,
    )
    logs = {"adherence_probe/overall": results.overall or 0.0}
    for task, entry in results.summary["tasks"].items():
        logs[f"adherence_probe/{task}"] = entry["accuracy"]
    return logs

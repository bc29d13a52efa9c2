#!/usr/bin/env python
"""Fit a trained pipeline's decoder to what its U-Net draws at low noise (an experiment, stage 3).

    python bench/fit_decoder.py runs/shapes/pipeline --config configs/shapes.yaml --out runs/fit/pipeline

The shapes-by-noise-level probe (``bench/shapes_by_noise_level.py``) finds that the U-Net's predictions at low
noise round small shapes' corners off: the latents it ends a sample with are smoother than the encoder's, and
the decoder, trained on the encoder's latents only, reads a smoothed small triangle as a circle. This script
keeps the encoder and the U-Net fixed and trains the decoder (with ``post_quant_conv``) on what the sampler
makes of training images at low noise: each image is encoded, noised to a strength drawn uniformly from
``[--min-strength, --max-strength]`` and denoised under one of its captions with the pipeline's own sampling
defaults (SDEdit, Meng et al. 2022, as the probe does), and the decoder learns to map the resulting latents back
to the image (pixel MSE, the default stage 1's loss). The rest of each batch (half by default: ``--sampled-share``
0.5 comes from the sampler) is the encoder's own posterior mean, so that the decoder keeps reading clean latents;
``--sampled-share 0`` is the control, a plain decoder fine-tune on the encoder's latents. Measured on one model
(docs/conditioning.md, twenty-ninth round), the control does most of what the fit does: stage 1's decoder is
short of whole-image training, and the fit to the sampler adds little beyond it. The encoder is unchanged, so
stage 2's latents stay valid, and the result is an ``AutoencoderKL`` in the same folder layout: a stock Diffusers
pipeline loads it.

The output folder is a copy of the pipeline with only ``vae/`` replaced. Measure it with ``bench/vae_judge.py
OUT/vae``, ``bench/shapes_by_noise_level.py OUT`` and ``latentdiff eval OUT --suite shapes``.

No library does this: Diffusers' and Accelerate's training examples fine-tune the decoder on the encoder's
latents only (sd-vae-ft-mse), not on a diffusion model's outputs; the noise-augmented decoder of Zheng et al.
2025 (Diffusion Transformers with Representation Autoencoders) adds Gaussian noise, which this decoder already
reads well (docs/conditioning.md, twenty-eighth round): the U-Net's error is a smoothing, not noise.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from latentdiff.config import load_config
from latentdiff.data.loading import load_image_text_dataset
from latentdiff.pipelines import LatentImg2ImgPipeline
from latentdiff.trainer.autoencoder import decoder_parameters
from latentdiff.trainer.encoding import encode_images


def check_arguments(args: argparse.Namespace) -> None:
    if not 0 <= args.sampled_share <= 1:
        raise ValueError(f"--sampled-share must be in [0, 1], got {args.sampled_share}")
    if not 0 < args.min_strength <= args.max_strength <= 1:
        raise ValueError(f"need 0 < --min-strength <= --max-strength <= 1, got {args.min_strength} and {args.max_strength}")
    for name in ("pairs", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if os.path.exists(args.out) and os.listdir(args.out):
        raise ValueError(f"--out {args.out} exists and is not empty: give a new folder")


def training_images(config_path: str, overrides: list[str], count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``count`` images of the config's training data (``H x W x 3`` in [-1, 1]) and one of each image's captions."""
    config = load_config(config_path, overrides)
    dataset = load_image_text_dataset(config.data)
    if len(dataset) < count:
        raise ValueError(f"the training data holds {len(dataset)} images, fewer than --pairs {count}")
    rng = random.Random(seed)
    rows = dataset.select(rng.sample(range(len(dataset)), count))
    column = config.data.caption_column
    images = np.stack([np.asarray(row[config.data.image_column].convert("RGB"), dtype=np.float32) / 127.5 - 1 for row in rows])
    captions = [row[column] if isinstance(row[column], str) else rng.choice(row[column]) for row in rows]
    return images, captions


@torch.no_grad()
def sampler_latents(pipe: LatentImg2ImgPipeline, images: np.ndarray, captions: list[str], min_strength: float,
                    max_strength: float, batch_size: int, seed: int) -> torch.Tensor:
    """The scaled latents the pipeline's sampler ends with from each image noised to a strength drawn uniformly
    from ``[min_strength, max_strength]``, one per batch (the pipeline takes one per call)."""
    generator = torch.Generator().manual_seed(seed)
    strengths = np.random.default_rng(seed).uniform(min_strength, max_strength, size=len(range(0, len(images), batch_size)))
    out = []
    for strength, start in zip(strengths, tqdm(range(0, len(images), batch_size), desc="sampler latents")):
        end = start + batch_size
        result = pipe(captions[start:end], image=(images[start:end] + 1) / 2, strength=float(strength),
                      generator=generator, output_type="latent")
        out.append(result.images)
    return torch.cat(out)


def encoder_latents(pipe: LatentImg2ImgPipeline, images: np.ndarray, batch_size: int) -> torch.Tensor:
    """The encoder's scaled posterior means (:func:`latentdiff.trainer.encoding.encode_images`), in batches."""
    return torch.cat([encode_images(pipe.vae, torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2), None, mean=True)
                      for start in range(0, len(images), batch_size)])


def fit_decoder(pipe: LatentImg2ImgPipeline, targets: torch.Tensor, sampled: torch.Tensor | None, clean: torch.Tensor,
                steps: int, batch_size: int, learning_rate: float, seed: int, sampled_share: float = 0.5) -> list[float]:
    """Train ``post_quant_conv`` and the decoder: ``sampled_share`` of each batch from the sampler's latents, the
    rest from the encoder's, each to its image by pixel MSE. Returns the loss every 50 steps."""
    vae = pipe.vae
    vae.requires_grad_(False)
    parameters = decoder_parameters(vae)
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50))
    generator = torch.Generator().manual_seed(seed)
    from_sampler = round(batch_size * sampled_share)
    losses, running = [], []
    vae.decoder.train()
    for step in (bar := tqdm(range(steps), desc="fit decoder")):
        pick_sampled = torch.randint(len(targets), (from_sampler,), generator=generator)
        pick_clean = torch.randint(len(targets), (batch_size - from_sampler,), generator=generator)
        latents = torch.cat([(clean if sampled is None else sampled)[pick_sampled], clean[pick_clean]])
        images = torch.cat([targets[pick_sampled], targets[pick_clean]])
        loss = F.mse_loss(pipe.decode_latents_to_image(latents), images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if (step + 1) % 50 == 0:
            losses.append(float(np.mean(running)))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            running = []
    vae.eval()
    vae.requires_grad_(False)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline")
    parser.add_argument("--config", required=True, help="the training config (its data section gives the images)")
    parser.add_argument("--out", required=True, help="a new folder: the pipeline with the fitted decoder")
    parser.add_argument("--pairs", type=int, default=4096, help="training images to fit on (each also denoised by the sampler unless --sampled-share is 0)")
    parser.add_argument("--min-strength", type=float, default=0.05)
    parser.add_argument("--max-strength", type=float, default=0.4)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--sampled-share", type=float, default=0.5,
                        help="share of each batch from the sampler's latents; 0: a plain fine-tune on the encoder's latents (the control)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value), as given to training")
    args = parser.parse_args()
    try:
        check_arguments(args)
    except ValueError as error:
        parser.error(str(error))
    start = time.time()
    pipe = LatentImg2ImgPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    images, captions = training_images(args.config, args.overrides, args.pairs, args.seed)
    clean = encoder_latents(pipe, images, 64)
    targets = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    sampled = None
    if args.sampled_share > 0:
        sampled = sampler_latents(pipe, images, captions, args.min_strength, args.max_strength, 64, args.seed)
        print(f"sampler latents vs the encoder's: mean squared difference {F.mse_loss(sampled, clean).item():.4f}")
    with torch.no_grad():
        for name, latents in (("encoder's", clean), ("sampler's", sampled)):
            if latents is not None:
                loss = np.mean([F.mse_loss(pipe.decode_latents_to_image(latents[i : i + 64]), targets[i : i + 64]).item()
                                for i in range(0, len(targets), 64)])
                print(f"decoder's pixel MSE before the fit, from the {name} latents: {loss:.4f}")
    losses = fit_decoder(pipe, targets, sampled, clean, args.steps, args.batch_size, args.learning_rate, args.seed,
                         args.sampled_share)
    shutil.copytree(args.pipeline, args.out, ignore=shutil.ignore_patterns("vae", "eval", "*.png"), dirs_exist_ok=True)
    pipe.vae.save_pretrained(os.path.join(args.out, "vae"), safe_serialization=True)
    print("loss every 50 steps:", " ".join(f"{loss:.4f}" for loss in losses))
    print(f"done in {(time.time() - start) / 60:.1f} min: {args.out}")


if __name__ == "__main__":
    main()

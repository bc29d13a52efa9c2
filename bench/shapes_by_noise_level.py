#!/usr/bin/env python
"""Where a trained model loses the shapes of objects, by noise level (an SDEdit probe).

    python bench/shapes_by_noise_level.py runs/shapes/pipeline --strengths 0.1 0.25 0.4 0.55 0.7 0.85

Fresh shapes scenes (the seed of :func:`latentdiff.eval.judge.reconstruction_agreement`, never used for
training) are encoded, noised to t = strength x T and denoised under their full description (every
object's color, shape, size and place) with the pipeline's own sampling defaults
(:class:`latentdiff.pipelines.LatentImg2ImgPipeline`, SDEdit: Meng et al. 2022). The judge
then reads each object in its grid cell (:func:`latentdiff.eval.judge.shape_outcomes`): the same shape,
another shape, or missing, per size. At strength 0 this is the autoencoder's own ceiling; the strength at
which an object size starts to come back with another shape is the noise level where the U-Net decides
(and loses) it. ``--caption empty`` denoises under the empty caption instead, so the two runs side by side
say how much the caption keeps each shape at each noise level. ``--one-step`` replaces the sampler by one
evaluation of the network at t (its estimate of the clean latents, decoded; no guidance): the denoiser
alone, without the sampler's steps.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np
import torch
from tqdm.auto import tqdm

from latentdiff.data.shapes import ShapesOptions, full_caption, make_shapes_sample
from latentdiff.diffusion import predicted_clean_latents
from latentdiff.eval.judge import RECONSTRUCTION_SEED, judge_image, shape_outcomes
from latentdiff.pipelines import LatentImg2ImgPipeline


def check_arguments(strengths: list[float], num_scenes: int, batch_size: int, caption: str) -> None:
    if num_scenes < 1 or batch_size < 1:
        raise ValueError(f"num_scenes and batch_size must be at least 1, got {num_scenes} and {batch_size}")
    if not strengths or any(not 0 <= strength <= 1 for strength in strengths):
        raise ValueError(f"strengths must be one or more numbers in [0, 1], got {strengths}")
    if caption not in ("full", "empty"):
        raise ValueError(f"caption must be 'full' or 'empty', got {caption!r}")


@torch.no_grad()
def one_step_images(pipe: LatentImg2ImgPipeline, images: np.ndarray, prompts: list[str], strength: float,
                    generator: torch.Generator) -> np.ndarray:
    """The network's x_0 estimate (:func:`latentdiff.diffusion.predicted_clean_latents`) from the images' latents
    noised to t = strength x (T - 1), decoded: what one evaluation of the denoiser keeps of each image."""
    clean = pipe.encode_image_to_latents(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1, generator)
    timesteps = torch.full((len(prompts),), round(strength * (pipe.scheduler.config.num_train_timesteps - 1)))
    noise = torch.randn(clean.shape, generator=generator)
    alpha_bar = pipe.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise
    text = pipe._encode_text(prompts, clean.device, None)
    prediction = pipe.unet(noisy, timesteps, encoder_hidden_states=text).sample
    decoded = pipe.decode_latents_to_image(predicted_clean_latents(pipe.scheduler, noisy, prediction, timesteps))
    return pipe.image_processor.postprocess(decoded, output_type="np")


def shapes_by_noise_level(
    pipe: LatentImg2ImgPipeline,
    strengths: list[float],
    num_scenes: int = 256,
    batch_size: int = 64,
    caption: str = "full",
    guidance_scale: float | None = None,
    seed: int = 0,
    image_size: int = 64,
    one_step: bool = False,
) -> dict[float, dict[str, dict[str, int]]]:
    """For each strength, the scenes' objects per size: ``{"same shape": n, "another shape": n, "missing": n}``."""
    check_arguments(strengths, num_scenes, batch_size, caption)
    samples = [make_shapes_sample(i, RECONSTRUCTION_SEED, image_size, ShapesOptions.create()) for i in range(num_scenes)]
    batches = []  # (scenes, prompts, images) of each batch, the same at every strength
    for start in range(0, num_scenes, batch_size):
        batch = samples[start : start + batch_size]
        batches.append(([sample["scene"] for sample in batch],
                        [full_caption(sample["scene"]) if caption == "full" else "" for sample in batch],
                        np.stack([np.asarray(sample["image"], dtype=np.float32) / 255 for sample in batch])))
    extra = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    report = {}
    for strength in tqdm(strengths, desc="strengths"):
        by_size: dict[str, Counter] = {}
        generator = torch.Generator().manual_seed(seed)
        for scenes, prompts, images in batches:
            if one_step:
                output = one_step_images(pipe, images, prompts, strength, generator)
            else:
                output = pipe(prompts, image=images, strength=strength, generator=generator, output_type="np", **extra).images
            for image, scene in zip(output, scenes):
                for size, outcome in shape_outcomes(judge_image(image), scene):
                    by_size.setdefault(size, Counter())[outcome] += 1
        report[strength] = {size: dict(outcomes) for size, outcomes in sorted(by_size.items())}
    return report


def markdown_table(report: dict[float, dict[str, dict[str, int]]]) -> str:
    sizes = sorted({size for counts in report.values() for size in counts})
    lines = ["| strength (t / T) | " + " | ".join(f"{size}: same shape / another / missing" for size in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for strength, counts in report.items():
        cells = []
        for size in sizes:
            outcomes = counts.get(size, {})
            same, total = outcomes.get("same shape", 0), sum(outcomes.values())
            cells.append(f"{same}/{total} ({same / max(total, 1):.2f}) / {outcomes.get('another shape', 0)} / {outcomes.get('missing', 0)}")
        lines.append(f"| {strength:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85])
    parser.add_argument("--n", type=int, default=256, help="scenes per strength")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--caption", choices=["full", "empty"], default="full")
    parser.add_argument("--guidance-scale", type=float, help="instead of the pipeline's default (1 turns guidance off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    parser.add_argument("--one-step", action="store_true", help="one network evaluation at t instead of the sampler")
    parser.add_argument("--json", help="write the counts here")
    args = parser.parse_args()
    try:
        check_arguments(args.strengths, args.n, args.batch_size, args.caption)
    except ValueError as error:
        parser.error(str(error))
    pipe = LatentImg2ImgPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    report = shapes_by_noise_level(pipe, args.strengths, args.n, args.batch_size, args.caption, args.guidance_scale, args.seed,
                                  one_step=args.one_step)
    print(markdown_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pipeline": args.pipeline, "caption": args.caption, "guidance_scale": args.guidance_scale, "one_step": args.one_step,
                       "n": args.n, "by_strength": report}, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""When, along sampling, a prompt's images gain or lose their objects: the judge on the sampler's estimate of
the clean image at every step.

    python bench/objects_along_sampling.py runs/shapes/pipeline --prompt "a triangle on a black background" \
        --images-per-prompt 16 --out runs/shapes/along_sampling

Each image is drawn as ``latentdiff eval`` draws it (the same seed per prompt and image, DPM-Solver++, the
pipeline's own guidance, negative prompt and guidance interval), so image ``j`` here is image ``j`` of the
eval's ``results.json``. After every step the sampler's data prediction (DPM-Solver++ works with it: the
guided estimate of the clean latents that the step moves toward; Lu et al. 2022, "DPM-Solver++") is decoded
and read by the judge (:func:`latentdiff.eval.judge.judge_image`). Written to ``--out``:
``along_sampling.json`` (per image and step: the timestep and the objects the judge sees; the timestep from
which the estimates hold the final image's shapes) and ``along_sampling.png`` (a row per image, the estimates
of every other step from left to right, the final image last). The summary line per prompt gives, for the
final images that hold no object, the timestep from which their estimates held none, and for the others the
timestep from which every estimate held the final image's shapes: where the sampler decided what the image
shows.

Written here because Diffusers' pipelines expose the latents at each step, not the sampler's estimate of the
clean image.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image

from latentdiff.eval.adherence import _call_settings, _model_guidance, _sampler, image_seed
from latentdiff.eval.judge import judge_image
from latentdiff.pipelines import LatentPipeline
from latentdiff.sampling import generate

TILE = 64


def estimates_along_sampling(pipe, prompt: str, seed: int, steps: int) -> tuple[list[int], list[np.ndarray], np.ndarray]:
    """The timesteps, the decoded clean-image estimate after each step (HxWx3 uint8), and the final image."""
    timesteps, estimates = [], []

    def keep_estimate(pipeline, step, timestep, callback_kwargs):
        # DPMSolverMultistepScheduler (dpmsolver++) keeps the data predictions of its last steps in model_outputs
        estimates.append(pipeline.scheduler.model_outputs[-1].detach().clone())
        timesteps.append(int(timestep))
        return callback_kwargs

    # drawn by the eval's own path: its generator per image, the model's guidance, negative prompt and interval
    settings = _call_settings(steps, _model_guidance(pipe, None), None)
    ((_, (final,)),) = generate(pipe, [(prompt, seed)], batch_size=1, callback_on_step_end=keep_estimate, **settings)
    with torch.no_grad():
        decoded = pipe.decode_latents_to_image(torch.cat(estimates))
    pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return timesteps, list(pixels), np.asarray(final)


def describe(judged) -> list[str]:
    return [f"{obj.color} {obj.shape}" for obj in judged.objects]


def shapes_settled_from(timesteps: list[int], seen: list[list[str]], final: list[str]) -> int | None:
    """The timestep from which every later estimate holds the final image's shapes (colors may still change):
    where the sampler decided what the image shows. None: not even the last estimate does."""
    def shapes(objects: list[str]) -> list[str]:
        return sorted(description.split()[-1] for description in objects)

    settled = None
    for timestep, objects in reversed(list(zip(timesteps, seen))):
        if shapes(objects) != shapes(final):
            break
        settled = timestep
    return settled


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", help="pipeline folder")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--images-per-prompt", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0, help="the eval's base seed (latentdiff eval --seed)")
    parser.add_argument("--out", required=True, help="folder for along_sampling.json and along_sampling.png")
    args = parser.parse_args(argv)
    if args.images_per_prompt < 1 or args.steps < 2:
        parser.error(f"--images-per-prompt must be >= 1 and --steps >= 2, got {args.images_per_prompt} and {args.steps}")
    if not os.path.isfile(os.path.join(args.pipeline, "model_index.json")):
        parser.error(f"{args.pipeline!r} is not a pipeline folder (no model_index.json)")

    pipe = LatentPipeline.from_pretrained(args.pipeline)
    records, rows = [], []
    with _sampler(pipe, "dpm"):
        for prompt in args.prompt:
            for index in range(args.images_per_prompt):
                timesteps, estimates, final = estimates_along_sampling(
                    pipe, prompt, image_seed(args.seed, prompt, index), args.steps
                )
                seen = [describe(judge_image(estimate)) for estimate in estimates]
                final_objects = describe(judge_image(final))
                records.append({"prompt": prompt, "image_index": index, "timesteps": timesteps,
                                "objects_seen": seen, "final": final_objects,
                                "shapes_settled_from": shapes_settled_from(timesteps, seen, final_objects)})
                rows.append(estimates[::2] + [final])
            mine = records[-args.images_per_prompt:]
            empty = [record["shapes_settled_from"] for record in mine if not record["final"]]
            drawn = [record["shapes_settled_from"] for record in mine if record["final"]]
            print(f"{prompt!r}: {len(empty)} of {len(mine)} final images hold no object (their estimates hold none "
                  f"from t = {empty}); the others' shapes settled from t = {drawn} (None: only in the final image)")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "along_sampling.json"), "w") as file:
        json.dump({"pipeline": args.pipeline, "steps": args.steps, "images": records}, file, indent=1)
    grid = Image.new("RGB", (len(rows[0]) * TILE, len(rows) * TILE))
    for row, images in enumerate(rows):
        for column, image in enumerate(images):
            grid.paste(Image.fromarray(image).resize((TILE, TILE), Image.NEAREST), (column * TILE, row * TILE))
    grid.save(os.path.join(args.out, "along_sampling.png"))
    print(f"written {args.out}/along_sampling.json and along_sampling.png")


if __name__ == "__main__":
    main()

"""Inpainting quality on the built-in shapes: does the repainted object match the prompt, and how visible are
the seams, for plain blending versus RePaint resampling.

    python bench/inpaint_quality.py runs/shapes/pipeline --n 200

Scenes come from :mod:`latentdiff.data.shapes` (1 or 2 objects, seeded). In each, one object is masked: the
bounding box of that object and of a cell-centred object of its size, grown by ``--margin`` cells and rounded
out to the autoencoder's grid. The prompt names a new object of another colour and shape (same size) in that
cell, and the other object as it is ("a blue square at the top left and a red circle at the bottom"); new
objects avoid the model's held-out combinations (read from the run's ``config.yaml``, or ``--holdout``). Every
scene is inpainted twice with the same seed, by plain blending (``jump_n_sample=1``) and by RePaint resampling
(``--jump-length``, ``--jump-n-sample``). Reported for each:

(a) success: the judge (:func:`latentdiff.eval.judge.judge_image`) sees exactly one object in the cell, of the
    prompted colour and shape (colour-only and shape-only rates too);
(b) seams: :func:`latentdiff.eval.inpaint_metrics.border_gradient` along the mask borders, and ``seam_score``, its
    ratio to the same measure on real images: real renders of the *other* scenes with these masks (scene i's
    mask on scene i+1's image), so the reference borders cross real objects as often as such contours do (on
    the scene's own render a border lies on plain background and has no gradient at all).

Writes a JSON (default ``MODEL/eval/inpaint_quality.json``) and a grid of the first scenes next to it (rows:
input, input with the mask, plain blending, RePaint).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import command_line, describe_machine, git_commit, machine_info  # noqa: E402

from latentdiff.data.shapes import (  # noqa: E402
    GRID,
    POSITION_NAMES,
    SIZE_FRACTIONS,
    ShapesOptions,
    noun_phrase,
    render_scene,
    sample_scene,
)
from latentdiff.eval.judge import judge_image  # noqa: E402
from latentdiff.eval.inpaint_metrics import border_gradient, seam_score  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a trained shapes pipeline folder")
    parser.add_argument("--n", type=int, default=100, help="number of scenes (default %(default)s)")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps (default %(default)s)")
    parser.add_argument("--scheduler", default="ddim", help="sampler: ddim, ddpm or dpm (default %(default)s)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's, else Diffusers')")
    parser.add_argument("--negative-prompt", default=None,
                        help="what guidance steers away from (default: the model's own, else none; \"\" for none)")
    parser.add_argument("--jump-length", type=int, default=3, help="RePaint j (default %(default)s)")
    parser.add_argument("--jump-n-sample", type=int, default=3, help="RePaint r (default %(default)s)")
    parser.add_argument("--margin", type=float, default=0.1, help="mask margin around the object, in cells")
    parser.add_argument("--holdout", action="append", default=None, help="attribute combination never to prompt")
    parser.add_argument("--batch-size", type=int, default=16, help="scenes per pipeline call (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="scenes and sampling seed (default %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default=None, help="JSON file (default MODEL/eval/inpaint_quality.json)")
    parser.add_argument("--grid-scenes", type=int, default=8, help="scenes in the example grid (default %(default)s)")
    args = parser.parse_args(argv)
    for name in ("n", "steps", "jump_length", "jump_n_sample", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.n < 2:
        parser.error("--n must be at least 2 (the real-image reference pairs each scene with another)")
    if args.jump_n_sample > 1 and args.jump_length >= args.steps:
        parser.error(f"--jump-length ({args.jump_length}) must be smaller than --steps ({args.steps}) to jump back")
    if not 0 <= args.margin < 0.5:
        parser.error(f"--margin is a fraction of a cell in [0, 0.5), got {args.margin}")
    return args


def model_holdout(model: str) -> list[str]:
    """The run's held-out combinations (``data.shapes.holdout`` of the ``config.yaml`` next to the pipeline)."""
    import yaml

    from latentdiff.hub import TRAINING_CONFIG_FILE, find_run_files

    path = find_run_files(model, sample_grid=None).get(TRAINING_CONFIG_FILE)
    if path is None:
        return []
    with open(path, encoding="utf-8") as file:
        config = yaml.safe_load(file) or {}
    return list(((config.get("data") or {}).get("shapes") or {}).get("holdout") or [])


def object_box(obj: dict[str, Any], image_size: int) -> tuple[float, float, float, float]:
    """(top, left, bottom, right) in pixels of an object as `render_scene` draws it."""
    cell = image_size / GRID
    half = SIZE_FRACTIONS[obj["size"]] * cell / 2
    center_x = (obj["col"] + 0.5 + obj.get("dx", 0.0)) * cell
    center_y = (obj["row"] + 0.5 + obj.get("dy", 0.0)) * cell
    return center_y - half, center_x - half, center_y + half, center_x + half


def make_case(index: int, seed: int, image_size: int, factor: int, margin: float, options: ShapesOptions) -> dict:
    """One scene with one object to replace: the input render, the mask, the prompt and the target object."""
    rng = random.Random(f"latentdiff-inpaint-quality/{seed}/{index}")
    scene = sample_scene(rng, options)
    masked = rng.randrange(len(scene["objects"]))
    old = scene["objects"][masked]
    others = [obj for i, obj in enumerate(scene["objects"]) if i != masked]
    choices = [
        (shape, color)
        for shape, color, size in options.allowed_objects
        if size == old["size"] and shape != old["shape"] and color != old["color"]
        # not the other object's kind: "a blue square ... and a blue square ..." is no caption of the training data
        and all((shape, color) != (other["shape"], other["color"]) for other in others)
    ]
    shape, color = rng.choice(choices)
    new = {"shape": shape, "color": color, "size": old["size"], "row": old["row"], "col": old["col"]}

    boxes = [object_box(old, image_size), object_box(new, image_size)]
    grow = margin * image_size / GRID
    top = max(0, math.floor((min(b[0] for b in boxes) - grow) / factor) * factor)
    left = max(0, math.floor((min(b[1] for b in boxes) - grow) / factor) * factor)
    bottom = min(image_size, math.ceil((max(b[2] for b in boxes) + grow) / factor) * factor)
    right = min(image_size, math.ceil((max(b[3] for b in boxes) + grow) / factor) * factor)
    mask = np.zeros((image_size, image_size), dtype=bool)
    mask[top:bottom, left:right] = True

    # the new object first, then the other one as it is: a caption template of the training data
    phrases = [f"{noun_phrase(o['shape'], o['color'])} {POSITION_NAMES[(o['row'], o['col'])]}" for o in [new] + others]
    prompt = " and ".join(phrases)
    return {
        "image": render_scene(scene, image_size),
        "mask": mask,
        "prompt": prompt,
        "cell": (old["row"], old["col"]),
        "new": {"shape": shape, "color": color},
        "old": {"shape": old["shape"], "color": old["color"]},
    }


def judge_case(image: Image.Image, case: dict) -> dict[str, bool]:
    """Whether the repainted cell holds exactly one object of the prompted colour and shape."""
    in_cell = [obj for obj in judge_image(image).objects if (obj.row, obj.col) == case["cell"]]
    return {
        "success": len(in_cell) == 1
        and in_cell[0].color == case["new"]["color"]
        and in_cell[0].shape == case["new"]["shape"],
        "color": any(obj.color == case["new"]["color"] for obj in in_cell),
        "shape": any(obj.shape == case["new"]["shape"] for obj in in_cell),
    }


def inpaint_all(pipe, cases: list[dict], args: argparse.Namespace, guidance: float, negative_prompt: str,
                resample: bool) -> list:
    images = []
    for start in range(0, len(cases), args.batch_size):
        batch = cases[start : start + args.batch_size]
        images += pipe(
            [case["prompt"] for case in batch],
            image=[case["image"] for case in batch],
            mask_image=[Image.fromarray(case["mask"].astype(np.uint8) * 255) for case in batch],
            num_inference_steps=args.steps,
            guidance_scale=guidance,
            negative_prompt=negative_prompt,
            jump_length=args.jump_length if resample else 1,
            jump_n_sample=args.jump_n_sample if resample else 1,
            generator=[torch.Generator("cpu").manual_seed(args.seed + start + i) for i in range(len(batch))],
        ).images
    return images


def summarize(images: list, cases: list[dict], real_images: list, real_masks: list, seconds: float) -> dict:
    verdicts = [judge_case(image, case) for image, case in zip(images, cases)]
    masks = [case["mask"] for case in cases]
    result = {
        "success_rate": float(np.mean([v["success"] for v in verdicts])),
        "color_rate": float(np.mean([v["color"] for v in verdicts])),
        "shape_rate": float(np.mean([v["shape"] for v in verdicts])),
        "border_gradient": border_gradient(images, masks),
        "seconds": round(seconds, 1),
    }
    try:
        result["seam_score"] = seam_score(images, masks, real_images, real_masks)
    except ValueError as error:  # the real renders are flat along every border: no reference
        result["seam_score"] = None
        result["seam_score_note"] = str(error)
    result["verdicts"] = verdicts
    return result


def save_grid(cases: list[dict], plain: list, repaint: list, path: str, count: int) -> None:
    from diffusers.utils import make_image_grid

    count = min(count, len(cases))
    overlays = []
    for case in cases[:count]:
        pixels = np.asarray(case["image"]).copy()
        pixels[case["mask"]] = (0.5 * pixels[case["mask"]] + 0.5 * 255).astype(np.uint8)
        overlays.append(Image.fromarray(pixels))
    rows = [case["image"] for case in cases[:count]] + overlays + plain[:count] + repaint[:count]
    make_image_grid(rows, rows=4, cols=count).save(path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from latentdiff import LatentInpaintPipeline
    from latentdiff.models.schedulers import scheduler_from_name

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = LatentInpaintPipeline.from_pretrained(args.model)
    pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(leave=False)
    sample_size = pipe.unet.config.sample_size
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    height, width = height * pipe.vae_scale_factor, width * pipe.vae_scale_factor
    if height != width:
        raise ValueError(f"the shapes scenes are square; the model makes {height}x{width} images")
    guidance = pipe.sampling_default("guidance_scale", args.guidance)
    negative_prompt = pipe.sampling_default("negative_prompt", args.negative_prompt) or ""
    guidance_interval = pipe.sampling_default("guidance_interval", None)  # the model's, applied by the pipeline
    holdout = args.holdout if args.holdout is not None else model_holdout(args.model)
    options = ShapesOptions.create(max_objects=2, mixture={"single": 0.5, "relation": 0.5}, holdout=holdout)

    cases = [make_case(i, args.seed, height, pipe.vae_scale_factor, args.margin, options) for i in range(args.n)]
    # The reference: scene i's mask on the real render of scene i + 1.
    real_images = [cases[(i + 1) % len(cases)]["image"] for i in range(len(cases))]
    real_masks = [case["mask"] for case in cases]

    start = time.perf_counter()
    plain = inpaint_all(pipe, cases, args, guidance, negative_prompt, resample=False)
    plain_seconds = time.perf_counter() - start
    start = time.perf_counter()
    repaint = inpaint_all(pipe, cases, args, guidance, negative_prompt, resample=True)
    repaint_seconds = time.perf_counter() - start

    plain_result = summarize(plain, cases, real_images, real_masks, plain_seconds)
    repaint_result = summarize(repaint, cases, real_images, real_masks, repaint_seconds)
    report = {
        "benchmark": "inpaint_quality",
        "model": os.path.abspath(args.model),
        "command": command_line(),
        "commit": git_commit(),
        "machine": describe_machine(machine_info(device)),
        "settings": {
            "n": args.n,
            "image_size": height,
            "steps": args.steps,
            "scheduler": args.scheduler,
            "guidance_scale": guidance,
            "negative_prompt": negative_prompt or None,
            "guidance_interval": list(guidance_interval) if guidance_interval is not None else None,
            "jump_length": args.jump_length,
            "jump_n_sample": args.jump_n_sample,
            "margin_cells": args.margin,
            "holdout": holdout,
            "seed": args.seed,
        },
        "real_border_gradient": border_gradient(real_images, real_masks),
        "plain": {key: value for key, value in plain_result.items() if key != "verdicts"},
        "repaint": {key: value for key, value in repaint_result.items() if key != "verdicts"},
        "scenes": [
            {"prompt": case["prompt"], "old": case["old"], "new": case["new"], "plain": p, "repaint": r}
            for case, p, r in zip(cases, plain_result["verdicts"], repaint_result["verdicts"])
        ],
    }

    out = args.out or os.path.join(args.model, "eval", "inpaint_quality.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as file:
        json.dump(report, file, indent=2)
    grid = os.path.splitext(out)[0] + "_grid.png"
    save_grid(cases, plain, repaint, grid, args.grid_scenes)

    def seam(result: dict) -> str:
        return "n/a" if result["seam_score"] is None else f"{result['seam_score']:.2f}"

    print(f"{args.n} scenes, {height} px, {args.steps} {args.scheduler} steps, guidance {guidance}"
          + (f" at timesteps {guidance_interval[0]:g}-{guidance_interval[1]:g}" if guidance_interval is not None else "")
          + (f", negative prompt {negative_prompt!r}" if negative_prompt else ""))
    print(f"{'':28}{'success':>9}{'color':>8}{'shape':>8}{'border grad':>13}{'seam score':>12}{'seconds':>9}")
    for name, result in (
        ("plain blending", plain_result),
        (f"RePaint j={args.jump_length} r={args.jump_n_sample}", repaint_result),
    ):
        print(
            f"{name:28}{result['success_rate']:>9.3f}{result['color_rate']:>8.3f}{result['shape_rate']:>8.3f}"
            f"{result['border_gradient']:>13.4f}{seam(result):>12}{result['seconds']:>9.1f}"
        )
    print(f"{'real images (reference)':28}{'':25}{report['real_border_gradient']:>13.4f}")
    print(f"wrote {out} and {grid}")
    return report


if __name__ == "__main__":
    main()

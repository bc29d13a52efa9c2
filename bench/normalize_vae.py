#!/usr/bin/env python
"""Copy a trained autoencoder with its latents standardized per channel (docs/conditioning.md).

    python bench/normalize_vae.py runs/base/vae runs/base/vae_norm [--samples 1024] [--seed 0]

The same fold as stage 1's ``vae_train.normalize_latents`` (:func:`latentdiff.trainer.autoencoder.
normalize_latents`), applied afterwards to an existing autoencoder, measured on fresh shapes images,
so that an ablation can compare centered and uncentered latents of one autoencoder.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from diffusers import AutoencoderKL

from latentdiff.data.shapes import make_shapes_dataset
from latentdiff.trainer.autoencoder import normalize_latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vae", help="folder of the trained AutoencoderKL")
    parser.add_argument("output", help="folder to write the standardized copy to")
    parser.add_argument("--samples", type=int, default=1024, help="shapes images to measure the latents on")
    parser.add_argument("--resolution", type=int, default=64, help="image size the autoencoder was trained on")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and of the posterior samples")
    args = parser.parse_args()

    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    images = make_shapes_dataset(args.samples, seed=args.seed, image_size=args.resolution)["image"]

    def batches():
        for start in range(0, len(images), args.batch_size):
            pixels = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images[start : start + args.batch_size]])
            yield torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0

    mean, std = normalize_latents(vae, batches(), generator=torch.Generator().manual_seed(args.seed))
    print("per-channel mean", [round(v, 3) for v in mean], "std", [round(v, 3) for v in std])
    vae.save_pretrained(args.output, safe_serialization=True)


if __name__ == "__main__":
    main()

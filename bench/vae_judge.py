#!/usr/bin/env python
"""How well the judge reads an autoencoder's reconstructions: the ceiling it sets on adherence.

    python bench/vae_judge.py runs/shapes/vae [--n 256]

Renders ``--n`` fresh shapes scenes (a seed never used for training), encodes them to the posterior
mean, decodes, judges each reconstruction and compares it with its scene
(:func:`latentdiff.eval.judge.scene_differences`). Prints the agreement, the most common
differences, and the latent statistics stage 2 sees (mean and std per channel after scaling).
"""
import argparse
import collections

import numpy as np
import torch
from diffusers import AutoencoderKL

from latentdiff.data.shapes import make_shapes_dataset
from latentdiff.eval.judge import judge_image, scene_differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vae")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    data = make_shapes_dataset(args.n, seed=424242, image_size=args.resolution, progress_bar=False)
    agree, kinds, latents = 0, collections.Counter(), []
    for start in range(0, args.n, 64):
        rows = data[start : start + 64]
        pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for im in rows["image"]])
        with torch.no_grad():
            z = vae.encode(pixels).latent_dist.mean
            latents.append(z * vae.config.scaling_factor)
            out = vae.decode(z).sample.clamp(-1, 1)
        for image, scene in zip(out, rows["scene"]):
            array = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
            differences = scene_differences(judge_image(array), scene)
            agree += not differences
            kinds.update(d.split(":")[0].split(" ")[0] for d in differences)
    z = torch.cat(latents)
    print(f"judge agreement on reconstructions: {agree / args.n:.3f} ({agree}/{args.n})")
    print("differences:", dict(kinds.most_common(8)))
    print("scaled latents: mean", [round(v, 3) for v in z.mean(dim=(0, 2, 3)).tolist()], "std",
          [round(v, 3) for v in z.std(dim=(0, 2, 3)).tolist()], "overall mean", round(z.mean().item(), 3), "std", round(z.std().item(), 3))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""How well the judge reads an autoencoder's reconstructions: the ceiling it sets on adherence.

    python bench/vae_judge.py runs/shapes/vae [--n 256]

Encodes ``--n`` fresh shapes scenes (a seed never used for training) to the posterior mean, decodes,
and asks whether the judge reads each reconstruction as its scene
(:func:`latentdiff.eval.judge.reconstruction_agreement`, the check stage 1 logs at its end). Prints
the agreement, the kinds of difference, and the latent statistics stage 2 sees (mean and std per
channel after scaling).
"""
import argparse

import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor

from latentdiff.eval.judge import reconstruction_agreement
from latentdiff.trainer.autoencoder import vae_reconstructor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vae")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    reconstruct, latents = vae_reconstructor(vae), []

    def reconstruct_and_keep_latents(images):
        with torch.no_grad():
            pixels = VaeImageProcessor.normalize(VaeImageProcessor.numpy_to_pt(images.astype("float32") / 255.0))
            latents.append(vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor)
        return reconstruct(images)

    report = reconstruction_agreement(reconstruct_and_keep_latents, args.n, image_size=args.resolution)
    z = torch.cat(latents)
    agreement = report["agreement"]
    print(f"judge agreement on reconstructions: {agreement:.3f} ({round(agreement * args.n)}/{args.n})")
    print("differences:", report["differences"])
    print("scaled latents: mean", [round(v, 3) for v in z.mean(dim=(0, 2, 3)).tolist()], "std",
          [round(v, 3) for v in z.std(dim=(0, 2, 3)).tolist()], "overall mean", round(z.mean().item(), 3), "std", round(z.std().item(), 3))


if __name__ == "__main__":
    main()

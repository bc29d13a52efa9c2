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

from latentdiff.eval.judge import reconstruction_agreement
from latentdiff.trainer.autoencoder import vae_reconstructor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vae")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    latents = []
    reconstruct = vae_reconstructor(vae, on_latents=lambda z: latents.append(z * vae.config.scaling_factor))
    report = reconstruction_agreement(reconstruct, args.n, image_size=args.resolution)
    z = torch.cat(latents)
    print(f"judge agreement on reconstructions: {report['agreement']:.3f} ({report['agreed']}/{args.n})")
    print("images with each kind of difference:", report["differences"])
    print("scaled latents: mean", [round(v, 3) for v in z.mean(dim=(0, 2, 3)).tolist()], "std",
          [round(v, 3) for v in z.std(dim=(0, 2, 3)).tolist()], "overall mean", round(z.mean().item(), 3), "std", round(z.std().item(), 3))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""How the gradients of two bands of noise levels compare in a trained pipeline (docs/conditioning.md).

    python bench/band_gradients.py runs/shapes/pipeline [--boundary 700] [--clamp 0.25] [--images 256]

On ``--images`` fresh shapes scenes with their full descriptions, the gradient of the U-Net's weighted
training loss (min-SNR-gamma, and min-SNR with the lower SNR clamp of ``diffusion.snr_clamp_low`` for the
high band) over ``t < boundary`` and over ``t >= boundary``, each as its share of the samples would give it
in a uniform batch. Printed: the norm of each, their cosine, and, per weight, the share of the summed squared
gradient that comes from the high band: Adam divides every update by the root of that sum's running mean,
so where the high band holds most of it, it sets the step size of the low band too.
"""

import argparse
import sys

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a pipeline folder")
    parser.add_argument("--boundary", type=int, default=700, help="first timestep of the high band")
    parser.add_argument("--clamp", type=float, default=0.25, help="diffusion.snr_clamp_low of the high band")
    parser.add_argument("--gamma", type=float, default=5.0, help="diffusion.snr_gamma")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="images per forward pass")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from common import held_scenes
    from latentdiff.diffusion import min_snr_weights, training_target
    from latentdiff.pipelines import LatentPipeline
    from latentdiff.trainer.encoding import tokenize

    pipeline = LatentPipeline.from_pretrained(args.model)
    scheduler, latents, captions = held_scenes(pipeline, args.model, args.images)
    with torch.no_grad():
        context = pipeline.text_encoder(tokenize(pipeline.tokenizer, captions))[0]
    unet = pipeline.unet.train()
    parameters = [p for p in unet.parameters() if p.requires_grad]
    steps = scheduler.config.num_train_timesteps

    def band_gradient(low: int, high: int, clamp: float, images: slice = slice(None), seed: int = args.seed) -> torch.Tensor:
        """The gradient of the band's summed weighted loss over ``images``, divided by what a uniform batch of
        as many images holds."""
        scene_latents, scene_context = latents[images], context[images]
        count = scene_latents.shape[0]
        generator = torch.Generator().manual_seed(seed)
        timesteps = torch.randint(low, high, (count,), generator=generator)
        noise = torch.randn(scene_latents.shape, generator=generator)
        noisy = scheduler.add_noise(scene_latents, noise, timesteps)
        target = training_target(scheduler, scene_latents, noise, timesteps)
        weights = min_snr_weights(scheduler, timesteps, args.gamma, low=clamp)
        share = (high - low) / steps  # of a uniform batch, this band holds this share
        unet.zero_grad(set_to_none=True)
        for start in range(0, count, args.batch):
            part = slice(start, start + args.batch)
            prediction = unet(noisy[part], timesteps[part], scene_context[part]).sample
            error = (prediction.float() - target[part]).square().mean(dim=(1, 2, 3))
            (share * (error * weights[part]).sum() / count).backward()
        return torch.cat([p.grad.flatten() for p in parameters])

    low_band = band_gradient(0, args.boundary, 0.0)
    high_band = band_gradient(args.boundary, steps, 0.0)
    high_band_clamped = band_gradient(args.boundary, steps, args.clamp)

    def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b / (a.norm() * b.norm()))

    print(f"gradient norm: t < {args.boundary} {low_band.norm():.4g}; t >= {args.boundary}: min-SNR-{args.gamma:g} "
          f"{high_band.norm():.4g}, with the clamp {args.clamp:g} {high_band_clamped.norm():.4g}")
    print(f"cosine with the low band: min-SNR {cosine(low_band, high_band):.3f}, "
          f"with the clamp {cosine(low_band, high_band_clamped):.3f}")
    for name, high in (("min-SNR", high_band), ("with the clamp", high_band_clamped)):
        share = high.square() / (high.square() + low_band.square()).clamp(min=1e-30)
        print(f"high band's share of the squared gradient per weight, {name}: median {share.median():.3f}, "
              f"mean {share.mean():.3f}")
    # How much of each band's gradient is signal: two halves of the scenes, with their own timesteps and
    # noise, agree (cosine near 1) where the mean gradient dominates and not (near 0) where the noise does.
    # For independent halves E[g1 . g2] = |E g|^2, so g1 . g2 / |g1|^2 estimates the signal's share of a
    # half's squared norm (of --images / 2 scenes).
    halves = (slice(0, args.images // 2), slice(args.images // 2, args.images))
    for name, low, high, clamp in (("t < %d" % args.boundary, 0, args.boundary, 0.0),
                                   ("t >= %d with the clamp" % args.boundary, args.boundary, steps, args.clamp)):
        first = band_gradient(low, high, clamp, halves[0], args.seed + 1)
        second = band_gradient(low, high, clamp, halves[1], args.seed + 2)
        signal = float(first @ second) / float((first.square().sum() + second.square().sum()) / 2)
        print(f"{name}: two halves of {args.images // 2} scenes, cosine {cosine(first, second):.3f}; "
              f"signal's share of a half's squared norm {signal:.3f}")


if __name__ == "__main__":
    sys.exit(main())

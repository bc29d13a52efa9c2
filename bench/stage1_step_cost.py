#!/usr/bin/env python
"""What one stage-1 training step of a config costs in each of its phases, for config variants side by side (one
process, interleaved rounds): the counterpart of ``bench/stage2_step_cost.py`` for the autoencoder.

    python bench/stage1_step_cost.py --config configs/shapes.yaml --variant "vae_train.mixed_precision=no" \
        --variant "vae_train.mixed_precision=bf16"

Each variant builds the config's autoencoder (``latentdiff.models.build_vae``) and times the step of
``training/train_vae.py`` (``AutoencoderForTraining``: encode, sample, decode; the reconstruction and KL terms;
backward; AdamW) on random images at batch ``vae_train.batch_size``, in its three phases: random crops of
``vae_train.crop_size``, whole images, and the decoder fine-tune (whole images, the encoder without gradient, an
optimizer over the decoder side only). A ``vae_train.mixed_precision=bf16`` variant runs the forward under bf16
autocast with torch's math attention kernel, as a bf16 run on a CPU does
(``latentdiff.trainer.loop.use_math_attention_on_cpu``). The perceptual, adversarial and scale-equivariance terms
are not timed. Reported: median milliseconds per step and phase over ``--rounds`` rounds of ``--steps`` steps (the
first ``--warmup`` of each discarded), and each variant's speed relative to the first.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import time

import torch

from latentdiff.config import load_config
from latentdiff.models import build_vae
from latentdiff.trainer.autoencoder import AutoencoderForTraining, decoder_parameters, kl_loss, reconstruction_loss

from stage2_step_cost import autocast

PHASES = ("crops", "whole images", "decoder only")


def build(config_file: str, variant: str) -> dict:
    config = load_config(config_file, shlex.split(variant))
    train = config.vae_train
    vae = build_vae(config.model).train().requires_grad_(True)
    resolution = config.data.resolution
    crop = train.crop_size or resolution
    generator = torch.Generator().manual_seed(0)
    images = {
        "crops": torch.rand(train.batch_size, 3, crop, crop, generator=generator) * 2 - 1,
        "whole images": torch.rand(train.batch_size, 3, resolution, resolution, generator=generator) * 2 - 1,
    }
    images["decoder only"] = images["whole images"]
    optimizers = {
        "crops": torch.optim.AdamW(vae.parameters(), lr=1e-4),
        "whole images": torch.optim.AdamW(vae.parameters(), lr=1e-4),
        "decoder only": torch.optim.AdamW(decoder_parameters(vae), lr=1e-4),
    }
    return {"autoencoder": AutoencoderForTraining(vae), "images": images, "optimizers": optimizers,
            "kl_weight": train.kl_weight, "loss": train.reconstruction_loss, "precision": train.mixed_precision}


def time_phase(parts: dict, phase: str, steps: int, warmup: int) -> list[float]:
    autoencoder, images, optimizer = parts["autoencoder"], parts["images"][phase], parts["optimizers"][phase]
    generator = torch.Generator().manual_seed(1)
    times = []
    for step in range(steps + warmup):
        start = time.perf_counter()
        with autocast(parts["precision"]):
            reconstructions, mean, logvar, _ = autoencoder(images, generator, decoder_only=phase == "decoder only")
        loss = reconstruction_loss(images, reconstructions.float(), parts["loss"])
        loss = loss + parts["kl_weight"] * kl_loss(mean.float(), logvar.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/shapes.yaml")
    parser.add_argument("--variant", action="append", required=True, help="space-separated key=value overrides ('' = the config)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    models = [build(args.config, variant) for variant in args.variant]
    results = {variant: {phase: [] for phase in PHASES} for variant in args.variant}
    for _ in range(args.rounds):
        for variant, parts in zip(args.variant, models):
            for phase in PHASES:
                results[variant][phase] += time_phase(parts, phase, args.steps, args.warmup)
    batch = models[0]["images"]["crops"].shape[0]
    print(f"threads: {torch.get_num_threads()}, batch {batch}, {args.rounds} rounds of {args.steps} steps per phase")
    print("| variant | " + " | ".join(f"{phase}: ms per step" for phase in PHASES) + " | speed vs first, per phase |")
    print("|---|" + "---|" * (len(PHASES) + 1))
    first = None
    for variant, phases in results.items():
        medians = [1000 * statistics.median(phases[phase]) for phase in PHASES]
        first = first or medians
        speeds = " / ".join(f"{f / m:.2f}x" for f, m in zip(first, medians))
        print(f"| {variant or '(the config)'} | " + " | ".join(f"{m:.0f}" for m in medians) + f" | {speeds} |")


if __name__ == "__main__":
    main()

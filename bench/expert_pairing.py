#!/usr/bin/env python
"""Which band of noise levels limits a model: sample with one model above a timestep and another below it.

    python bench/expert_pairing.py LOW_NOISE_PIPELINE HIGH_NOISE_PIPELINE --boundary 700 --out DIR
        [--images-per-prompt 4] [--steps 25] [--guidance G] [--negative-prompt TEXT] [--guidance-interval LOW HIGH]

The two pipelines must share their autoencoder (stage 2 runs on one stage 1). Every denoising step at
``t >= boundary`` is the high-noise pipeline's U-Net, read with its own text encoder; every step below,
the low-noise one's. The shapes suite then judges the images as ``latentdiff eval`` does (the sampling
settings default to the low-noise model's saved ones). docs/conditioning.md (sixth round) uses it to ask
whether what a loss weighting costs a model is in the band it trains or in the others: the SNR clamp's
top band paired with the default's lower bands.

Each model keeps its own text encoder, which a pipeline with noise-level experts
(:mod:`latentdiff.models.experts`) does not: the two encoders' outputs are concatenated along the
feature axis for the pipeline and split again for each U-Net. That is a device of this measurement only.
"""

from __future__ import annotations

import argparse
import json
import os

import torch


class _PairedTextEncoders(torch.nn.Module):
    """Both models' text embeddings, side by side along the feature axis."""

    def __init__(self, low: torch.nn.Module, high: torch.nn.Module):
        super().__init__()
        self.low, self.high, self.config = low, high, low.config

    dtype = property(lambda self: self.low.dtype)
    device = property(lambda self: self.low.device)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return (torch.cat([self.low(input_ids)[0], self.high(input_ids)[0]], dim=-1),)


class _PairedUNets(torch.nn.Module):
    """The high-noise U-Net at ``t >= boundary`` on its half of the embeddings, the low-noise one below."""

    def __init__(self, low: torch.nn.Module, high: torch.nn.Module, boundary: float, low_width: int):
        super().__init__()
        self.low, self.high, self.config = low, high, low.config
        self.boundary, self.low_width = boundary, low_width

    dtype = property(lambda self: self.low.dtype)
    device = property(lambda self: self.low.device)

    def forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        if t >= self.boundary:
            return self.high(sample, timestep, encoder_hidden_states[..., self.low_width :], *args, **kwargs)
        return self.low(sample, timestep, encoder_hidden_states[..., : self.low_width], *args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("low_noise", help="pipeline folder whose U-Net denoises t < boundary")
    parser.add_argument("high_noise", help="pipeline folder whose U-Net denoises t >= boundary")
    parser.add_argument("--boundary", type=float, required=True, help="first timestep of the high-noise model")
    parser.add_argument("--out", required=True, help="folder for results.json")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scheduler", default="dpm")
    parser.add_argument("--guidance", type=float, default=None, help="default: the low-noise model's saved scale")
    parser.add_argument("--negative-prompt", default=None, help="default: the low-noise model's saved one")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"))
    args = parser.parse_args()

    from latentdiff.eval.adherence import evaluate_adherence, format_report, model_holdout, select_prompts
    from latentdiff.eval.suite import shapes_suite
    from latentdiff.pipelines import LatentPipeline

    low, high = LatentPipeline.from_pretrained(args.low_noise), LatentPipeline.from_pretrained(args.high_noise)
    if low.unet_high_noise is not None or high.unet_high_noise is not None:
        raise SystemExit("expert_pairing.py: give two pipelines of one U-Net each")
    low_vae, high_vae = low.vae.state_dict(), high.vae.state_dict()
    if low_vae.keys() != high_vae.keys() or not all(torch.equal(low_vae[k], high_vae[k]) for k in low_vae):
        raise SystemExit("expert_pairing.py: the two pipelines have different autoencoders; pair models of one stage 1")
    paired = LatentPipeline(
        vae=low.vae, tokenizer=low.tokenizer, scheduler=low.scheduler,
        text_encoder=_PairedTextEncoders(low.text_encoder, high.text_encoder),
        unet=_PairedUNets(low.unet, high.unet, args.boundary, low.text_encoder.config.hidden_size),
    )  # fmt: skip
    paired.sampling_defaults = dict(low.sampling_defaults)
    suite = select_prompts(shapes_suite(model_holdout(args.low_noise)[0]))
    results = evaluate_adherence(
        paired, suite, images_per_prompt=args.images_per_prompt, steps=args.steps, scheduler=args.scheduler,
        guidance=args.guidance, negative_prompt=args.negative_prompt, guidance_interval=args.guidance_interval,
    )  # fmt: skip
    print(format_report(results))
    os.makedirs(args.out, exist_ok=True)
    record = {"low_noise": args.low_noise, "high_noise": args.high_noise, "boundary": args.boundary, **results.to_json()}
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as file:
        json.dump(record, file, indent=1)
    print(f"wrote {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    main()

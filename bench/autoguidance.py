#!/usr/bin/env python
"""Autoguidance on the shapes suite: guide a model with a weaker model of its own kind (docs/conditioning.md).

    python bench/autoguidance.py MODEL GUIDE [--guidance 1.5 2.5] [--cfg 2.5] [--out DIR]

Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself": the denoiser is
``D_guide(x; c) + w (D(x; c) - D_guide(x; c))``, where ``D_guide`` is a weaker model (fewer training steps,
or smaller) given the *same* prompt. Classifier-free guidance is the special case where the weaker model is
the same one given the empty caption; its reference draws a different number of objects than the prompt asks
for (docs/conditioning.md, fourteenth round), autoguidance's does not. ``--cfg S`` adds classifier-free
guidance at scale ``S`` on top: ``D(c) + (S - 1)(D(c) - D(empty)) + (w - 1)(D(c) - D_guide(c))``.

GUIDE is a pipeline folder of the same latent space (the same autoencoder): e.g. a short stage-2 run on
MODEL's autoencoder (``model.vae.pretrained=MODEL/vae``). Each ``--guidance`` scale runs the whole suite
(``latentdiff eval``'s settings: 4 images per prompt, 25 DPM-Solver++ steps, seed 0) and writes
``OUT/results-gW.json``; a table row per scale is printed.

Written here because Diffusers' ``AutoGuidance`` guider makes its weaker model by dropping layers of the same
transformer, and drives the modular pipelines only; this one runs a second, separately trained model inside
the Stable Diffusion denoising loop that :class:`~latentdiff.pipelines.LatentPipeline` inherits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

TASKS = ("single_object", "color", "shape", "position", "counting", "two_objects", "relation", "color_binding")


def _sample(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


@contextlib.contextmanager
def autoguided(pipeline, guide, cfg: float | None = None):
    """Within this context, ``pipeline``'s guided calls (``guidance_scale > 1``) use autoguidance with ``guide``.

    The Stable Diffusion loop runs the U-Net on a batch of two halves, [reference; prompt], and combines them as
    ``ref + w (cond - ref)``. Here the reference half is ``guide``'s U-Net on ``guide``'s own embedding of the
    prompt (``encode_prompt`` returns it as the "negative" embedding). With ``cfg``, the U-Net call computes the
    combined prediction itself and returns it in both halves, which the loop's combination leaves unchanged.
    """
    own_encode, own_forward = pipeline.__dict__.get("encode_prompt"), pipeline.unet.__dict__.get("forward")
    encode, forward = pipeline.encode_prompt, pipeline.unet.forward
    guide_unet = forward if guide.unet is pipeline.unet else guide.unet  # not the patched forward below
    guided = {"on": False, "empty": None}

    def encode_prompt(prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None,
                      prompt_embeds=None, negative_prompt_embeds=None, lora_scale=None, clip_skip=None):
        embeds, negative = encode(prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
                                  prompt_embeds, negative_prompt_embeds, lora_scale=lora_scale, clip_skip=clip_skip)
        guided.update(on=do_classifier_free_guidance, empty=negative)
        if do_classifier_free_guidance:  # the class's method: `guide` may be `pipeline` itself, patched here
            negative, _ = type(guide).encode_prompt(guide, prompt, device, num_images_per_prompt, False)
        return embeds, negative

    def unet_forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
        if not guided["on"]:
            return forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        half = sample.shape[0] // 2
        steps = torch.as_tensor(timestep)
        steps_ref, steps_cond = (steps, steps) if steps.ndim == 0 else (steps[:half], steps[half:])
        reference = _sample(guide_unet(sample[:half], steps_ref, encoder_hidden_states[:half], *args, **kwargs))
        conditional = _sample(forward(sample[half:], steps_cond, encoder_hidden_states[half:], *args, **kwargs))
        if cfg is None:
            return (torch.cat([reference, conditional]),)
        unconditional = _sample(forward(sample[half:], steps_cond, guided["empty"], *args, **kwargs))
        scale = pipeline.guidance_scale
        combined = conditional + (cfg - 1) * (conditional - unconditional) + (scale - 1) * (conditional - reference)
        return (torch.cat([combined, combined]),)

    pipeline.encode_prompt, pipeline.unet.forward = encode_prompt, unet_forward
    try:
        yield pipeline
    finally:
        for owner, name, own in ((pipeline, "encode_prompt", own_encode), (pipeline.unet, "forward", own_forward)):
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)


def same_autoencoder(pipeline, guide) -> bool:
    """Whether both pipelines decode the same latent space: both pixel-space, or autoencoders with equal weights."""
    if pipeline.vae is None or guide.vae is None:
        return pipeline.vae is None and guide.vae is None
    mine, theirs = pipeline.vae.state_dict(), guide.vae.state_dict()
    return mine.keys() == theirs.keys() and all(torch.equal(mine[key], theirs[key]) for key in mine)


def main() -> None:
    from latentdiff.eval.adherence import evaluate_adherence, model_holdout
    from latentdiff.eval.suite import shapes_suite
    from latentdiff.pipelines import LatentPipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the pipeline folder to sample")
    parser.add_argument("guide", help="the weaker model's pipeline folder (same autoencoder)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[2.5], help="autoguidance scales w (> 1)")
    parser.add_argument("--cfg", type=float, default=None, help="classifier-free guidance on top, at this scale")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--out", default=None, help="default: MODEL/autoguidance")
    args = parser.parse_args()
    if any(scale <= 1 for scale in args.guidance):
        raise SystemExit(f"--guidance: every scale has to be above 1 (1 is the model alone), got {args.guidance}")
    out = args.out or os.path.join(args.model, "autoguidance")
    os.makedirs(out, exist_ok=True)
    pipeline, guide = LatentPipeline.from_pretrained(args.model), LatentPipeline.from_pretrained(args.guide)
    if not same_autoencoder(pipeline, guide):
        raise SystemExit(f"{args.guide} has another autoencoder than {args.model}: a guide has to share its latent "
                         "space (train it with model.vae.pretrained=MODEL/vae)")
    suite = shapes_suite(model_holdout(args.model)[0])
    print("| guidance | " + " | ".join(TASKS) + " | overall | unseen |")
    print("|---|" + "---|" * (len(TASKS) + 2))
    with autoguided(pipeline, guide, args.cfg):
        for scale in args.guidance:
            results = evaluate_adherence(pipeline, suite, images_per_prompt=args.images_per_prompt, steps=25,
                                         scheduler="dpm", guidance=scale, seed=0).to_json()
            results["autoguidance"] = {"guide": os.path.abspath(args.guide), "scale": scale, "cfg": args.cfg}
            with open(os.path.join(out, f"results-g{scale:g}.json"), "w", encoding="utf-8") as file:
                json.dump(results, file, indent=1)
            cells = [f"{results['tasks'][task]['accuracy']:.2f}" for task in TASKS]
            label = f"autoguidance {scale:g}" + (f" + CFG {args.cfg:g}" if args.cfg else "")
            print(f"| {label} | " + " | ".join(cells) + f" | {results['overall']:.3f} | {results['unseen']:.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The caption gap of a trained pipeline, by noise level (docs/conditioning.md).

    python bench/caption_gap.py runs/shapes/pipeline [--images 256] [--json out.json]

On ``--images`` fresh shapes scenes (a seed never used for training) with their full descriptions,
the error of the U-Net's ``x_0`` estimate with the true, the empty and a shuffled caption, in four
bands of ``t`` (:func:`latentdiff.diffusion.caption_gap`), with the pipeline's own (EMA) weights. A
model that reads its text has true < empty < shuffled; the top bands are where the layout is decided.
"""
import argparse
import json
import os
import sys

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a pipeline folder")
    parser.add_argument("--images", type=int, default=256, help="held images (a multiple of 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()

    from common import held_scenes
    from latentdiff.pipelines import LatentPipeline
    from latentdiff.trainer.encoding import tokenize
    from latentdiff.trainer.probes import CaptionGapProbe

    model_index = os.path.join(args.model, "model_index.json")
    if not os.path.isfile(model_index):
        parser.error(f"{args.model!r} is not a pipeline folder (no model_index.json); expected e.g. runs/shapes/pipeline")
    with open(model_index, encoding="utf-8") as file:
        if json.load(file).get("text_encoder", [None])[0] == "oracle_text_encoder":  # bench/ablation.py --oracle
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import oracle_text_encoder  # noqa: F401
    pipeline = LatentPipeline.from_pretrained(args.model)
    scheduler, latents, captions = held_scenes(pipeline, args.model, args.images)

    def encode_text(texts):
        return pipeline.text_encoder(tokenize(pipeline.tokenizer, texts))[0]

    probe = CaptionGapProbe(latents, captions, encode_text, seed=args.seed)
    gap = probe.measure(lambda x, t, c: pipeline.unet(x, t, c).sample, scheduler, step=0)
    print("x0 error with the true / empty / shuffled caption:", gap.summary())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"images": args.images, **probe.history[-1]}, file, indent=1)


if __name__ == "__main__":
    sys.exit(main())

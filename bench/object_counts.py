#!/usr/bin/env python
"""How many objects a shapes model draws for a caption, counted by the eval suite's judge (docs/conditioning.md).

    python bench/object_counts.py runs/shapes-patient/pipeline [--captions "" "a triangle"] [--images 64] [--guidance 1]
        [--negative-prompt "three shapes"]

Classifier-free guidance extrapolates from its reference caption (the empty one, or the model's negative
prompt) past the prompt: where the two ask for different numbers of objects, guidance moves the count
too. This prints the distribution of the judge's object count per caption (at guidance 1 by default: the
conditional model alone), so the count each caption asks of the model can be set beside its reference's;
``--negative-prompt`` sets the reference (default: the model's own, else the empty caption).
"""

from __future__ import annotations

import argparse
import collections
import sys

DEFAULT_CAPTIONS = ("", "a shape", "a triangle", "three red squares")


def object_counts(model: str, captions: list[str], images: int, guidance: float, steps: int = 25,
                  scheduler: str = "dpm", seed: int = 0, negative_prompt: str | None = None) -> dict[str, collections.Counter]:
    """``{caption: Counter(objects per image)}`` over ``images`` images per caption."""
    from latentdiff.eval.adherence import generate_images
    from latentdiff.eval.judge import judge_image
    from latentdiff.pipelines import LatentPipeline

    pipeline = LatentPipeline.from_pretrained(model)
    counts = {}
    for caption in captions:
        drawn = generate_images(pipeline, [caption] * images, steps=steps, scheduler=scheduler, guidance=guidance,
                                seed=seed, negative_prompt=negative_prompt, progress=False)
        counts[caption] = collections.Counter(len(judge_image(image).objects) for image in drawn)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="pipeline folder")
    parser.add_argument("--captions", nargs="+", default=list(DEFAULT_CAPTIONS), help="captions to count for")
    parser.add_argument("--images", type=int, default=64, help="images per caption (default %(default)s)")
    parser.add_argument("--guidance", type=float, default=1.0, help="guidance scale (default %(default)s: none)")
    parser.add_argument("--negative-prompt", default=None,
                        help="the reference of guidance (default: the model's own, else the empty caption)")
    args = parser.parse_args()
    print("| caption | images with 0 / 1 / 2 / 3 / 4+ objects | mean |")
    print("|---|---|---|")
    for caption, counts in object_counts(args.model, args.captions, args.images, args.guidance,
                                          negative_prompt=args.negative_prompt).items():
        bins = [counts[n] for n in range(4)] + [sum(v for k, v in counts.items() if k >= 4)]
        mean = sum(k * v for k, v in counts.items()) / args.images
        print(f"| {caption!r} | {' / '.join(map(str, bins))} | {mean:.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())

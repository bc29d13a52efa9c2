#!/usr/bin/env python
"""How well a contrastive text stage tells a caption from its hard negatives, by kind (docs/conditioning.md).

    python bench/hard_negative_probe.py runs/shapes-patient [MORE_OUTPUT_DIRS ...] [--samples 512]

``training/train_text.py`` trains a text encoder with CLIP's objective against a small vision tower and
keeps its last checkpoints under ``OUTPUT_DIR/text_stage/checkpoints``. This loads the newest of them (text
and vision towers together) and, on ``--samples`` fresh shapes scenes (not the training ones), asks of each
caption and each of its hard negatives (:func:`latentdiff.data.shapes.hard_negative_captions`) whether the
image scores its true caption higher. The shares are printed by kind of negative:

- ``row`` / ``column``: one object moved to another place in the same column / row of the grid;
- ``row+column``: moved to a place that differs in both;
- ``relation``: a relation flipped ("to the left of" -> "to the right of", "above" -> "below");
- ``binding``: two objects' colors swapped;
- ``count``: "two" and "three" exchanged ("two blue circles" -> "three blue circles"), a negative the
  stage is not trained with (``text_train.hard_negatives`` changes places and bindings only);
- ``color`` (the control): one color word replaced by another, a difference in-batch negatives do show, so
  a stage that learned anything reads it.

Chance is 0.5. CLIP's in-batch negatives rarely differ from a caption in one of these alone (Yuksekgonul et
al. 2023, "When and why vision-language models behave like bags-of-words"), so a stage can retrieve the
right image from a batch and still read none of them.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

KINDS = ("row", "column", "row+column", "relation", "binding", "count", "color")


def color_changed(caption: str, rng: random.Random) -> str | None:
    """The control negative: the caption's first color word replaced by another color (None: no color word)."""
    from latentdiff.data.shapes import COLORS, _article

    words = caption.split(" ")
    colored = [i for i, word in enumerate(words) if word in COLORS]
    if not colored:
        return None
    i = colored[0]
    words[i] = rng.choice([color for color in COLORS if color != words[i]])
    if i and words[i - 1] in ("a", "an"):
        words[i - 1] = _article(words[i])
    return " ".join(words)


def count_changed(caption: str) -> str | None:
    """The caption with its first count word exchanged, "two" <-> "three" (None: it names no count of two or more)."""
    from latentdiff.data.shapes import NUMBER_WORDS

    exchanged = {NUMBER_WORDS[2]: NUMBER_WORDS[3], NUMBER_WORDS[3]: NUMBER_WORDS[2]}
    words = caption.split(" ")
    counted = [i for i, word in enumerate(words) if word in exchanged]
    if not counted:
        return None
    words[counted[0]] = exchanged[words[counted[0]]]
    return " ".join(words)


def negative_kind(caption: str, kind: str, negative: str) -> str:
    """``binding``, or for a place negative which of the grid's coordinates it changed (or ``relation``)."""
    from latentdiff.data.shapes import POSITION_PATTERN, POSITIONS

    if kind in ("binding", "count", "color"):
        return kind
    before = [match.group(0) for match in POSITION_PATTERN.finditer(caption)]
    after = [match.group(0) for match in POSITION_PATTERN.finditer(negative)]
    if not before:
        return "relation"
    (old, new), = [(a, b) for a, b in zip(before, after) if a != b]
    (row, col), (new_row, new_col) = POSITIONS[old], POSITIONS[new]
    return "column" if row == new_row else "row" if col == new_col else "row+column"


def latest_checkpoint(output_dir: str) -> str:
    checkpoints = glob.glob(os.path.join(output_dir, "text_stage", "checkpoints", "checkpoint-*"))
    if not checkpoints:
        raise FileNotFoundError(f"no text stage checkpoint under {output_dir!r}: run training/train_text.py first")
    return max(checkpoints, key=lambda path: int(path.rsplit("-", 1)[1]))


@torch.no_grad()
def probe(output_dir: str, samples: int, seed: int) -> dict[str, tuple[float, int]]:
    """``{kind: (share of negatives scored below the true caption, number of negatives)}``."""
    from latentdiff.config import load_config
    from latentdiff.data.loading import shapes_scene_options
    from latentdiff.data.shapes import hard_negative_captions, make_shapes_dataset
    from latentdiff.data.transforms import ImageTransform
    from latentdiff.models import build_text_encoder, build_tokenizer
    from latentdiff.trainer.encoding import tokenize
    from latentdiff.trainer.text_pretraining import build_contrastive_model

    config = load_config(os.path.join(output_dir, "config_text.yaml"))
    train = config.text_train
    image_size = train.image_encoder_resolution or config.data.resolution
    model = build_contrastive_model(build_text_encoder(config.model), train, image_size).eval()
    model.load_state_dict(load_file(os.path.join(latest_checkpoint(output_dir), "model.safetensors")))
    tokenizer = build_tokenizer(config.model)
    scenes = make_shapes_dataset(samples, seed=seed, image_size=config.data.resolution, progress_bar=False,
                                 **shapes_scene_options(config.data.shapes))
    transform, rng = ImageTransform(config.data.resolution), random.Random(seed)
    told: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for row in scenes:
        pixels = F.adaptive_avg_pool2d(transform(row["image"])[None], image_size)
        image = F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
        for caption in row["captions"]:
            negatives = hard_negative_captions(caption, rng)
            if counted := count_changed(caption):
                negatives["count"] = counted
            if control := color_changed(caption, rng):
                negatives["color"] = control
            if not negatives:
                continue
            ids = tokenize(tokenizer, [caption, *negatives.values()])
            texts = F.normalize(model.text_projection(model.text_model(input_ids=ids).pooler_output), dim=-1)
            scores = (texts @ image[0]).tolist()
            for (kind, negative), score in zip(negatives.items(), scores[1:]):
                told[negative_kind(caption, kind, negative)].append(float(scores[0] > score))
    return {kind: (sum(values) / len(values) if values else float("nan"), len(values)) for kind, values in told.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dirs", nargs="+", help="output_dir of training/train_text.py runs")
    parser.add_argument("--samples", type=int, default=512, help="fresh shapes scenes to probe on")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the fresh scenes (not a training seed)")
    args = parser.parse_args()
    for output_dir in args.output_dirs:
        try:
            shares = probe(output_dir, args.samples, args.seed)
        except FileNotFoundError as error:
            sys.exit(f"hard_negative_probe.py: error: {error}")
        print(output_dir, " | ".join(f"{kind} {share:.2f} (n={count})" for kind, (share, count) in shares.items()))


if __name__ == "__main__":
    main()

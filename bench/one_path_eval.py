#!/usr/bin/env python
"""What each of a two-path text encoder's paths carries alone: the shapes suite with one path zeroed at inference.

    python bench/one_path_eval.py MODEL/pipeline --keep words    # the layer's states zeroed
    python bench/one_path_eval.py MODEL/pipeline --keep states   # the word embeddings zeroed

For a pipeline whose text encoder is :class:`latentdiff.CLIPTextModelWithWordEmbeddings`
(``model.text_encoder.word_embeddings_in_context``, with a layer: the patient preset until the forty-sixth round). A path that carries an attribute by itself keeps
that task's accuracy; a model trained with ``word_path_dropout`` has seen each path alone in training,
one without it has not (its one-path scores are out of distribution). Writes ``OUT/results.json`` and
``OUT/grid.png`` as ``latentdiff eval`` does (docs/conditioning.md, twelfth round).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def one_path(keep: str):
    """Within the block, every ``CLIPTextModelWithWordEmbeddings`` zeroes the path other than ``keep`` (``"words"`` or
    ``"states"``). Written here: the class has no inference-time switch for one path (path dropout is random and
    training-only)."""
    from latentdiff import CLIPTextModelWithWordEmbeddings

    if keep not in ("words", "states"):
        raise ValueError(f"keep is {keep!r}; expected 'words' or 'states'")
    join = CLIPTextModelWithWordEmbeddings._join

    def join_one_path(self, words: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return join(self, words if keep == "words" else torch.zeros_like(words),
                    states if keep == "states" else torch.zeros_like(states))  # fmt: skip

    CLIPTextModelWithWordEmbeddings._join = join_one_path
    try:
        yield
    finally:
        CLIPTextModelWithWordEmbeddings._join = join


def check_model(model: str) -> None:
    """Fail unless ``model`` is a pipeline folder whose text encoder has the two paths."""
    index, text_encoder = os.path.join(model, "model_index.json"), None
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as file:
            text_encoder = json.load(file).get("text_encoder")
    if text_encoder != ["latentdiff", "CLIPTextModelWithWordEmbeddings"]:
        raise SystemExit(f"{model}: expected a pipeline folder whose text encoder is latentdiff's "
                         f"CLIPTextModelWithWordEmbeddings (model_index.json), found {text_encoder}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a pipeline folder with a CLIPTextModelWithWordEmbeddings text encoder")
    parser.add_argument("--keep", choices=("words", "states"), required=True, help="the path left as it is")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--out", default=None, help="default: MODEL/eval-<keep>-only")
    args = parser.parse_args()
    check_model(args.model)

    from latentdiff.eval.adherence import evaluate_model

    out = args.out or os.path.join(args.model, f"eval-{args.keep}-only")
    with one_path(args.keep):
        results, paths = evaluate_model(args.model, out, images_per_prompt=args.images_per_prompt, steps=25, scheduler="dpm")
    print(f"{args.keep} only: overall {results.overall:.3f}; wrote {paths['results']} and {paths['grid']}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""What a trained text encoder's token mixing carries into each word (docs/conditioning.md, fortieth round).

    python bench/token_mixing_probe.py runs/ablation/NAME/pipeline [MORE_PIPELINES ...]

``model.text_encoder.token_mixing_width`` adds to each token's embedding a causal convolution over it and the tokens
before it (:mod:`latentdiff.models.token_mixing`). For each pipeline this prints, on the built-in data's vocabulary:

- ``mixing / embedding`` by kind of word (color, shape, place, count, other): the norm of what the mixing adds to a
  token over the norm of the token's own embedding, on the captions of 512 fresh scenes. 0 for an encoder without
  mixing.
- ``color in the noun``: over "a C S" for every color C and shape S, how far the noun's state moves when its color
  changes, as a share of how far it moves when its shape changes (mean distances between the states at S's
  position, after the final layer norm). 0 without mixing: the noun's state then does not depend on the words before it.
- ``shape in the place word``: the same for the place word of "a red S at the top": how far "top" moves when the
  shape changes, as a share of how far it moves when "top" becomes "bottom". Mixing that reaches from a place word
  back to the noun makes each place a different token for each shape.
- ``row in the column word``: the same for the second place word of "a red circle at the T C" (T top or bottom, C left
  or right): how far "left" moves when "top" becomes "bottom", as a share of how far it moves when it becomes "right".
  Width 2 reaches from the column word back to the row word, so each column is then a different token for each row.
- ``gate``, for a gated mixing (``token_mixing_gated``): the mean share of its mix each kind of word takes.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentdiff.data.shapes import COLORS, SHAPES, make_shapes_dataset  # noqa: E402

PLACES = ("top", "bottom", "left", "right", "center")
COUNTS = ("two", "three")


def load(pipeline: str):
    import latentdiff  # noqa: F401  (registers the custom text encoder classes with Diffusers)
    from transformers import CLIPTokenizer

    from latentdiff.models.bidirectional import BidirectionalCLIPTextModel

    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    encoder = BidirectionalCLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder").eval()
    return tokenizer, encoder


def kind(word: str) -> str:
    word = word.removesuffix("</w>")
    if word in COLORS:
        return "color"
    if word in SHAPES or word.removesuffix("s") in SHAPES:
        return "shape"
    if word in PLACES:
        return "place"
    if word in COUNTS:
        return "count"
    return "other"


@torch.no_grad()
def mean_by_kind(tokenizer, encoder, captions: list[str], per_token) -> dict[str, float]:
    """The mean of ``per_token(unmixed)[position]`` over the tokens of ``captions``, by kind of word; ``unmixed`` is a
    caption's word + position embeddings before any mixing (``[1, tokens, features]``)."""
    from transformers.models.clip.modeling_clip import CLIPTextEmbeddings

    embeddings = encoder._text_model().embeddings
    totals: dict[str, list[float]] = {}
    for caption in captions:
        ids = tokenizer(caption, return_tensors="pt").input_ids
        values = per_token(CLIPTextEmbeddings.forward(embeddings, input_ids=ids))
        for position, token in enumerate(tokenizer.convert_ids_to_tokens(ids[0])):
            totals.setdefault(kind(token), []).append(values[position].item())
    return {name: sum(values) / len(values) for name, values in sorted(totals.items())}


def mixing_by_kind(tokenizer, encoder, captions: list[str]) -> dict[str, float]:
    """What the mixing adds to each token over the token's own embedding (norms), by kind of word; 0 without mixing."""
    mixing = getattr(encoder._text_model().embeddings, "token_mixing", None)

    def ratio(unmixed: torch.Tensor) -> torch.Tensor:
        added = mixing(unmixed) if mixing is not None else torch.zeros_like(unmixed)
        return (added.norm(dim=-1) / unmixed.norm(dim=-1))[0]

    return mean_by_kind(tokenizer, encoder, captions, ratio)


def gates_by_kind(tokenizer, encoder, captions: list[str]) -> dict[str, float] | None:
    """The mean gate of each kind of word over ``captions``; None for an ungated (or no) mixing."""
    mixing = getattr(encoder._text_model().embeddings, "token_mixing", None)
    if mixing is None or mixing.gate is None:
        return None
    return mean_by_kind(tokenizer, encoder, captions, lambda unmixed: mixing.gates(unmixed)[0])


@torch.no_grad()
def state_at(tokenizer, encoder, caption: str, word: str) -> torch.Tensor:
    ids = tokenizer(caption, return_tensors="pt").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids[0])
    position = tokens.index(word + "</w>")
    return encoder(ids).last_hidden_state[0, position, : encoder.config.hidden_size]  # the mixed path


def mean_distance(pairs) -> float:
    distances = [(a - b).norm().item() for a, b in pairs]
    return sum(distances) / len(distances)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipelines", nargs="+")
    parser.add_argument("--scenes", type=int, default=512)
    args = parser.parse_args()
    captions = [caption for row in make_shapes_dataset(num_samples=args.scenes, seed=12345) for caption in row["captions"]]
    for pipeline in args.pipelines:
        tokenizer, encoder = load(pipeline)
        print(f"{pipeline}: token_mixing_width {getattr(encoder.config, 'token_mixing_width', 0)}")
        by_kind = mixing_by_kind(tokenizer, encoder, captions)
        print("  mixing / embedding: " + ", ".join(f"{name} {value:.3f}" for name, value in by_kind.items()))
        color_moves, shape_moves = color_in_the_noun(tokenizer, encoder)
        print(f"  color in the noun: {color_moves / shape_moves:.3f} (color change {color_moves:.3f}, shape change {shape_moves:.3f})")
        shape_moves, place_moves = shape_in_the_place_word(tokenizer, encoder)
        print(f"  shape in the place word: {shape_moves / place_moves:.3f} (shape change {shape_moves:.3f}, place change {place_moves:.3f})")
        row_moves, column_moves = row_in_the_column_word(tokenizer, encoder)
        print(f"  row in the column word: {row_moves / column_moves:.3f} (row change {row_moves:.3f}, column change {column_moves:.3f})")
        gates = gates_by_kind(tokenizer, encoder, captions)
        if gates is not None:
            print("  gate: " + ", ".join(f"{name} {value:.3f}" for name, value in gates.items()))


def color_in_the_noun(tokenizer, encoder) -> tuple[float, float]:
    """Mean distances between the states of S in "a C S": for two colors C (same S), and for two shapes S (same C)."""
    noun = {(c, s): state_at(tokenizer, encoder, f"a {c} {s}", s) for c in COLORS for s in SHAPES}
    color_moves = mean_distance((noun[c1, s], noun[c2, s]) for s in SHAPES for c1, c2 in itertools.combinations(COLORS, 2))
    shape_moves = mean_distance((noun[c, s1], noun[c, s2]) for c in COLORS for s1, s2 in itertools.combinations(SHAPES, 2))
    return color_moves, shape_moves


def shape_in_the_place_word(tokenizer, encoder) -> tuple[float, float]:
    """Mean distances between the states of P in "a red S at the P": for two shapes S (same P), and for top/bottom."""
    place = {(s, p): state_at(tokenizer, encoder, f"a red {s} at the {p}", p) for s in SHAPES for p in ("top", "bottom")}
    shape_moves = mean_distance((place[s1, p], place[s2, p]) for p in ("top", "bottom") for s1, s2 in itertools.combinations(SHAPES, 2))
    place_moves = mean_distance((place[s, "top"], place[s, "bottom"]) for s in SHAPES)
    return shape_moves, place_moves


def row_in_the_column_word(tokenizer, encoder) -> tuple[float, float]:
    """Mean distances between the states of C in "a red circle at the T C": for top/bottom (same C), and for left/right
    (same T)."""
    column = {(t, c): state_at(tokenizer, encoder, f"a red circle at the {t} {c}", c)
              for t in ("top", "bottom") for c in ("left", "right")}
    row_moves = mean_distance((column["top", c], column["bottom", c]) for c in ("left", "right"))
    column_moves = mean_distance((column[t, "left"], column[t, "right"]) for t in ("top", "bottom"))
    return row_moves, column_moves


if __name__ == "__main__":
    main()

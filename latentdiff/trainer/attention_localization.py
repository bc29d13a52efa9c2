"""Token-level supervision of the U-Net's cross-attention with the objects' places, for data that knows them (the
built-in shapes: every object's cell, offset and size).

Why: on the shapes default the two nouns of "a red square and a green circle" attend to nearly the same pixels
at every noise level (the overlap of their normalized maps is 0.80-0.85 in passed and failed images alike;
docs/conditioning.md, forty-third round): the cross-attention carries the words everywhere and leaves it to the
convolutions to decide which object gets which. This loss asks each object's words (its noun and the modifiers
before it) to put their attention on that object's pixels, so that each region reads its own words.

Wang et al. 2024, "TokenCompose: Text-to-Image Diffusion with Token-level Supervision" (Sec. 3.2, the token
loss): ``L_token = mean over the caption's object tokens of (1 - sum_{p in mask} A(p) / sum_p A(p))^2``, with
``A`` a token's cross-attention probabilities over the pixels of a layer, added to the denoising loss with a
weight. Written here because neither Diffusers nor its training examples have it: the masks come from the
scene records of the shapes data, matched to the caption's words by their attributes.

The same paper's pixel loss (Sec. 3.2, the grounding objective's second term) asks the other way round: each pixel of
an object should attend to that object's words, the pixels outside it should not, ``L_pixel = BCE(sum over the
phrase's tokens of A(p), M(p))``, with the maps of a grid's layers averaged first (:func:`localization_pixel_loss`).
The token loss alone is met by a word that attends to a corner of its object, or by an object whose pixels read
other words; the pixel loss asks every pixel of the object to read its words.

Not in the paper: with ``ObjectTokens(..., background=True)`` (``train.attention_localization_background``) the
background phrase ("white background") is supervised too, its words asked to attend outside every object's box
(:func:`background_mask`). Why: the shapes default's shape prompts that name the background ("a circle on a white
background") drew an empty background in 22 of 144 images, those that do not ("a circle") in 1 of 48
(docs/conditioning.md, forty-ninth round).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..data.shapes import BACKGROUNDS, COLORS, GRID, SHAPES, SIZE_FRACTIONS, SIZES
from ..pipelines.attention_binding import object_token_groups, word_token_ids

__all__ = [
    "ObjectTokens", "caption_object_tokens", "caption_background_tokens", "object_masks", "background_mask",
    "localization_loss", "localization_pixel_loss",
]

_PLURAL = {shape + "s": shape for shape in SHAPES}


class ObjectTokens:
    """The token ids of the shapes vocabulary's nouns (singular and plural) and modifiers (colors, sizes), each word
    as the tokenizer reads it inside a caption (CLIP splits "triangles" in two); and, for :func:`localization_loss`,
    each (caption, scene)'s noun phrases with their objects' masks, cached.

    Why a cache: the data repeats its (caption, scene) pairs every epoch (10,000 scenes, three captions each on the
    default), and tokenizing 64 captions, matching their words and drawing their masks in Python cost a stage-2 step
    30-55 ms on 2 cores, 1.4-3 ms once cached (``bench/stage2_step_cost.py``; docs/conditioning.md, forty-fourth
    round). At most ``max_cached`` pairs are kept (the oldest dropped first), a few kilobytes each."""

    def __init__(self, tokenizer, max_cached: int = 100_000, background: bool = False):
        self.tokenizer = tokenizer
        self.nouns = word_token_ids(tokenizer, (*SHAPES, *_PLURAL))
        self.modifiers = word_token_ids(tokenizer, (*COLORS, *SIZES))
        self.background = background
        """Also supervise the background phrase ("white background"): its words asked to attend outside every
        object (:func:`caption_background_tokens`, :func:`background_mask`)."""
        self.background_nouns = word_token_ids(tokenizer, ("background",))
        self.background_colors = word_token_ids(tokenizer, BACKGROUNDS)
        self.max_cached = max_cached
        self._phrase_masks: dict[tuple, list[tuple[list[int], dict[int, torch.Tensor]]]] = {}

    def phrase_masks(
        self, caption: str, objects: Sequence[Mapping[str, Any]], sides: Sequence[int]
    ) -> list[tuple[list[int], dict[int, torch.Tensor]]]:
        """``(token positions, {side: mask})`` for each noun phrase of ``caption`` that names objects of the scene
        (:func:`caption_object_tokens`), with the named objects' mask on each ``side`` x ``side`` grid
        (:func:`object_masks`); cached per (caption, scene, sides)."""
        key = (caption, tuple(tuple(sorted(obj.items())) for obj in objects), tuple(sides))
        phrases = self._phrase_masks.get(key)
        if phrases is None:
            phrases = [
                (positions, {side: object_masks(objects, named, side) for side in sides})
                for positions, named in caption_object_tokens(caption, objects, self)
            ]
            if self.background:
                phrases += [
                    (positions, {side: background_mask(objects, side) for side in sides})
                    for positions in caption_background_tokens(caption, self)
                ]
            if len(self._phrase_masks) >= self.max_cached:
                del self._phrase_masks[next(iter(self._phrase_masks))]
            self._phrase_masks[key] = phrases
        return phrases


def caption_object_tokens(
    caption: str, objects: Sequence[Mapping[str, Any]], vocabulary: ObjectTokens
) -> list[tuple[list[int], list[int]]]:
    """``(token positions, indices of the objects they name)`` for each noun phrase of ``caption`` that names at
    least one object of the scene: a phrase names the objects whose shape is its noun's and whose color and size
    are those of its modifiers, where it has any ("two small blue circles": every small blue circle)."""
    tokenizer = vocabulary.tokenizer
    ids = tokenizer(caption, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    words = {**vocabulary.nouns, **vocabulary.modifiers}
    phrases = []
    for modifiers, noun in object_token_groups(ids, vocabulary.nouns, vocabulary.modifiers):
        shape = vocabulary.nouns[tuple(ids[p] for p in noun)]
        shape = _PLURAL.get(shape, shape)
        wanted = {words[(ids[m],)] for m in modifiers if (ids[m],) in words}
        named = [
            k for k, obj in enumerate(objects)
            if obj["shape"] == shape and all(w in (obj["color"], obj["size"]) for w in wanted)
        ]
        if named:
            phrases.append(([*modifiers, *noun], named))
    return phrases


def caption_background_tokens(caption: str, vocabulary: ObjectTokens) -> list[list[int]]:
    """The token positions of each background phrase of ``caption``: the word "background" and the background color
    right before it ("on a white background": white, background)."""
    tokenizer = vocabulary.tokenizer
    ids = tokenizer(caption, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    return [
        [*modifiers, *noun]
        for modifiers, noun in object_token_groups(ids, vocabulary.background_nouns, vocabulary.background_colors)
    ]


def _coverage(low: float, high: float, side: int) -> torch.Tensor:
    """The share of each of ``side`` equal cells of [0, 1] that the interval [low, high] covers."""
    edges = torch.arange(side + 1, dtype=torch.float32) / side
    return ((torch.minimum(edges[1:], torch.tensor(high)) - torch.maximum(edges[:-1], torch.tensor(low))).clamp_min(0)
            * side)


def _box_cover(objects: Sequence[Mapping[str, Any]], indices: Sequence[int], side: int) -> torch.Tensor:
    """The share of each pixel of a ``side`` x ``side`` grid that the named objects' bounding boxes cover (the
    largest where boxes overlap)."""
    mask = torch.zeros(side, side)
    for k in indices:
        obj = objects[k]
        half = SIZE_FRACTIONS[obj["size"]] / 2
        center_x, center_y = obj["col"] + 0.5 + obj.get("dx", 0.0), obj["row"] + 0.5 + obj.get("dy", 0.0)
        columns = _coverage((center_x - half) / GRID, (center_x + half) / GRID, side)
        rows = _coverage((center_y - half) / GRID, (center_y + half) / GRID, side)
        mask = torch.maximum(mask, rows[:, None] * columns[None, :])
    return mask


def object_masks(objects: Sequence[Mapping[str, Any]], indices: Sequence[int], side: int) -> torch.Tensor:
    """The pixels of a ``side`` x ``side`` grid that the named objects' bounding boxes cover, as the share of each
    pixel covered (flattened, ``side * side``), scaled so that the most covered pixel is 1: an object smaller than
    a pixel of a coarse grid still marks its pixel."""
    mask = _box_cover(objects, indices, side)
    return (mask / mask.max().clamp_min(1e-8)).flatten()


def background_mask(objects: Sequence[Mapping[str, Any]], side: int) -> torch.Tensor:
    """The pixels of a ``side`` x ``side`` grid outside every object's bounding box, as the share of each pixel left
    uncovered (flattened, ``side * side``); at most three of the nine cells hold an object, so some pixel is 1."""
    return (1 - _box_cover(objects, range(len(objects)), side)).flatten()


def _named_phrases(captions, scenes, vocabulary: ObjectTokens, sides) -> list[tuple[int, list[int], dict]]:
    """``(image, token positions, {side: mask})`` for every noun phrase of the batch that names objects of its image's
    scene, and every background phrase if ``vocabulary.background`` (an empty caption or no scene: none): the
    supervised pairs of both losses."""
    return [
        (image, positions, masks)
        for image, (caption, objects) in enumerate(zip(captions, scenes))
        if caption and objects
        for positions, masks in vocabulary.phrase_masks(caption, objects, sides)
    ]


def localization_loss(
    maps: Sequence[torch.Tensor],
    captions: Sequence[str],
    scenes: Sequence[Sequence[Mapping[str, Any]] | None],
    vocabulary: ObjectTokens,
) -> torch.Tensor:
    """TokenCompose's token loss, averaged over every recorded cross-attention layer (``maps``: ``(batch, pixels,
    tokens)`` each, square grids) and every (image, noun phrase, token) whose phrase names objects of the image's
    scene (``scenes[i]``: its objects; ``None`` or an empty caption: nothing). 0 when no caption names an object."""
    sides = sorted({int(round(layer.shape[1] ** 0.5)) for layer in maps})
    # One row per supervised (image, token): the image, the token's position and its phrase's masks by side.
    rows = [
        (image, position, masks)
        for image, positions, masks in _named_phrases(captions, scenes, vocabulary, sides)
        for position in positions
    ]
    if not maps or not rows:
        return maps[0].new_zeros(()) if maps else torch.zeros(())
    images = torch.tensor([image for image, _, _ in rows])
    positions = torch.tensor([position for _, position, _ in rows])
    terms = []
    targets_by_side: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in maps:
        side = int(round(layer.shape[1] ** 0.5))
        if side not in targets_by_side:  # (batch, tokens, pixels): each supervised token's object mask, else 0
            masks = torch.zeros(layer.shape[0], layer.shape[2], side * side)
            masks[images, positions] = torch.stack([by_side[side] for _, _, by_side in rows])
            weights = torch.zeros(layer.shape[0], layer.shape[2])
            weights[images, positions] = 1.0
            targets_by_side[side] = (masks.to(layer.device, layer.dtype), weights.to(layer.device, layer.dtype))
        masks, weights = targets_by_side[side]
        attention = layer.transpose(1, 2)  # (batch, tokens, pixels)
        inside = (attention * masks).sum(-1) / attention.sum(-1).clamp_min(1e-8)
        terms.append(((1 - inside).pow(2) * weights).sum() / weights.sum())
    return torch.stack(terms).mean()


def localization_pixel_loss(
    maps: Sequence[torch.Tensor],
    captions: Sequence[str],
    scenes: Sequence[Sequence[Mapping[str, Any]] | None],
    vocabulary: ObjectTokens,
) -> torch.Tensor:
    """TokenCompose's pixel loss: on each grid, the recorded layers' maps (``(batch, pixels, tokens)``) averaged, each
    noun phrase's attention summed over its tokens, and the binary cross-entropy of that against its objects' mask
    (the covered share of each pixel, :func:`object_masks`), averaged over the (image, phrase) pairs and the grids.
    The pairs are those of :func:`localization_loss`; 0 when no caption names an object."""
    sides = sorted({int(round(layer.shape[1] ** 0.5)) for layer in maps})
    phrases = _named_phrases(captions, scenes, vocabulary, sides)
    if not maps or not phrases:
        return maps[0].new_zeros(()) if maps else torch.zeros(())
    images = torch.tensor([image for image, _, _ in phrases])
    tokens = torch.zeros(len(phrases), maps[0].shape[2])  # which tokens each phrase sums
    for row, (_, positions, _) in enumerate(phrases):
        tokens[row, positions] = 1.0
    tokens = tokens.to(maps[0].device, maps[0].dtype)
    terms = []
    for side in sides:
        grid = torch.stack([layer for layer in maps if int(round(layer.shape[1] ** 0.5)) == side]).mean(0)
        attention = (grid[images] * tokens[:, None, :]).sum(-1).float().clamp(1e-6, 1 - 1e-6)  # (phrases, pixels)
        masks = torch.stack([by_side[side] for _, _, by_side in phrases]).to(attention.device)
        # The cross-entropy written out in float32: F.binary_cross_entropy refuses to run under CUDA autocast.
        terms.append(-(masks * attention.log() + (1 - masks) * (1 - attention).log()).mean())
    return torch.stack(terms).mean()

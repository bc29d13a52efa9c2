"""The attention localization losses (`latentdiff/trainer/attention_localization.py`, TokenCompose's token and pixel
losses):
the caption's words matched to the scene's objects, the objects' masks on a latent grid, the loss's range, and
stage 2 training with it. Tiny components."""

from __future__ import annotations

import pytest
import torch

from latentdiff.models.tokenizer import clip_tokenizer
from latentdiff.trainer.attention_localization import (
    ObjectTokens,
    background_mask,
    caption_background_tokens,
    caption_object_tokens,
    localization_loss,
    localization_pixel_loss,
    object_masks,
)


def _object(shape, color, size, row, col, dx=0.0, dy=0.0):
    return {"shape": shape, "color": color, "size": size, "row": row, "col": col, "dx": dx, "dy": dy}


OBJECTS = [
    _object("square", "red", "large", 0, 0),
    _object("circle", "blue", "small", 0, 2),
    _object("circle", "blue", "small", 2, 0),
    _object("circle", "blue", "large", 2, 2),
]


@pytest.fixture(scope="module")
def vocabulary():
    return ObjectTokens(clip_tokenizer())


def test_a_phrase_names_the_objects_with_its_shape_and_every_attribute_it_gives(vocabulary):
    phrases = caption_object_tokens("a red square and two small blue circles", OBJECTS, vocabulary)
    assert [named for _, named in phrases] == [[0], [1, 2]]  # not the large blue circle
    ids = vocabulary.tokenizer("a red square and two small blue circles")["input_ids"]
    assert vocabulary.tokenizer.decode([ids[p] for p in phrases[1][0]]).replace("</w>", " ").split() == ["small", "blue", "circles"]
    triangles = caption_object_tokens("two triangles", [_object("triangle", "red", "small", 0, 0)] * 2, vocabulary)
    assert [named for _, named in triangles] == [[0, 1]] and len(triangles[0][0]) == 2  # "triangles" is two tokens
    assert [named for _, named in caption_object_tokens("circles", OBJECTS, vocabulary)] == [[1, 2, 3]]
    assert caption_object_tokens("a green triangle", OBJECTS, vocabulary) == []  # names nothing in the scene


def test_an_object_mask_covers_its_box_on_the_grid():
    large_top_left = object_masks(OBJECTS, [0], 3).view(3, 3)
    assert large_top_left[0, 0] == 1 and large_top_left.sum() == 1  # inside its cell on a grid of cells
    fine = object_masks(OBJECTS, [0], 8).view(8, 8)
    assert fine.max() == 1 and fine[4:].sum() == 0 and fine[:, 4:].sum() == 0
    # a small object off-center still marks the pixel it covers most
    small = object_masks([_object("circle", "red", "small", 1, 1, dx=0.2)], [0], 4).view(4, 4)
    assert small.max() == 1 and small[1:3, 1:3].sum() == small.sum()
    both = object_masks(OBJECTS, [1, 2], 3).view(3, 3)
    assert both[0, 2] == 1 and both[2, 0] == 1 and both.sum() == 2


def test_the_background_phrase_is_its_color_and_noun_and_its_mask_lies_outside_every_object():
    vocabulary = ObjectTokens(clip_tokenizer(), background=True)
    caption = "a red square at the top left on a white background"
    ids = vocabulary.tokenizer(caption)["input_ids"]
    (positions,) = caption_background_tokens(caption, vocabulary)
    assert vocabulary.tokenizer.decode([ids[p] for p in positions]).replace("</w>", " ").split() == ["white", "background"]
    assert caption_background_tokens("a red square", vocabulary) == []
    mask = background_mask(OBJECTS, 3).view(3, 3)  # the four corner cells hold objects, the rest is background
    corners = mask[[0, 0, 2, 2], [0, 2, 0, 2]]
    assert (corners < 0.9).all() and mask[1].eq(1).all() and mask[:, 1].eq(1).all()
    fine = background_mask(OBJECTS[:1], 30).view(30, 30)  # the large square's box, inside the top-left cell
    assert fine[5, 5] < 1e-6 and fine[15:].eq(1).all() and fine[:, 15:].eq(1).all()
    assert background_mask([], 4).eq(1).all()
    # with background=True the phrase joins the supervised ones, with the background's mask; off, it does not
    phrases = vocabulary.phrase_masks(caption, OBJECTS[:1], [3])
    assert [p for p, _ in phrases][-1] == positions and torch.equal(phrases[-1][1][3], background_mask(OBJECTS[:1], 3))
    assert len(ObjectTokens(clip_tokenizer()).phrase_masks(caption, OBJECTS[:1], [3])) == len(phrases) - 1


def _maps(inside_share: float, caption: str, vocabulary, side: int = 3):
    """Maps (1, side*side, tokens) whose "square" and "red" put `inside_share` of their attention on the red
    square's cell (pixel 0) and spread the rest evenly."""
    ids = vocabulary.tokenizer(caption)["input_ids"]
    maps = torch.full((1, side * side, len(ids)), 1.0 / len(ids))
    red, square = (vocabulary.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("red", "square"))
    for position, token in enumerate(ids):
        if token in (red, square):
            column = torch.full((side * side,), (1 - inside_share) / (side * side - 1))
            column[0] = inside_share
            maps[0, :, position] = column
    return maps


def test_the_loss_is_zero_when_the_words_attend_to_their_object_and_grows_as_they_leave(vocabulary):
    caption = "a red square at the top left"
    scene = [OBJECTS[:1]]
    on = localization_loss([_maps(1.0, caption, vocabulary)], [caption], scene, vocabulary)
    spread = localization_loss([_maps(1 / 9, caption, vocabulary)], [caption], scene, vocabulary)
    away = localization_loss([_maps(0.0, caption, vocabulary)], [caption], scene, vocabulary)
    assert on.item() == pytest.approx(0.0, abs=1e-6)
    assert spread.item() == pytest.approx((1 - 1 / 9) ** 2, rel=1e-4)
    assert away.item() == pytest.approx(1.0)
    # a dropped caption, or a scene without objects, adds nothing
    assert localization_loss([_maps(0.0, caption, vocabulary)], [""], scene, vocabulary).item() == 0
    assert localization_loss([_maps(0.0, caption, vocabulary)], [caption], [None], vocabulary).item() == 0


def test_the_loss_reaches_the_attention_weights(vocabulary):
    caption = "a red square"
    logits = torch.zeros(1, 9, len(vocabulary.tokenizer(caption)["input_ids"]), requires_grad=True)
    loss = localization_loss([logits.softmax(-1)], [caption], [OBJECTS[:1]], vocabulary)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_the_loss_over_a_batch_is_the_mean_over_layers_of_every_supervised_tokens_term_and_is_cached():
    vocabulary = ObjectTokens(clip_tokenizer(), max_cached=2)
    captions = ["a red square and two small blue circles", "", "a large blue circle", "a green triangle"]
    scenes = [OBJECTS, OBJECTS, OBJECTS, OBJECTS]
    tokens = max(len(vocabulary.tokenizer(c)["input_ids"]) for c in captions)
    generator = torch.Generator().manual_seed(0)
    maps = [torch.rand(4, side * side, tokens, generator=generator).softmax(-1) for side in (4, 2, 4)]

    def reference():  # the token loss written out token by token (TokenCompose, Sec. 3.2)
        layer_means = []
        for layer in maps:
            side = int(layer.shape[1] ** 0.5)
            terms = [
                (1 - (layer[image, :, p] * object_masks(OBJECTS, named, side)).sum() / layer[image, :, p].sum()) ** 2
                for image, caption in enumerate(captions) if caption
                for positions, named in caption_object_tokens(caption, OBJECTS, vocabulary)
                for p in positions
            ]
            layer_means.append(torch.stack(terms).mean())
        return torch.stack(layer_means).mean()

    first = localization_loss(maps, captions, scenes, vocabulary)
    assert first.item() == pytest.approx(reference().item(), rel=1e-5)
    assert len(vocabulary._phrase_masks) == 2  # three non-empty captions, the oldest dropped
    assert localization_loss(maps, captions, scenes, vocabulary).item() == first.item()


def test_the_pixel_loss_is_least_when_each_objects_pixels_read_its_words(vocabulary):
    """Each phrase's attention summed over its tokens, against its objects' mask: lowest when the object's pixels
    attend to its words alone and the others do not, highest when another object's pixels read them."""
    caption = "a red square and a large blue circle"
    ids = vocabulary.tokenizer(caption)["input_ids"]
    (square, _), (circle, _) = caption_object_tokens(caption, OBJECTS, vocabulary)
    square_mask, circle_mask = object_masks(OBJECTS, [0], 3), object_masks(OBJECTS, [3], 3)
    others = [p for p in range(len(ids)) if p not in square + circle]

    def maps(square_pixels, circle_pixels):  # (1, 9, tokens): each pixel's attention split among one group's tokens
        layer = torch.zeros(1, 9, len(ids))
        for pixel in range(9):
            group = square if square_pixels[pixel] else circle if circle_pixels[pixel] else others
            layer[0, pixel, group] = 1.0 / len(group)
        return layer

    right = localization_pixel_loss([maps(square_mask, circle_mask)], [caption], [OBJECTS], vocabulary)
    swapped = localization_pixel_loss([maps(circle_mask, square_mask)], [caption], [OBJECTS], vocabulary)
    uniform = torch.full((1, 9, len(ids)), 1.0 / len(ids))
    spread = localization_pixel_loss([uniform], [caption], [OBJECTS], vocabulary)
    assert right.item() < 1e-4 < spread.item() < swapped.item()
    # the layers of one grid are averaged before the cross-entropy: two halves of the right maps are the right maps
    halves = [maps(square_mask, circle_mask) * 2 - uniform, uniform]
    assert localization_pixel_loss(halves, [caption], [OBJECTS], vocabulary).item() < 1e-4
    assert localization_pixel_loss([uniform], [""], [OBJECTS], vocabulary).item() == 0

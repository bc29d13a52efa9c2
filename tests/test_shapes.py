"""The built-in captioned shapes: determinism, truthful captions, hold-out, image-folder round trip."""

from __future__ import annotations

import random
import re
from collections import Counter

import datasets
import numpy as np
import pytest

from latentdiff.data.shapes import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    all_scene_captions,
    make_scene,
    make_shapes_dataset,
    render_scene,
    save_as_imagefolder,
    scene_captions,
)


@pytest.fixture(scope="module")
def dataset_seed3() -> datasets.Dataset:
    return make_shapes_dataset(1000, seed=3)


def _image_bytes(dataset: datasets.Dataset) -> list[bytes]:
    return [row["bytes"] for row in dataset.cast_column("image", datasets.Image(decode=False))["image"]]


def test_columns_and_image_format(dataset_seed3):
    assert set(dataset_seed3.column_names) == {"image", "text", "captions", "scene"}
    row = dataset_seed3[0]
    assert row["image"].mode == "RGB" and row["image"].size == (64, 64)
    assert isinstance(row["text"], str) and row["text"] in row["captions"]
    assert len(set(row["captions"])) == len(row["captions"]) >= 3
    assert make_shapes_dataset(2, image_size=48)[1]["image"].size == (48, 48)


def test_same_arguments_same_bytes_and_sample_independent_of_length(dataset_seed3):
    again = make_shapes_dataset(1000, seed=3)
    assert _image_bytes(again) == _image_bytes(dataset_seed3)
    assert again["captions"] == dataset_seed3["captions"]
    assert again["scene"] == dataset_seed3["scene"]

    other_seed = make_shapes_dataset(100, seed=4)
    assert _image_bytes(other_seed) != _image_bytes(dataset_seed3)[:100]
    assert other_seed["text"] != dataset_seed3["text"][:100]

    short = make_shapes_dataset(10, seed=3)
    assert _image_bytes(short) == _image_bytes(dataset_seed3)[:10]
    assert short["captions"] == dataset_seed3["captions"][:10]


# ---- an independent reader of the caption grammar ------------------------------------------

_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_RELATIONS = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}
_NOUN = re.compile(
    r"^(?P<number>a|an|two|three) (?:(?P<size>small|large) )?(?:(?P<color>[a-z]+) )?"
    r"(?P<noun>circle|square|triangle|shape)(?P<plural>s?)(?: (?P<position>.+))?$"
)


def _parse_noun(phrase: str) -> dict:
    match = _NOUN.match(phrase)
    assert match, f"not a noun phrase: {phrase!r}"
    number = _NUMBERS[match["number"]]
    assert (number > 1) == bool(match["plural"]), phrase
    assert match["color"] is None or match["color"] in COLORS, phrase
    assert match["position"] is None or match["position"] in POSITIONS, phrase
    article = "an" if (match["size"] or match["color"] or match["noun"])[0] in "aeiou" else "a"
    assert number > 1 or match["number"] == article, f"wrong article in {phrase!r}"
    shape = None if match["noun"] == "shape" else match["noun"]
    return {"count": number, "shape": shape, **{key: match[key] for key in ("color", "size", "position")}}


def _matches(query: dict, obj: dict) -> bool:
    return all(query[key] is None or query[key] == obj[key] for key in ("shape", "color", "size", "position"))


def _check_caption(caption: str, scene: dict) -> None:
    """Raise AssertionError unless the caption describes the scene truthfully and completely."""
    text = caption
    for prefix in ("a photo of ", "there is ", "there are "):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    background = re.search(r" on a (\w+) background$", text)
    if background:
        assert background[1] == scene["background"], caption
        text = text[: background.start()]
    objects = scene["objects"]
    for phrase, relation in _RELATIONS.items():
        if f" {phrase} " in text:
            subject, other = (_parse_noun(part) for part in text.split(f" {phrase} "))
            assert len(objects) == 2, caption
            pairs = [
                (a, b) for a in objects for b in objects if a is not b and _matches(subject, a) and _matches(other, b)
            ]
            assert pairs, caption
            for a, b in pairs:
                holds = {
                    "left of": a["col"] < b["col"],
                    "right of": a["col"] > b["col"],
                    "above": a["row"] < b["row"],
                    "below": a["row"] > b["row"],
                }[relation]
                assert holds, f"{caption!r} is false for {scene}"
            return
    parts = re.split(r", | and ", text)
    nouns = [_parse_noun(part) for part in parts]
    # each phrase matches exactly as many objects as it says, and together they name every object
    for noun in nouns:
        assert sum(_matches(noun, obj) for obj in objects) == noun["count"], f"{caption!r} miscounts in {scene}"
    assert sum(noun["count"] for noun in nouns) == len(objects), f"{caption!r} leaves objects out of {scene}"


def test_the_caption_reader_rejects_false_captions():
    scene = make_scene(
        [
            {"shape": "circle", "color": "red", "size": "small", "position": "at the top left"},
            {"shape": "square", "color": "blue", "size": "large", "position": "at the bottom right"},
        ]
    )
    _check_caption("a red circle to the left of a blue square", scene)
    for false in (
        "a red circle to the right of a blue square",
        "a red circle below a blue square",
        "a blue circle and a red square",
        "a large red circle and a blue square",
        "a red circle",
        "a red circle and a blue square on a black background",
        "a red circle at the top and a blue square at the bottom right",
    ):
        with pytest.raises(AssertionError):
            _check_caption(false, scene)


def test_every_caption_agrees_with_its_scene(dataset_seed3):
    kinds = Counter()
    for text, captions, scene in zip(dataset_seed3["text"], dataset_seed3["captions"], dataset_seed3["scene"]):
        kinds[scene["kind"]] += 1
        assert text == captions[0]
        for caption in captions:
            _check_caption(caption, scene)
    assert set(kinds) == {"single", "count", "relation", "multi"}
    assert kinds["single"] > 0.3 * sum(kinds.values())  # default mixture: 40% single objects


def test_all_templates_are_truthful_for_every_scene_kind():
    for scene in make_shapes_dataset(200, seed=11)["scene"]:
        for caption in all_scene_captions(scene):
            _check_caption(caption, scene)


def test_full_captions_in_random_order_are_truthful_and_say_nothing_by_their_order():
    """In reading order the first object named is never below the second; in random order it is about
    as often below as above, and every description stays true and names the same objects and places."""
    first_below = Counter()
    for order in ("reading", "random"):
        data = make_shapes_dataset(300, seed=5, full_caption=True, captions_per_image=2, full_caption_order=order)
        for caption, scene in zip(data["text"], data["scene"]):
            if scene["kind"] != "count":  # the reader splits at " and "; a count's places are joined by it
                _check_caption(caption, scene)
            objects = scene["objects"]
            if scene["kind"] != "relation" or objects[0]["row"] == objects[1]["row"]:
                continue
            named = sorted(objects, key=lambda o: caption.index(f"{o['color']} {o['shape']}"))
            first_below[order, named[0]["row"] > named[1]["row"]] += 1
    assert first_below["reading", True] == 0 and first_below["reading", False] > 20
    assert first_below["random", True] > 0.3 * (first_below["random", True] + first_below["random", False])
    with pytest.raises(ValueError, match="full_caption_order must be one of"):
        make_shapes_dataset(2, full_caption=True, full_caption_order="backwards")
    with pytest.raises(ValueError, match="full_order must be one of \\['reading', 'random'\\], got 'backwards'"):
        scene_captions(make_shapes_dataset(1)[0]["scene"], random.Random(0), full=True, full_order="backwards")


def test_count_only_captions_name_the_number_of_objects_of_every_scene_kind():
    """With the option, "a shape" / "two shapes" / "three shapes" are written for every kind of scene (and
    stay truthful); without it, never. Loaded through the config, the option reaches the data."""
    from latentdiff.config import load_config
    from latentdiff.data.loading import load_image_text_dataset

    count_only = {"a shape", "two shapes", "three shapes"}
    data = make_shapes_dataset(400, seed=2, captions_per_image=4, full_caption=True, count_only_captions=True)
    kinds_captioned = Counter()
    for captions, scene in zip(data["captions"], data["scene"]):
        for index, caption in enumerate(captions):
            if index or scene["kind"] != "count":  # the reader splits at " and ", which joins a count's places
                _check_caption(caption, scene)
            if caption in count_only:
                assert caption == ("a shape", "two shapes", "three shapes")[len(scene["objects"]) - 1]
                kinds_captioned[scene["kind"]] += 1
    assert set(kinds_captioned) == {"single", "count", "relation", "multi"}
    for scene in data["scene"][:50]:
        assert count_only & set(all_scene_captions(scene, count_only=True))
        assert not count_only & set(all_scene_captions(scene))
    plain = make_shapes_dataset(400, seed=2, captions_per_image=4, full_caption=True)
    assert not count_only & {caption for captions in plain["captions"] for caption in captions}

    config = load_config(overrides=["data.source=shapes", "data.shapes.num_samples=200",
                                    "data.shapes.count_only_captions=true"])
    loaded = load_image_text_dataset(config.data)
    assert count_only & {caption for captions in loaded["captions"] for caption in captions}


def test_scene_structure(dataset_seed3):
    for scene in dataset_seed3["scene"]:
        objects = scene["objects"]
        assert 1 <= len(objects) <= 3 and scene["background"] in BACKGROUNDS
        cells = [(obj["row"], obj["col"]) for obj in objects]
        assert len(set(cells)) == len(cells) and cells == sorted(cells)
        for obj in objects:
            assert obj["shape"] in SHAPES and obj["color"] in COLORS and obj["size"] in SIZES
            assert POSITIONS[obj["position"]] == (obj["row"], obj["col"])
        for relation in scene["relations"]:
            a, b = objects[relation["subject"]], objects[relation["object"]]
            assert {"left of": a["col"] < b["col"], "right of": a["col"] > b["col"],
                    "above": a["row"] < b["row"], "below": a["row"] > b["row"]}[relation["relation"]]
        expected = sum((a["col"] != b["col"]) + (a["row"] != b["row"]) for a in objects for b in objects if a is not b)
        assert len(scene["relations"]) == expected


def test_object_count_options_and_mixture():
    singles = make_shapes_dataset(50, seed=1, max_objects=1)["scene"]
    assert all(len(scene["objects"]) == 1 for scene in singles)
    crowded = make_shapes_dataset(50, seed=1, min_objects=3)["scene"]
    assert all(len(scene["objects"]) == 3 for scene in crowded)
    counts = make_shapes_dataset(30, seed=1, mixture={"count": 1.0})["scene"]
    for scene in counts:
        assert scene["kind"] == "count" and len({(obj["color"], obj["shape"]) for obj in scene["objects"]}) == 1
    with pytest.raises(ValueError, match="min_objects"):
        make_shapes_dataset(4, min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="unknown scene kind"):
        make_shapes_dataset(4, mixture={"crowd": 1.0})
    with pytest.raises(ValueError, match="no weight"):
        make_shapes_dataset(4, max_objects=1, mixture={"relation": 1.0})
    with pytest.raises(ValueError, match="image_size"):
        make_shapes_dataset(4, image_size=8)


def test_holdout_leaves_combinations_out():
    holdout = ["purple triangle", "large blue"]
    scenes = make_shapes_dataset(2000, seed=0, holdout=holdout)["scene"]
    objects = [obj for scene in scenes for obj in scene["objects"]]
    assert not any(obj["color"] == "purple" and obj["shape"] == "triangle" for obj in objects)
    assert not any(obj["size"] == "large" and obj["color"] == "blue" for obj in objects)
    # only the combinations are left out, not their words
    assert any(obj["color"] == "purple" for obj in objects) and any(obj["shape"] == "triangle" for obj in objects)
    assert any(obj["color"] == "blue" for obj in objects) and any(obj["size"] == "large" for obj in objects)
    # without the hold-out, the same seed draws them
    plain = [obj for scene in make_shapes_dataset(300, seed=0)["scene"] for obj in scene["objects"]]
    assert any(obj["color"] == "purple" and obj["shape"] == "triangle" for obj in plain)


def test_holdout_rejects_unknown_words():
    with pytest.raises(ValueError, match="'pink'.*known words.*red"):
        make_shapes_dataset(4, holdout=["pink triangle"])
    with pytest.raises(ValueError, match="single string"):
        make_shapes_dataset(4, holdout="purple triangle")
    with pytest.raises(ValueError, match="two colors"):
        make_shapes_dataset(4, holdout=["red blue"])


def test_render_draws_each_object_in_its_cell():
    scene = make_scene([{"shape": "square", "color": "red", "size": "large", "position": "at the top left"}], "black")
    pixels = np.asarray(render_scene(scene, 60))
    assert tuple(pixels[10, 10]) == COLORS["red"]  # centre of the top-left 20x20 cell
    assert tuple(pixels[30, 30]) == BACKGROUNDS["black"]
    assert tuple(pixels[0, 0]) == BACKGROUNDS["black"]  # the cell margin
    with pytest.raises(ValueError, match="distinct grid cells"):
        make_scene([{"shape": "circle", "color": "red", "size": "small", "row": 0, "col": 0}] * 2)


def test_imagefolder_round_trip(tmp_path):
    original = make_shapes_dataset(12, seed=2)
    save_as_imagefolder(original, tmp_path / "shapes")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "shapes"), split="train")
    assert len(loaded) == 12
    assert loaded["text"] == original["text"]
    assert loaded["captions"] == original["captions"]
    assert loaded["scene"] == original["scene"]
    for index in (0, 11):
        assert np.array_equal(np.asarray(loaded[index]["image"]), np.asarray(original[index]["image"]))
    with pytest.raises(FileExistsError, match="not empty"):
        save_as_imagefolder(original, tmp_path / "shapes")


def test_cli_writes_an_image_folder(tmp_path, capsys):
    from latentdiff.cli import main

    assert main(["shapes", str(tmp_path / "out"), "-n", "5", "--seed", "1"]) == 0
    assert sorted(path.name for path in (tmp_path / "out").iterdir())[-1] == "metadata.jsonl"
    assert len(list((tmp_path / "out").glob("*.png"))) == 5
    assert "wrote 5" in capsys.readouterr().out


def test_hard_negatives_are_false_and_differ_in_one_place_or_one_binding():
    import random

    from latentdiff.data.shapes import full_caption, hard_negative_captions

    rng, kinds = random.Random(0), Counter()
    for scene in make_shapes_dataset(300, seed=5)["scene"]:
        for caption in all_scene_captions(scene) + [full_caption(scene)]:
            for kind, negative in hard_negative_captions(caption, rng).items():
                kinds[kind] += 1
                with pytest.raises(AssertionError):  # the reader finds it false for the scene ...
                    _check_caption(negative, scene)
                # ... though it has the caption's words, bar the place phrase (or two articles: "a"/"an")
                before, after = Counter(caption.split()), Counter(negative.split())
                changed = (after - before) + (before - after)
                assert (set(changed) <= {"a", "an"}) == (kind == "binding"), (caption, negative)
    assert kinds["place"] > 1000 and kinds["binding"] > 300, kinds
    # the article follows the swapped color, and alike objects are not swapped into the same caption
    assert hard_negative_captions("a red circle and an orange square", rng) == {"binding": "an orange circle and a red square"}
    assert hard_negative_captions("a red circle and a blue circle", rng) == {}
    assert hard_negative_captions("a red circle above a blue circle", rng) == {
        "place": "a red circle below a blue circle", "binding": "a blue circle above a red circle"}
    # "at the top left" is one phrase, not "at the top" followed by "left"
    moved = hard_negative_captions("a red circle at the top left", rng)["place"]
    assert moved.startswith("a red circle ") and moved.removeprefix("a red circle ") in set(POSITIONS) - {"at the top left"}
    assert hard_negative_captions("a teddy bear on a skateboard", rng) == {}
    # captions of other data may open or end on a color word
    assert hard_negative_captions("red sky and a blue car", rng) == {"binding": "blue sky and a red car"}
    assert hard_negative_captions("the sky is blue and the car is red", rng) == {
        "binding": "the sky is red and the car is blue"}

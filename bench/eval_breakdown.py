#!/usr/bin/env python
"""Where a shapes model's relations and counts go wrong, read from a `latentdiff eval` results file
(docs/conditioning.md, twentieth round).

    python bench/eval_breakdown.py runs/shapes-patient/pipeline/eval/results.json [--text-distances]

The suite scores each task as one figure. This splits three things: the prompts that name one object by
what the judge saw (one small object, one large object, none, several), with how many of those images
passed; relations by the relation word
("to the left of", "to the right of", "above", "below"), with what the judge saw where it was wrong (the two
objects reversed, on one row or column, or one of them missing), and counting by the number named, with how
many objects the judge saw where it was wrong (one too many, one too few...), the one-object prompts by task and by
whether they name the background ("a circle on a white background"), with how many images drew nothing (forty-ninth
round: the shape task's empty images come from those prompts), and the failed images of the tasks that
name two different objects by what was drawn of the two (color, shape) pairs: both pairs, both colors and both
shapes paired the other way, one shape for both, one color for both... With ``--text-distances`` it also
loads the evaluated model and prints how far its text encoder puts captions that differ only in one word:
the norm of the difference of the two contexts the U-Net cross-attends to, relative to the first's norm.
A pair of words the encoder hardly separates is one the U-Net cannot tell apart either.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from latentdiff.data.shapes import COLORS, RELATION_PHRASES, SHAPES

RELATION_WORDS = tuple(RELATION_PHRASES.values())  # "to the left of", "to the right of", "above", "below"
NUMBER_WORDS = {"two": 2, "three": 3}
# The suite's tasks whose prompts name one object (the unseen task mixes in two-object prompts).
ONE_OBJECT_TASKS = ("single_object", "color", "shape", "position")
# The suite's tasks whose prompts name two objects of different colors and shapes.
TWO_OBJECT_TASKS = ("two_objects", "relation", "color_binding")
COLOR_SHAPE_PATTERN = re.compile(r"\b(" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r")\b")
# Captions that differ in one word, by what the word names.
WORD_PAIRS: dict[str, tuple[str, str]] = {
    "above / below": ("a red circle above a blue square", "a red circle below a blue square"),
    "left of / right of": ("a red circle to the left of a blue square", "a red circle to the right of a blue square"),
    "top / bottom (place)": ("a red circle at the top", "a red circle at the bottom"),
    "left / right (place)": ("a red circle on the left", "a red circle on the right"),
    "two / three": ("two red circles", "three red circles"),
    "red / green": ("a red circle above a blue square", "a green circle above a blue square"),
}


def relation_word(prompt: str) -> str:
    """The relation a relation prompt names."""
    for word in RELATION_WORDS:
        if f" {word} " in f" {prompt} ":
            return word
    raise ValueError(f"no relation word ({', '.join(RELATION_WORDS)}) in the relation prompt {prompt!r}")


# "a red square to the left of a green circle": the suite's relation prompts
_RELATION_PROMPT = re.compile(r"^an? (\w+) (\w+) (to the left of|to the right of|above|below) an? (\w+) (\w+)$")


def relation_outcome(image: Mapping[str, Any]) -> str:
    """What a relation image shows: ``"passed"``, ``"missing object"`` (one of the two is not drawn),
    ``"reversed"`` (both drawn, in the opposite order), ``"one line"`` (both on the same row for above /
    below, the same column for left / right), ``"several"`` (more than one object fits a description), or
    ``"other"``."""
    from latentdiff.data.shapes import POSITIONS
    from latentdiff.eval.suite import relation_holds

    if image["passed"]:
        return "passed"
    match = _RELATION_PROMPT.match(image["prompt"])
    if match is None:
        raise ValueError(f"a relation prompt reads 'a <color> <shape> <relation> a <color> <shape>', got {image['prompt']!r}")
    first_color, first_shape, phrase, second_color, second_shape = match.groups()
    relation = next(name for name, words in RELATION_PHRASES.items() if words == phrase)
    # the judged objects carry their place's name; relation_holds reads the grid cell
    objects = [{**obj, **dict(zip(("row", "col"), POSITIONS[obj["position"]]))} for obj in image["judged"]["objects"]]
    firsts = [obj for obj in objects if (obj["color"], obj["shape"]) == (first_color, first_shape)]
    seconds = [obj for obj in objects if (obj["color"], obj["shape"]) == (second_color, second_shape)]
    if not firsts or not seconds:
        return "missing object"
    if len(firsts) > 1 or len(seconds) > 1:
        return "several"
    (first,), (second,) = firsts, seconds
    if relation_holds(second, relation, first):
        return "reversed"
    # both in the named order but failed all the same: the background, say
    return "other" if relation_holds(first, relation, second) else "one line"


def named_count(prompt: str) -> int:
    """The number a counting prompt names ("two red circles" -> 2)."""
    first = prompt.split(" ", 1)[0]
    if first not in NUMBER_WORDS:
        raise ValueError(f"a counting prompt starts with one of {sorted(NUMBER_WORDS)}, got {prompt!r}")
    return NUMBER_WORDS[first]


def drawn_for_one_object(image: Mapping[str, Any]) -> str:
    """What the judge saw for a prompt naming one object: ``"one small"``, ``"one large"``, ``"none"`` or
    ``"several"``. Small objects are about 10 px, 2-3 latent pixels at 16x16 and one at 8x8; the default
    model draws one right about half the time, a large one nine times in ten (docs/conditioning.md,
    twenty-seventh round)."""
    objects = image["judged"]["objects"]
    return "none" if not objects else "several" if len(objects) > 1 else f"one {objects[0]['size']}"


def named_pairs(prompt: str) -> list[tuple[str, str]]:
    """The (color, shape) pairs a two-object prompt names ("a red square and a green circle" -> red square, green
    circle)."""
    pairs = COLOR_SHAPE_PATTERN.findall(prompt)
    if len(pairs) != 2:
        raise ValueError(f"a two-object prompt names two colored shapes, got {len(pairs)} in {prompt!r}")
    return pairs


def two_object_outcome(image: Mapping[str, Any]) -> str:
    """What a failed image of a two-object prompt drew of its two (color, shape) pairs, first match wins:
    ``"both pairs drawn"`` (it failed on a place, a relation or an extra object), ``"paired the other way"`` (both
    colors and both shapes, not as named), ``"one shape for both"`` (both colors, one of the shapes missing), ``"one
    color for both"``, ``"one pair only"`` or ``"neither pair"``."""
    named = named_pairs(image["prompt"])
    drawn = {(obj["color"], obj["shape"]) for obj in image["judged"]["objects"]}
    colors, shapes = {color for color, _ in drawn}, {shape for _, shape in drawn}
    all_colors, all_shapes = all(c in colors for c, _ in named), all(s in shapes for _, s in named)
    if all(pair in drawn for pair in named):
        return "both pairs drawn"
    if all_colors and all_shapes:
        return "paired the other way"
    if all_colors:
        return "one shape for both"
    if all_shapes:
        return "one color for both"
    return "one pair only" if any(pair in drawn for pair in named) else "neither pair"


def names_background(prompt: str) -> bool:
    """Whether a prompt names its background ("... on a white background")."""
    return prompt.endswith(" background")


def breakdown(images: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"one_object": {drawn: Counter(passed)}, "one_object_by_background": {(task, names background):
    Counter("images", "passed", "none drawn")}, "relation": {word: Counter(outcome)}, "counting": {named:
    Counter(outcome)}, "two_objects": {task: Counter(outcome)}}`` for a results file's images.

    ``drawn`` is :func:`drawn_for_one_object`'s reading of an image of a one-object task
    (:data:`ONE_OBJECT_TASKS`), counted by whether it passed (True / False). A relation outcome is one of
    :func:`relation_outcome`'s. A counting outcome is ``"right"`` for a passed image, else the judge's object count minus the named
    number (``"+1"``, ``"-1"``), or ``"right number, wrong kind"``. A two-object outcome is ``"passed"`` or
    :func:`two_object_outcome`'s, for each task of :data:`TWO_OBJECT_TASKS`.
    """
    relation: dict[str, collections.Counter] = {word: collections.Counter() for word in RELATION_WORDS}
    counting: dict[int, collections.Counter] = {}
    one_object: dict[str, collections.Counter] = {}
    by_background: dict[tuple[str, bool], collections.Counter] = {}
    two_objects: dict[str, collections.Counter] = {}
    for image in images:
        if image["task"] in TWO_OBJECT_TASKS:
            outcome = "passed" if image["passed"] else two_object_outcome(image)
            two_objects.setdefault(image["task"], collections.Counter())[outcome] += 1
        if image["task"] in ONE_OBJECT_TASKS:
            drawn = drawn_for_one_object(image)
            one_object.setdefault(drawn, collections.Counter())[image["passed"]] += 1
            by_background.setdefault((image["task"], names_background(image["prompt"])), collections.Counter()).update(
                {"images": 1, "passed": int(image["passed"]), "none drawn": int(drawn == "none")})
        elif image["task"] == "relation":
            relation[relation_word(image["prompt"])][relation_outcome(image)] += 1
        elif image["task"] == "counting":
            named = named_count(image["prompt"])
            drawn = len(image["judged"]["objects"])
            outcome = "right" if image["passed"] else (f"{drawn - named:+d}" if drawn != named else "right number, wrong kind")
            counting.setdefault(named, collections.Counter())[outcome] += 1
    return {"one_object": one_object, "one_object_by_background": by_background,
            "relation": {word: outcomes for word, outcomes in relation.items() if outcomes},
            "counting": counting, "two_objects": two_objects}


def text_distances(model: str, pairs: Mapping[str, tuple[str, str]] = WORD_PAIRS) -> dict[str, float]:
    """``{name: |context(a) - context(b)| / |context(a)|}`` for each caption pair, with the model's text encoder."""
    import torch

    from latentdiff.pipelines import LatentPipeline

    pipeline = LatentPipeline.from_pretrained(model)
    distances = {}
    with torch.no_grad():
        for name, (first, second) in pairs.items():
            # the same call the pipeline makes, without guidance: the context the U-Net reads
            contexts, _ = pipeline.encode_prompt([first, second], device="cpu", num_images_per_prompt=1,
                                                 do_classifier_free_guidance=False)
            distances[name] = ((contexts[0] - contexts[1]).norm() / contexts[0].norm()).item()
    return distances


def print_passed_and_failures(header: str, rows: Mapping[str, collections.Counter]) -> None:
    """A markdown table: per row, the images passed out of all, then the failures by outcome, most frequent first."""
    print(f"{header}\n|---|---|---|")
    for name, outcomes in rows.items():
        n, failed = sum(outcomes.values()), {k: v for k, v in outcomes.most_common() if k != "passed"}
        print(f"| {name} | {outcomes['passed']}/{n} ({outcomes['passed'] / n:.2f}) | "
              f"{', '.join(f'{outcome}: {count}' for outcome, count in failed.items())} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a results.json written by `latentdiff eval`")
    parser.add_argument("--text-distances", action="store_true",
                        help="also load the evaluated model and measure its text encoder on one-word caption pairs")
    args = parser.parse_args()
    with open(args.results) as file:
        results = json.load(file)
    parts = breakdown(results["images"])
    if parts["one_object"]:
        print(f"| one object named ({', '.join(ONE_OBJECT_TASKS)}): the judge saw | images | passed |\n|---|---|---|")
        for drawn in ("one small", "one large", "none", "several"):
            if drawn in parts["one_object"]:
                passed, n = parts["one_object"][drawn][True], sum(parts["one_object"][drawn].values())
                print(f"| {drawn} | {n} | {passed} ({passed / n:.2f}) |")
        print("\n| task | its prompts | images | passed | none drawn |\n|---|---|---|---|---|")
        for (task, background), counts in sorted(parts["one_object_by_background"].items()):
            print(f"| {task} | {'naming the background' if background else 'not naming it'} | {counts['images']} | "
                  f"{counts['passed']} ({counts['passed'] / counts['images']:.2f}) | {counts['none drawn']} |")
        print()
    if parts["relation"]:
        print_passed_and_failures("| relation | passed | where it failed |", parts["relation"])
    if parts["counting"]:
        print("\n| named | outcomes |\n|---|---|")
        for named, outcomes in sorted(parts["counting"].items()):
            print(f"| {named} | {', '.join(f'{outcome}: {n}' for outcome, n in outcomes.most_common())} |")
    if parts["two_objects"]:
        print()
        print_passed_and_failures("| two different objects | passed | what the failed images drew of the two named "
                                  "(color, shape) pairs |", parts["two_objects"])
    if args.text_distances:
        print(f"\n| caption pair ({results['model']}) | relative distance of the contexts |\n|---|---|")
        for name, distance in text_distances(results["model"]).items():
            print(f"| {name} | {distance:.3f} |")


if __name__ == "__main__":
    sys.exit(main())

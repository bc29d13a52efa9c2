"""The versioned shapes prompt suite: prompts with machine-checkable expectations (GenEval-style).

Tasks, each about 12-20 prompts (GenEval: Ghosh et al., "GenEval: An Object-Focused Framework for
Evaluating Text-to-Image Alignment", NeurIPS 2023, whose tasks these mirror):

=============== ============================================ ==============================================
task            example prompt                               passes when the judge sees ...
=============== ============================================ ==============================================
single_object   "a red circle"                               an object of that color and shape
color           "a red shape", "... on a white background"   an object of that color (and that background)
shape           "a circle", "... on a black background"      an object of that shape (and that background)
position        "a blue square at the top left"              that object in that grid cell
counting        "two green triangles"                        exactly that many objects of that kind
two_objects     "a red circle and a blue square"             both objects
relation        "a red circle to the left of a blue square"  both, the first in that relation to the second
color_binding   "a red square and a blue circle"             both, and neither shape in the other's color
unseen          "a purple triangle", "two purple triangles"  as above, for combinations held out of training
=============== ============================================ ==============================================

Prompts use exactly the vocabulary and phrasings of the training captions
(:func:`latentdiff.data.shapes.caption_families`), and every prompt outside ``unseen`` avoids the
held-out combinations. The list is fixed for a given :data:`SHAPES_SUITE_VERSION` and holdout;
change the version whenever prompts or checks change.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..data.shapes import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    SIZES,
    is_held_out,
    make_scene,
    noun_phrase,
    parse_holdout,
)

SHAPES_SUITE_VERSION = "shapes-v1"

#: Combinations left out of training by default (``DataConfig.shapes.holdout``), tested by ``unseen``.
DEFAULT_HOLDOUT: tuple[str, ...] = ("purple triangle", "orange square")

TASKS: tuple[str, ...] = (
    "single_object",
    "color",
    "shape",
    "position",
    "counting",
    "two_objects",
    "relation",
    "color_binding",
    "unseen",
)
#: Tasks averaged into the overall score (``unseen`` is reported on its own).
SEEN_TASKS: tuple[str, ...] = TASKS[:-1]


@dataclass(frozen=True)
class ObjectQuery:
    """What an object must be; ``None`` means any."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None
    position: str | None = None

    def matches(self, obj: Mapping[str, Any]) -> bool:
        wanted = {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position}
        return all(value is None or obj.get(key) == value for key, value in wanted.items())

    def phrase(self, count: int = 1) -> str:
        """The caption phrase, e.g. ``"a small red circle at the top left"``."""
        words = noun_phrase(self.shape, self.color, self.size, count=count)
        return f"{words} {self.position}" if self.position else words

    def describe(self) -> str:
        """Short name without article, e.g. ``"red circle"``."""
        return self.phrase().split(" ", 1)[1]


@dataclass(frozen=True)
class PromptSpec:
    """One prompt of the suite and its machine-checkable expectation.

    Unless ``count`` or ``relation`` is set, each of ``objects`` must match a different judged object.
    """

    task: str
    prompt: str
    objects: tuple[ObjectQuery, ...]
    count: int | None = None
    """Exactly this many judged objects match ``objects[0]``."""
    relation: str | None = None
    """An object matching ``objects[0]`` is in this relation (:data:`RELATIONS`) to one matching ``objects[1]``."""
    exclusive_colors: bool = False
    """Color binding: additionally no object has the shape of one query and the color of the other."""
    background: str | None = None
    """The judged background must be this one."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------------

_OBJECT_KEYS = ("shape", "color", "size", "row", "col", "position")


def _judged_objects(judged: Any) -> tuple[list[dict[str, Any]], str | None]:
    """Objects (dicts) and background of a :class:`~latentdiff.eval.judge.JudgedImage`, its
    ``to_dict()``, or a dataset ``scene``."""
    if hasattr(judged, "objects") and hasattr(judged, "background"):
        objects = [{key: getattr(obj, key) for key in _OBJECT_KEYS} for obj in judged.objects]
        return objects, judged.background
    if isinstance(judged, Mapping) and "objects" in judged:
        return [dict(obj) for obj in judged["objects"]], judged.get("background")
    raise TypeError(f"expected a JudgedImage, its to_dict() or a scene mapping, got {type(judged).__name__}")


def relation_holds(subject: Mapping[str, Any], relation: str, other: Mapping[str, Any]) -> bool:
    """Whether ``subject`` is ``relation`` (left of / right of / above / below) ``other``, by grid cell."""
    if relation == "left of":
        return subject["col"] < other["col"]
    if relation == "right of":
        return subject["col"] > other["col"]
    if relation == "above":
        return subject["row"] < other["row"]
    if relation == "below":
        return subject["row"] > other["row"]
    raise ValueError(f"unknown relation {relation!r}; expected one of {list(RELATIONS)}")


def _seen(objects: Sequence[Mapping[str, Any]]) -> str:
    if not objects:
        return "saw no object"
    return "saw " + ", ".join(f"{obj['size']} {obj['color']} {obj['shape']} {obj['position']}" for obj in objects)


def _assign(queries: Sequence[ObjectQuery], objects: Sequence[Mapping[str, Any]]) -> bool:
    """Whether each query can be matched to a different object (tiny bipartite matching by search)."""
    return any(
        all(query.matches(objects[index]) for query, index in zip(queries, chosen))
        for chosen in itertools.permutations(range(len(objects)), len(queries))
    )


def failure_reason(spec: PromptSpec, judged: Any) -> str | None:
    """Why a judged image does not satisfy ``spec`` in a few words (for marking a grid), or ``None``
    when it does. ``judged`` is a ``JudgedImage``, its ``to_dict()``, or a scene."""
    objects, background = _judged_objects(judged)
    if spec.background is not None and background != spec.background:
        return f"background is {background}, not {spec.background}"
    missing = [query for query in spec.objects if not any(query.matches(obj) for obj in objects)]

    if spec.count is not None:
        query = spec.objects[0]
        found = sum(query.matches(obj) for obj in objects)
        if found != spec.count:
            return f"{found} {query.describe()}{'' if found == 1 else 's'}, expected {spec.count}; {_seen(objects)}"
        return None

    if missing:
        return f"no {' and no '.join(query.describe() for query in missing)}; {_seen(objects)}"

    if spec.relation is not None:
        first, second = spec.objects
        if not any(
            relation_holds(a, spec.relation, b)
            for a, b in itertools.permutations(objects, 2)
            if first.matches(a) and second.matches(b)
        ):
            return f"{first.describe()} is not {RELATION_PHRASES[spec.relation]} {second.describe()}; {_seen(objects)}"
        return None

    if not _assign(spec.objects, objects):
        return f"fewer distinct objects than asked for; {_seen(objects)}"

    if spec.exclusive_colors:
        first, second = spec.objects
        swapped = [ObjectQuery(first.shape, second.color), ObjectQuery(second.shape, first.color)]
        leaked = [query for query in swapped if any(query.matches(obj) for obj in objects)]
        if leaked:
            return f"colors not bound: also {' and '.join(query.phrase() for query in leaked)}; {_seen(objects)}"
    return None


def has_right_count(spec: PromptSpec, judged: Any) -> bool:
    """Whether the image holds exactly as many objects as the prompt names (``count``, else one per query).

    Not part of a task's accuracy, which asks only that what the prompt names is there ("a red circle" is
    satisfied by two red circles); reported beside it, so that a change that adds objects shows."""
    objects, _ = _judged_objects(judged)
    return len(objects) == (spec.count if spec.count is not None else len(spec.objects))


def check_prompt(spec: PromptSpec, judged: Any) -> bool:
    """Whether a judged image satisfies the prompt's expectation (see :func:`failure_reason`)."""
    return failure_reason(spec, judged) is None


def evaluate_image(spec: PromptSpec, image: Any) -> dict[str, Any]:
    """Judge one generated image for one prompt: ``{"task", "prompt", "passed", "reason", "judged"}``."""
    from .judge import judge_image

    judged = judge_image(image)
    reason = failure_reason(spec, judged)
    return {
        "task": spec.task,
        "prompt": spec.prompt,
        "passed": reason is None,
        "reason": reason,
        "judged": judged.to_dict(),
    }


def summarize(results: Iterable[Any]) -> dict[str, Any]:
    """Accuracy per task and overall.

    ``results`` holds one entry per generated image: a ``(PromptSpec, passed)`` pair or a mapping
    with ``task`` and ``passed`` (as :func:`evaluate_image` returns). ``overall`` is the mean of the
    per-task accuracies over the seen tasks present (GenEval's overall score: each task counts
    equally, whatever its number of prompts); ``unseen`` is **excluded** from ``overall`` and
    reported on its own as ``"unseen"`` (``None`` when there were no unseen prompts). When every
    mapping also holds ``right_count`` (:func:`has_right_count`), each task and the summary get the
    fraction of images with the right number of objects.
    """
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    right_count: dict[str, int] = {}
    counted = True  # every result says whether its object count was right
    for result in results:
        if isinstance(result, Mapping):
            task, passed = result["task"], result["passed"]
            if "right_count" in result:
                right_count[task] = right_count.get(task, 0) + bool(result["right_count"])
            else:
                counted = False
        else:
            spec, passed = result
            task, counted = spec.task, False
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} in results; expected one of {list(TASKS)}")
        total[task] = total.get(task, 0) + 1
        correct[task] = correct.get(task, 0) + bool(passed)
    if not total:
        raise ValueError("summarize() got no results")
    tasks = {
        task: {"accuracy": correct[task] / total[task], "correct": correct[task], "total": total[task]}
        for task in TASKS
        if task in total
    }
    if counted:
        for task, entry in tasks.items():
            entry["right_count"] = right_count.get(task, 0) / entry["total"]
    seen = [task for task in SEEN_TASKS if task in tasks]
    return {
        "suite": SHAPES_SUITE_VERSION,
        "tasks": tasks,
        "overall": sum(tasks[task]["accuracy"] for task in seen) / len(seen) if seen else None,
        "unseen": tasks["unseen"]["accuracy"] if "unseen" in tasks else None,
        # how often an image holds exactly the number of objects its prompt names, mean over the seen tasks
        "right_count": sum(tasks[task]["right_count"] for task in seen) / len(seen) if counted and seen else None,
    }


# --------------------------------------------------------------------------------------------
# The prompts
# --------------------------------------------------------------------------------------------


def _single(task: str, query: ObjectQuery, prefix: str = "", background: str | None = None) -> PromptSpec:
    prompt = prefix + query.phrase() + (f" on a {background} background" if background else "")
    return PromptSpec(task, prompt, (query,), background=background)


def _pair(
    task: str, first: ObjectQuery, second: ObjectQuery, relation: str | None = None, exclusive: bool = False
) -> PromptSpec:
    joiner = RELATION_PHRASES[relation] if relation else "and"
    prompt = f"{first.phrase()} {joiner} {second.phrase()}"
    return PromptSpec(task, prompt, (first, second), relation=relation, exclusive_colors=exclusive)


def _count(task: str, query: ObjectQuery, count: int) -> PromptSpec:
    return PromptSpec(task, query.phrase(count), (query,), count=count)


def shapes_suite(holdout: Sequence[str] = DEFAULT_HOLDOUT) -> list[PromptSpec]:
    """The fixed prompt list of :data:`SHAPES_SUITE_VERSION` for a model trained with ``holdout``.

    Deterministic: the same holdout always gives the same prompts in the same order. Only the
    ``unseen`` prompts name a held-out combination (none when ``holdout`` is empty).
    """
    parsed = parse_holdout(holdout)
    rng = random.Random(f"latentdiff-suite/{SHAPES_SUITE_VERSION}")  # fixed pairings, not a sample

    def allowed(query: ObjectQuery) -> bool:
        return not is_held_out({"shape": query.shape, "color": query.color, "size": query.size}, parsed)

    kinds = [ObjectQuery(shape, color) for shape, color in itertools.product(SHAPES, COLORS)]
    kinds = [query for query in kinds if allowed(query)]
    shuffled = kinds[:]
    rng.shuffle(shuffled)
    cycle = itertools.cycle(shuffled)
    backgrounds = list(BACKGROUNDS)
    specs: list[PromptSpec] = []

    # single object: every allowed color-shape combination
    specs += [_single("single_object", query) for query in kinds]
    # color: color only, plain and on each background in turn
    for index, color in enumerate(COLORS):
        if allowed(ObjectQuery(color=color)):
            specs.append(_single("color", ObjectQuery(color=color)))
            specs.append(_single("color", ObjectQuery(color=color), background=backgrounds[index % len(backgrounds)]))
    # shape: shape only, plain and on every background
    for shape in SHAPES:
        if allowed(ObjectQuery(shape=shape)):
            specs.append(_single("shape", ObjectQuery(shape=shape)))
            specs += [_single("shape", ObjectQuery(shape=shape), background=background) for background in backgrounds]
    # position: every cell twice
    for position in list(POSITIONS) * 2:
        query = next(cycle)
        specs.append(_single("position", ObjectQuery(query.shape, query.color, position=position)))
    # counting: two and three of a kind
    for count in (2, 3):
        specs += [_count("counting", next(cycle), count) for _ in range(8)]

    # pairs of allowed kinds that differ in both color and shape, in a fixed shuffled order
    pairs = [(a, b) for a, b in itertools.permutations(shuffled, 2) if a.shape != b.shape and a.color != b.color]
    rng.shuffle(pairs)
    if not pairs:
        raise ValueError(f"holdout {list(holdout)} leaves no two objects that differ in color and shape")
    pair_cycle = itertools.cycle(pairs)
    # two objects, different in color and shape
    specs += [_pair("two_objects", *next(pair_cycle)) for _ in range(16)]
    # relations: four of each
    for relation in RELATIONS:
        specs += [_pair("relation", *next(pair_cycle), relation=relation) for _ in range(4)]
    # color binding: pairs whose swapped combinations are allowed too, asked both ways round;
    # preferably pairs not already asked in two_objects or relation
    asked = {frozenset((q.shape, q.color) for q in spec.objects) for spec in specs if len(spec.objects) == 2}
    used: set[frozenset[tuple[str | None, str | None]]] = set()
    for avoid_asked in (True, False):  # the second pass only when the first found too few
        for first, second in pairs:
            if len(used) == 8:
                break
            swapped_first = ObjectQuery(first.shape, second.color)
            swapped_second = ObjectQuery(second.shape, first.color)
            combos = frozenset((q.shape, q.color) for q in (first, second, swapped_first, swapped_second))
            both_ways = (
                frozenset({(first.shape, first.color), (second.shape, second.color)}),
                frozenset({(swapped_first.shape, swapped_first.color), (swapped_second.shape, swapped_second.color)}),
            )
            if combos in used or not (allowed(swapped_first) and allowed(swapped_second)):
                continue
            if avoid_asked and any(prompt_pair in asked for prompt_pair in both_ways):
                continue
            used.add(combos)
            specs.append(_pair("color_binding", first, second, exclusive=True))
            specs.append(_pair("color_binding", swapped_first, swapped_second, exclusive=True))

    specs += _unseen_specs(parsed, shuffled)
    return specs


def _unseen_specs(
    parsed: Sequence[Mapping[str, str]], partners: Sequence[ObjectQuery], limit: int = 20
) -> list[PromptSpec]:
    """Prompts about held-out combinations in several contexts, round-robin over the entries."""
    per_entry: list[list[PromptSpec]] = []
    for entry in parsed:
        shapes = [entry["shape"]] if "shape" in entry else list(SHAPES)
        colors = [entry["color"]] if "color" in entry else list(COLORS)
        sizes = [entry["size"]] if "size" in entry else [None]
        specs: list[PromptSpec] = []
        for shape, color, size in itertools.product(shapes, colors, sizes):
            held = ObjectQuery(shape, color, size)
            # a partner object of the same size wording as the held-out one (captions size both or neither)
            partner = next(
                (
                    ObjectQuery(query.shape, query.color, size)
                    for query in partners
                    if query.shape != shape
                    and query.color != color
                    and not is_held_out({"shape": query.shape, "color": query.color, "size": size}, parsed)
                ),
                None,
            )
            specs.append(_single("unseen", held))
            if size is None:
                specs += [_single("unseen", ObjectQuery(shape, color, other_size)) for other_size in SIZES]
                specs.append(_single("unseen", held, prefix="a photo of "))
            else:  # the captions' sized "a photo of" template names the position too
                specs.append(_single("unseen", ObjectQuery(shape, color, size, "at the top"), prefix="a photo of "))
            for position in ("at the top left", "in the center", "at the bottom right"):
                specs.append(_single("unseen", ObjectQuery(shape, color, size, position)))
            specs.append(_count("unseen", held, 2))
            if partner is not None:
                specs.append(_pair("unseen", held, partner))
                specs.append(_pair("unseen", held, partner, relation="left of"))
        per_entry.append(specs)
    chosen: list[PromptSpec] = []
    for group in itertools.zip_longest(*per_entry):
        chosen += [spec for spec in group if spec is not None and spec.prompt not in {s.prompt for s in chosen}]
    return chosen[:limit]


# --------------------------------------------------------------------------------------------
# Ground truth for a prompt
# --------------------------------------------------------------------------------------------

_RELATION_CELLS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "left of": ((1, 0), (1, 2)),
    "right of": ((1, 2), (1, 0)),
    "above": ((0, 1), (2, 1)),
    "below": ((2, 1), (0, 1)),
}


def example_scene(spec: PromptSpec, background: str | None = None) -> dict[str, Any]:
    """A scene that satisfies ``spec``, holding exactly the objects the prompt describes.

    Unspecified attributes are filled in (shape circle, color red, size large, free cells in
    reading order); the prompt is then one of the scene's own captions. For tests and examples.
    """

    def fill(query: ObjectQuery) -> dict[str, Any]:
        return {"shape": query.shape or "circle", "color": query.color or "red", "size": query.size or "large"}

    objects: list[dict[str, Any]] = []
    if spec.count is not None:
        objects = [fill(spec.objects[0]) for _ in range(spec.count)]
    elif spec.relation is not None:
        for query, (row, col) in zip(spec.objects, _RELATION_CELLS[spec.relation]):
            objects.append({**fill(query), "row": row, "col": col})
    else:
        objects = [{**fill(query), "position": query.position} for query in spec.objects]
    taken = {POSITIONS[obj["position"]] for obj in objects if obj.get("position")}
    taken |= {(obj["row"], obj["col"]) for obj in objects if "row" in obj}
    free = (cell for cell in itertools.product(range(3), range(3)) if cell not in taken)
    for obj in objects:
        if not obj.get("position") and "row" not in obj:
            obj.pop("position", None)
            obj["row"], obj["col"] = next(free)
    return make_scene(objects, background or spec.background or "white")


__all__ = [
    "SHAPES_SUITE_VERSION",
    "DEFAULT_HOLDOUT",
    "TASKS",
    "SEEN_TASKS",
    "ObjectQuery",
    "PromptSpec",
    "shapes_suite",
    "check_prompt",
    "failure_reason",
    "has_right_count",
    "relation_holds",
    "evaluate_image",
    "summarize",
    "example_scene",
]

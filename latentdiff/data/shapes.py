"""The built-in captioned shapes: a procedural, deterministic text-to-image dataset.

Each image shows 1 to 3 flat shapes (circle, square, triangle) in six saturated colors, in two
sizes, each in its own cell of a 3x3 grid, on a plain neutral background. Every image comes with
several truthful captions written from templates ("a red circle at the top left", "two green
triangles", "a red circle to the left of a blue square", "a photo of ...", "there is ..."), and
with its structured ``scene`` (the ground truth that :mod:`latentdiff.eval.judge` recovers from
the pixels and :mod:`latentdiff.eval.suite` checks prompts against).

    >>> from latentdiff.data.shapes import make_shapes_dataset
    >>> dataset = make_shapes_dataset(1000, seed=0, holdout=["purple triangle"])
    >>> dataset[0]["text"], dataset[0]["image"].size
    ('...', (64, 64))

Sample ``i`` is a function of ``(seed, i)`` and the options alone, so it does not depend on
``num_samples``. Scene layout, rendering and caption grammar are specific to this dataset, so they
are written here; storage, decoding and image-folder export are the ``datasets`` library's.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import os
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, get_args

import datasets
from PIL import Image, ImageDraw

from latentdiff.config import FullCaptionOrder, SceneMixtureConfig

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Object colors: saturated and far apart in RGB (smallest pairwise distance about 100), so a
#: nearest-color reader tells them apart even with blur and some color drift.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 25),
    "green": (35, 170, 50),
    "blue": (35, 80, 230),
    "yellow": (240, 230, 40),
    "purple": (150, 45, 200),
    "orange": (250, 130, 15),
}

#: Plain backgrounds: achromatic, at least about 120 away from every object color.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (150, 150, 150),
    "black": (0, 0, 0),
}

SIZES: tuple[str, ...] = ("small", "large")

#: Edge length of an object's bounding box, as a fraction of a grid cell's edge.
SIZE_FRACTIONS: dict[str, float] = {"small": 0.45, "large": 0.8}

#: Position phrases of the 3x3 grid -> (row, col); row 0 is the top, col 0 the left.
POSITIONS: dict[str, tuple[int, int]] = {
    "at the top left": (0, 0),
    "at the top": (0, 1),
    "at the top right": (0, 2),
    "on the left": (1, 0),
    "in the center": (1, 1),
    "on the right": (1, 2),
    "at the bottom left": (2, 0),
    "at the bottom": (2, 1),
    "at the bottom right": (2, 2),
}
#: (row, col) -> position phrase.
POSITION_NAMES: dict[tuple[int, int], str] = {cell: name for name, cell in POSITIONS.items()}

#: Pairwise relations (as stored in a scene) and their caption phrases.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
RELATION_PHRASES: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}

#: Scene kinds and their default share of the data: single objects are what a small model
#: learns first; counts, two-object relations and three-object scenes teach composition.
#: The weights are the config's (one list for both, so that they cannot drift apart).
DEFAULT_MIXTURE: dict[str, float] = asdict(SceneMixtureConfig())
SCENE_KINDS: tuple[str, ...] = tuple(DEFAULT_MIXTURE)

#: Orders in which a scene's whole description (:func:`full_caption`) can name its objects.
FULL_CAPTION_ORDERS: tuple[str, ...] = get_args(FullCaptionOrder)

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}

GRID = 3
MAX_OBJECTS = 3
# Smallest gap between an object's bounding box and its cell border (fraction of a cell), so that
# objects in neighbouring cells stay apart even after blur.
_CELL_MARGIN = 0.08

# --------------------------------------------------------------------------------------------
# datasets schema
# --------------------------------------------------------------------------------------------

OBJECT_FEATURES = {
    "shape": datasets.Value("string"),
    "color": datasets.Value("string"),
    "size": datasets.Value("string"),
    "row": datasets.Value("int8"),
    "col": datasets.Value("int8"),
    "position": datasets.Value("string"),
    # offset of the object's center from its cell center, in cell units (layout jitter)
    "dx": datasets.Value("float64"),
    "dy": datasets.Value("float64"),
}
RELATION_FEATURES = {
    "subject": datasets.Value("int8"),
    "relation": datasets.Value("string"),
    "object": datasets.Value("int8"),
}
SCENE_FEATURES = {
    "kind": datasets.Value("string"),
    "background": datasets.Value("string"),
    "objects": datasets.List(OBJECT_FEATURES),
    "relations": datasets.List(RELATION_FEATURES),
}
FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "text": datasets.Value("string"),
        "captions": datasets.List(datasets.Value("string")),
        "scene": SCENE_FEATURES,
    }
)

# --------------------------------------------------------------------------------------------
# Options and hold-out
# --------------------------------------------------------------------------------------------

_WORD_ATTRIBUTE: dict[str, str] = {
    **{shape: "shape" for shape in SHAPES},
    **{color: "color" for color in COLORS},
    **{size: "size" for size in SIZES},
}


def parse_holdout(holdout: Sequence[str]) -> tuple[dict[str, str], ...]:
    """Parse hold-out entries such as ``"purple triangle"`` into ``{"color": "purple", "shape": "triangle"}``.

    Each entry is a combination of attribute words (colors, shapes, sizes), at most one of each
    kind; an object is held out when it matches every word of some entry.
    """
    if isinstance(holdout, str):
        raise ValueError(
            f"holdout must be a list of attribute combinations such as ['purple triangle'], got the single "
            f"string {holdout!r}"
        )
    parsed = []
    for entry in holdout:
        if not isinstance(entry, str) or not entry.split():
            raise ValueError(f"holdout entry {entry!r} must be a non-empty string of attribute words")
        combination: dict[str, str] = {}
        for word in entry.lower().split():
            attribute = _WORD_ATTRIBUTE.get(word)
            if attribute is None:
                raise ValueError(
                    f"holdout entry {entry!r}: unknown word {word!r}; known words are the colors "
                    f"{', '.join(COLORS)}, the shapes {', '.join(SHAPES)} and the sizes {', '.join(SIZES)}"
                )
            if attribute in combination:
                raise ValueError(
                    f"holdout entry {entry!r} names two {attribute}s ({combination[attribute]!r} and {word!r}); "
                    f"an object has one {attribute}, so this entry could never match"
                )
            combination[attribute] = word
        parsed.append(combination)
    return tuple(parsed)


def is_held_out(attributes: Mapping[str, Any], holdout: Sequence[Mapping[str, str]]) -> bool:
    """Whether an object (a mapping with ``shape``/``color``/``size``) matches every word of a parsed entry."""
    return any(all(attributes.get(key) == value for key, value in entry.items()) for entry in holdout)


@dataclass(frozen=True)
class ShapesOptions:
    """Generation options (see :func:`make_shapes_dataset` for their meaning); build them with
    :meth:`create`, which checks them."""

    min_objects: int = 1
    max_objects: int = 3
    holdout: tuple[str, ...] = ()
    mixture: tuple[tuple[str, float], ...] = tuple(DEFAULT_MIXTURE.items())
    captions_per_image: int = 5
    jitter: bool = True
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    full_caption: bool = False
    full_caption_order: str = "reading"
    count_only_captions: bool = False

    @functools.cached_property
    def allowed_objects(self) -> tuple[tuple[str, str, str], ...]:
        """Every (shape, color, size) that the hold-out does not leave out."""
        parsed = parse_holdout(self.holdout)
        return tuple(
            (shape, color, size)
            for shape, color, size in itertools.product(SHAPES, COLORS, SIZES)
            if not is_held_out({"shape": shape, "color": color, "size": size}, parsed)
        )

    @classmethod
    def create(
        cls,
        min_objects: int = 1,
        max_objects: int = 3,
        holdout: Sequence[str] = (),
        mixture: Mapping[str, float] | None = None,
        captions_per_image: int = 5,
        jitter: bool = True,
        backgrounds: Sequence[str] | None = None,
        full_caption: bool = False,
        full_caption_order: str = "reading",
        count_only_captions: bool = False,
    ) -> ShapesOptions:
        """Check every option and return them frozen; raises ``ValueError`` naming the bad one."""
        if not (isinstance(min_objects, int) and isinstance(max_objects, int) and 1 <= min_objects <= max_objects <= 3):
            raise ValueError(
                f"min_objects and max_objects must be integers with 1 <= min_objects <= max_objects <= 3, "
                f"got min_objects={min_objects!r}, max_objects={max_objects!r}"
            )
        parse_holdout(holdout)  # raises on unknown words
        allowed = cls(holdout=tuple(holdout)).allowed_objects
        if not allowed:
            raise ValueError(f"holdout {list(holdout)!r} leaves out every object; nothing could be drawn")

        mixture = dict(DEFAULT_MIXTURE if mixture is None else mixture)
        unknown = sorted(set(mixture) - set(SCENE_KINDS))
        if unknown:
            raise ValueError(f"mixture: unknown scene kind(s) {unknown}; known kinds are {list(SCENE_KINDS)}")
        if any(not isinstance(weight, (int, float)) or weight < 0 for weight in mixture.values()):
            raise ValueError(f"mixture weights must be non-negative numbers, got {mixture}")
        kind_objects = {"single": {1}, "count": {2, 3}, "relation": {2}, "multi": {3}}
        usable = {
            kind: float(mixture.get(kind, 0.0))
            for kind in SCENE_KINDS
            if kind_objects[kind] & set(range(min_objects, max_objects + 1))
        }
        if len({(shape, color) for shape, color, _ in allowed}) < 2:
            usable.pop("relation", None)  # a relation needs two distinguishable objects
        if not any(weight > 0 for weight in usable.values()):
            raise ValueError(
                f"mixture {mixture} gives no weight to any scene kind possible with "
                f"min_objects={min_objects}, max_objects={max_objects} (single: 1 object, count: 2-3, "
                f"relation: 2, multi: 3)"
            )
        if not isinstance(captions_per_image, int) or captions_per_image < 1:
            raise ValueError(f"captions_per_image must be a positive integer, got {captions_per_image!r}")
        if full_caption_order not in FULL_CAPTION_ORDERS:
            raise ValueError(f"full_caption_order must be one of {list(FULL_CAPTION_ORDERS)}, got {full_caption_order!r}")
        backgrounds = tuple(BACKGROUNDS if backgrounds is None else backgrounds)
        bad = [name for name in backgrounds if name not in BACKGROUNDS]
        if bad or not backgrounds:
            raise ValueError(f"backgrounds must be a non-empty subset of {list(BACKGROUNDS)}, got {list(backgrounds)}")
        return cls(
            min_objects=min_objects,
            max_objects=max_objects,
            holdout=tuple(holdout),
            mixture=tuple((kind, weight) for kind, weight in usable.items() if weight > 0),
            captions_per_image=captions_per_image,
            jitter=bool(jitter),
            backgrounds=backgrounds,
            full_caption=bool(full_caption),
            full_caption_order=full_caption_order,
            count_only_captions=bool(count_only_captions),
        )


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


def scene_relations(objects: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every pairwise relation that holds between objects in distinct grid cells.

    ``i left of j`` when i's column is left of j's, ``i above j`` when i's row is above j's (both can
    hold for diagonal neighbours). Objects stay inside their cells, so a relation between cells is
    never ambiguous in the pixels.
    """
    relations = []
    for i, subject in enumerate(objects):
        for j, other in enumerate(objects):
            if i == j:
                continue
            if subject["col"] < other["col"]:
                relations.append({"subject": i, "relation": "left of", "object": j})
            if subject["col"] > other["col"]:
                relations.append({"subject": i, "relation": "right of", "object": j})
            if subject["row"] < other["row"]:
                relations.append({"subject": i, "relation": "above", "object": j})
            if subject["row"] > other["row"]:
                relations.append({"subject": i, "relation": "below", "object": j})
    return relations


def make_scene(
    objects: Sequence[Mapping[str, Any]], background: str = "white", kind: str | None = None
) -> dict[str, Any]:
    """Build a complete, validated scene from objects given as ``shape``, ``color``, ``size`` and
    either ``position`` (a phrase of :data:`POSITIONS`) or ``row``/``col``; ``dx``/``dy`` default to 0.

    Objects are sorted in reading order (top to bottom, left to right) and relations are filled in.
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {list(BACKGROUNDS)}")
    if not 1 <= len(objects) <= MAX_OBJECTS:
        raise ValueError(f"a scene has 1 to {MAX_OBJECTS} objects, got {len(objects)}")
    complete = []
    for obj in objects:
        if obj.get("shape") not in SHAPES or obj.get("color") not in COLORS or obj.get("size") not in SIZES:
            raise ValueError(
                f"object {dict(obj)} needs shape in {list(SHAPES)}, color in {list(COLORS)}, size in {list(SIZES)}"
            )
        if obj.get("position") is not None:
            if obj["position"] not in POSITIONS:
                raise ValueError(f"unknown position {obj['position']!r}; expected one of {list(POSITIONS)}")
            row, col = POSITIONS[obj["position"]]
        elif obj.get("row") is not None and obj.get("col") is not None:
            row, col = int(obj["row"]), int(obj["col"])
            if (row, col) not in POSITION_NAMES:
                raise ValueError(f"row and col must be in 0..{GRID - 1}, got row={row}, col={col}")
        else:
            raise ValueError(f"object {dict(obj)} needs a position (one of {list(POSITIONS)}) or row and col")
        max_shift = (1.0 - SIZE_FRACTIONS[obj["size"]]) / 2
        if max(abs(obj.get("dx", 0.0)), abs(obj.get("dy", 0.0))) > max_shift:
            raise ValueError(
                f"object {dict(obj)}: a {obj['size']} object stays inside its cell only with "
                f"|dx|, |dy| <= {max_shift:.3f}"
            )
        complete.append(
            {
                "shape": obj["shape"],
                "color": obj["color"],
                "size": obj["size"],
                "row": row,
                "col": col,
                "position": POSITION_NAMES[(row, col)],
                "dx": float(obj.get("dx", 0.0)),
                "dy": float(obj.get("dy", 0.0)),
            }
        )
    cells = [(obj["row"], obj["col"]) for obj in complete]
    if len(set(cells)) != len(cells):
        raise ValueError(f"objects must occupy distinct grid cells, got cells {cells}")
    complete.sort(key=lambda obj: (obj["row"], obj["col"]))
    if kind is None:  # as the captions see it: n objects of one color and shape are a count
        if len(complete) == 1:
            kind = "single"
        elif len({(obj["color"], obj["shape"]) for obj in complete}) == 1:
            kind = "count"
        else:
            kind = "relation" if len(complete) == 2 else "multi"
    if kind not in SCENE_KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {list(SCENE_KINDS)}")
    return {"kind": kind, "background": background, "objects": complete, "relations": scene_relations(complete)}


def _jitter(size: str, rng: random.Random) -> float:
    """A random offset of an object's center within its cell, keeping the margin to the cell border."""
    max_shift = max(0.0, (1.0 - SIZE_FRACTIONS[size]) / 2 - _CELL_MARGIN)
    return round(rng.uniform(-max_shift, max_shift) * 64) / 64  # quantized: exact in any float format


def sample_scene(rng: random.Random, options: ShapesOptions) -> dict[str, Any]:
    """Draw one scene: its kind from the mixture, then background, cells and objects."""
    kinds, weights = zip(*options.mixture)
    kind = rng.choices(kinds, weights=weights)[0]
    background = rng.choice(options.backgrounds)
    if kind == "count":
        counts = [n for n in (2, 3) if options.min_objects <= n <= options.max_objects]
        count = counts[0] if len(counts) == 1 else (2 if rng.random() < 0.6 else 3)
    else:
        count = {"single": 1, "relation": 2, "multi": 3}[kind]
    cells = rng.sample(range(GRID * GRID), count)

    allowed = options.allowed_objects
    if kind == "count":
        picked = [rng.choice(allowed)] * count
    elif kind == "relation":
        first = rng.choice(allowed)
        # the two must differ in color or shape, so that each is named unambiguously in a caption
        others = [obj for obj in allowed if obj[:2] != first[:2]]
        picked = [first, rng.choice(others)]
    else:
        picked = [rng.choice(allowed) for _ in range(count)]

    objects = []
    for (shape, color, size), cell in zip(picked, cells):
        dx = _jitter(size, rng) if options.jitter else 0.0
        dy = _jitter(size, rng) if options.jitter else 0.0
        row, col = divmod(cell, GRID)
        objects.append({"shape": shape, "color": color, "size": size, "row": row, "col": col, "dx": dx, "dy": dy})
    return make_scene(objects, background, kind)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def render_scene(scene: Mapping[str, Any], image_size: int = 64, supersample: int | None = None) -> Image.Image:
    """Draw a scene with PIL ImageDraw: flat shapes on a plain background, anti-aliased.

    Shapes are drawn at ``supersample`` times the size and box-downsampled (default: 4x up to
    256 px, fewer above), which gives clean anti-aliased edges. Every shape fills a square bounding
    box of edge ``SIZE_FRACTIONS[size]`` cells centred in its cell (plus its ``dx``/``dy`` offset);
    triangles point up.
    """
    if not isinstance(image_size, int) or image_size < 24:
        raise ValueError(f"image_size must be an integer >= 24 (objects would be unreadable below), got {image_size!r}")
    factor = supersample if supersample is not None else max(1, min(4, 1024 // image_size))
    canvas_size = image_size * factor
    image = Image.new("RGB", (canvas_size, canvas_size), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(image)
    cell = canvas_size / GRID
    for obj in scene["objects"]:
        half = SIZE_FRACTIONS[obj["size"]] * cell / 2
        center_x = (obj["col"] + 0.5 + obj.get("dx", 0.0)) * cell
        center_y = (obj["row"] + 0.5 + obj.get("dy", 0.0)) * cell
        left, top, right, bottom = center_x - half, center_y - half, center_x + half, center_y + half
        color = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse((left, top, right, bottom), fill=color)
        elif obj["shape"] == "square":
            draw.rectangle((left, top, right, bottom), fill=color)
        elif obj["shape"] == "triangle":
            draw.polygon([(center_x, top), (right, bottom), (left, bottom)], fill=color)
        else:
            raise ValueError(f"unknown shape {obj['shape']!r}; expected one of {list(SHAPES)}")
    if factor > 1:
        image = image.reduce(factor)  # box filter: the mean of each factor x factor block
    return image


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(
    shape: str | None = None, color: str | None = None, size: str | None = None, count: int = 1
) -> str:
    """``"a small red circle"``, ``"an orange shape"``, ``"two green triangles"``.

    A missing shape reads "shape"; missing color or size are left out.
    """
    words = [word for word in (size, color) if word] + [shape or "shape"]
    if count == 1:
        return f"{_article(words[0])} {' '.join(words)}"
    return f"{NUMBER_WORDS[count]} {' '.join(words)}s"


def _join(phrases: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _groups(objects: Sequence[Mapping[str, Any]], attributes: tuple[str, ...]) -> list[tuple[dict[str, str], int]]:
    """Objects grouped by the given attributes, in order of first appearance, with their counts."""
    groups: dict[tuple[str, ...], int] = {}
    for obj in objects:
        key = tuple(obj[attribute] for attribute in attributes)
        groups[key] = groups.get(key, 0) + 1
    return [(dict(zip(attributes, key)), count) for key, count in groups.items()]


def _list_phrases(objects: Sequence[Mapping[str, Any]], attributes: tuple[str, ...]) -> list[str]:
    """Every ordering of the grouped noun phrases joined into one list phrase."""
    phrases = [noun_phrase(count=count, **group) for group, count in _groups(objects, attributes)]
    return [_join(order) for order in itertools.permutations(phrases)]


def caption_families(scene: Mapping[str, Any], count_only: bool = False) -> list[list[str]]:
    """All truthful captions of a scene, by template family.

    Each inner list holds every rendering of one template (e.g. both orders of "A and B"). All of
    them describe the scene truthfully; a family may name only some attributes ("a circle",
    "a red shape", "a red circle and a blue square" without positions).

    With ``count_only``, one more family names nothing but how many objects there are ("a shape", "two
    shapes", "three shapes"), so that such a caption means something to the model trained on it: the
    reference that guidance steers away from (``sample.negative_prompt: a shape``) is then a caption it
    has learned, one object of any color and shape, rather than words it has only seen inside others.
    """
    objects = scene["objects"]
    background = scene["background"]
    on_background = f"on a {background} background"
    families: list[list[str]] = [[noun_phrase(count=len(objects))]] if count_only else []
    if len(objects) == 1:
        (obj,) = objects
        cs = noun_phrase(obj["shape"], obj["color"])
        zcs = noun_phrase(obj["shape"], obj["color"], obj["size"])
        position = obj["position"]
        families += [
            [cs],
            [zcs],
            [f"{cs} {position}"],
            [f"{zcs} {position}"],
            [f"a photo of {cs}"],
            [f"a photo of {zcs} {position}"],
            [f"there is {cs} {position}"],
            [f"{cs} {on_background}"],
            # partial descriptions: shape only, color only
            [noun_phrase(obj["shape"])],
            [f"{noun_phrase(obj['shape'])} {on_background}"],
            [noun_phrase(color=obj["color"])],
            [f"{noun_phrase(color=obj['color'])} {on_background}"],
        ]
        return families

    kinds = {(obj["color"], obj["shape"]) for obj in objects}
    if len(kinds) == 1:  # n identical objects in different cells: a count
        count = len(objects)
        first = objects[0]
        ncs = noun_phrase(first["shape"], first["color"], count=count)
        families += [
            [ncs],
            [f"a photo of {ncs}"],
            [f"there are {ncs}"],
            [f"{ncs} {on_background}"],
            [noun_phrase(first["shape"], count=count)],
        ]
        if len({obj["size"] for obj in objects}) == 1:
            nzcs = noun_phrase(first["shape"], first["color"], first["size"], count=count)
            families += [[nzcs], [f"{nzcs} {on_background}"]]
        return families

    if len(objects) == 2:  # two distinguishable objects: relations and conjunctions
        relation_plain, relation_sized, relation_photo, relation_there = [], [], [], []
        for relation in scene["relations"]:
            subject, other = objects[relation["subject"]], objects[relation["object"]]
            phrase = RELATION_PHRASES[relation["relation"]]
            a, b = noun_phrase(subject["shape"], subject["color"]), noun_phrase(other["shape"], other["color"])
            az = noun_phrase(subject["shape"], subject["color"], subject["size"])
            bz = noun_phrase(other["shape"], other["color"], other["size"])
            relation_plain.append(f"{a} {phrase} {b}")
            relation_sized.append(f"{az} {phrase} {bz}")
            relation_photo.append(f"a photo of {a} {phrase} {b}")
            relation_there.append(f"there is {a} {phrase} {b}")
        families += [relation_plain, relation_sized, relation_photo, relation_there]
        pairs = [(objects[0], objects[1]), (objects[1], objects[0])]
        families += [
            [f"{noun_phrase(a['shape'], a['color'])} and {noun_phrase(b['shape'], b['color'])}" for a, b in pairs],
            [
                f"{noun_phrase(a['shape'], a['color'], a['size'])} and {noun_phrase(b['shape'], b['color'], b['size'])}"
                for a, b in pairs
            ],
            [
                f"{noun_phrase(a['shape'], a['color'])} {a['position']} and "
                f"{noun_phrase(b['shape'], b['color'])} {b['position']}"
                for a, b in pairs
            ],
            [
                f"a photo of {noun_phrase(a['shape'], a['color'])} and {noun_phrase(b['shape'], b['color'])}"
                for a, b in pairs
            ],
        ]
        return families

    # three objects: lists of what is there
    by_kind = _list_phrases(objects, ("shape", "color"))
    families += [
        by_kind,
        _list_phrases(objects, ("shape", "color", "size")),
        [
            _join([f"{noun_phrase(obj['shape'], obj['color'])} {obj['position']}" for obj in order])
            for order in itertools.permutations(objects)
        ],
        [f"a photo of {phrase}" for phrase in by_kind],
        [f"{'there is' if phrase.startswith('a') else 'there are'} {phrase}" for phrase in by_kind],
        [f"{phrase} {on_background}" for phrase in by_kind],
    ]
    return families


def full_caption(scene: Mapping[str, Any], rng: random.Random | None = None) -> str:
    """The scene's whole description: every object with size, color, shape and position, and the background.

    ``"a small red circle at the top left on a white background"``, ``"two large green triangles at the top
    and in the center on a black background"``, ``"a small red circle on the left and a large blue square at
    the bottom right on a gray background"``. Dense captions teach a text-to-image model faster than partial
    ones (Betker et al. 2023, "Improving Image Generation with Better Captions", DALL-E 3): every attribute
    the image shows is named, so none is left for the model to guess.

    Without ``rng`` the objects are named in reading order (top to bottom, left to right), so the first
    named is never below the second; with ``rng`` in a random order, so that the order of mention says
    nothing of the layout and only the place words do.
    """
    objects = list(scene["objects"])
    if rng is not None:
        rng.shuffle(objects)
    on_background = f"on a {scene['background']} background"
    if len(objects) > 1 and len({(obj["color"], obj["shape"]) for obj in objects}) == 1:  # a count
        first = objects[0]
        size = first["size"] if len({obj["size"] for obj in objects}) == 1 else None
        phrase = noun_phrase(first["shape"], first["color"], size, count=len(objects))
        return f"{phrase} {_join([obj['position'] for obj in objects])} {on_background}"
    described = [f"{noun_phrase(obj['shape'], obj['color'], obj['size'])} {obj['position']}" for obj in objects]
    return f"{_join(described)} {on_background}"


def all_scene_captions(scene: Mapping[str, Any], count_only: bool = False) -> list[str]:
    """Every caption the templates can write for a scene (deduplicated, in template order)."""
    return list(dict.fromkeys(caption for family in caption_families(scene, count_only) for caption in family))


def scene_captions(
    scene: Mapping[str, Any],
    rng: random.Random,
    k: int = 5,
    full: bool = False,
    full_order: str = "reading",
    count_only: bool = False,
) -> list[str]:
    """Up to ``k`` different captions of a scene, from ``k`` different template families chosen at random;
    with ``full``, the first is always :func:`full_caption`, naming the objects in reading order or, with
    ``full_order="random"``, in a random one; ``count_only`` adds the family that names only the number of
    objects (:func:`caption_families`)."""
    if full_order not in FULL_CAPTION_ORDERS:
        raise ValueError(f"full_order must be one of {list(FULL_CAPTION_ORDERS)}, got {full_order!r}")
    families = caption_families(scene, count_only)
    rng.shuffle(families)
    captions: list[str] = [full_caption(scene, rng if full_order == "random" else None)] if full else []
    for family in families:
        if len(captions) >= k:  # checked before drawing: with k=1 and full, the description alone
            break
        caption = rng.choice(family)
        if caption not in captions:
            captions.append(caption)
    return captions


# Longest phrase first, so that "at the top left" is not read as "at the top".
POSITION_PATTERN = re.compile(r"\b(" + "|".join(sorted(POSITIONS, key=len, reverse=True)) + r")\b")
_RELATION_FLIPS = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
                   "below": "above"}
_RELATION_PATTERN = re.compile(r"\b(" + "|".join(_RELATION_FLIPS) + r")\b")


def hard_negative_captions(caption: str, rng: random.Random) -> dict[str, str]:
    """False captions that differ from ``caption`` in one place or one binding: NegCLIP's hard negatives
    (Yuksekgonul et al. 2023, "When and why vision-language models behave like bags-of-words, and what to do
    about it", Sec. 4). Contrasted with the true caption, they make a text encoder tell apart what in-batch
    negatives rarely do: an object's column, a relation's direction, which color goes with which shape.

    Up to two, keyed by kind, each only where the caption has what it changes:

    - *place*: one position phrase changed to another the caption does not name ("at the top left" ->
      "on the right"), or else a relation flipped ("to the left of" -> "to the right of", "above" -> "below");
    - *binding*: the first two different color words swapped ("a red circle and a blue square" -> "a blue
      circle and a red square"), unless the swap says the same thing (the two colors name alike objects,
      "a red circle and a blue circle", and no place or relation tells them apart).

    Captions outside the shapes vocabulary get none.
    """
    negatives = {}
    places, relation = list(POSITION_PATTERN.finditer(caption)), _RELATION_PATTERN.search(caption)
    if places:
        chosen = rng.choice(places)
        others = [name for name in POSITIONS if name not in {match.group(0) for match in places}]
        negatives["place"] = caption[: chosen.start()] + rng.choice(others) + caption[chosen.end():]
    elif relation:
        negatives["place"] = caption[: relation.start()] + _RELATION_FLIPS[relation.group(0)] + caption[relation.end():]
    words = caption.split(" ")
    colored = [i for i, word in enumerate(words) if word in COLORS]
    told_apart = bool(places or relation)

    def around(k: int) -> tuple[str, str]:  # the words beside a color: size or article before, shape after
        before, after = words[k - 1] if k else "", words[k + 1].rstrip(",") if k + 1 < len(words) else ""
        return ("a" if before == "an" else before), after

    pairs = [(i, j) for i in colored for j in colored if i < j and words[i] != words[j]]
    swappable = [(i, j) for i, j in pairs if told_apart or around(i) != around(j)]
    if swappable:
        i, j = swappable[0]
        words[i], words[j] = words[j], words[i]
        for k in (i, j):  # "an orange" swapped with "a red" reads "a orange", a giveaway of a negative
            if k and words[k - 1] in ("a", "an"):
                words[k - 1] = _article(words[k])
        negatives["binding"] = " ".join(words)
    return negatives


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


def sample_rng(seed: int, index: int) -> random.Random:
    """The random stream of sample ``index``: a function of (seed, index) only.

    Python's ``random`` with a string seed is stable across platforms and Python versions (seeded
    through SHA-512), unlike NumPy's Generator streams, which may change between releases.
    """
    return random.Random(f"latentdiff-shapes/{seed}/{index}")


def make_shapes_sample(index: int, seed: int, image_size: int, options: ShapesOptions) -> dict[str, Any]:
    """One sample: ``{"image": PIL image, "text", "captions", "scene"}``; a function of its arguments only."""
    rng = sample_rng(seed, index)
    scene = sample_scene(rng, options)
    captions = scene_captions(
        scene,
        rng,
        options.captions_per_image,
        full=options.full_caption,
        full_order=options.full_caption_order,
        count_only=options.count_only_captions,
    )
    return {"image": render_scene(scene, image_size), "text": captions[0], "captions": captions, "scene": scene}


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_shapes_dataset(
    num_samples: int,
    seed: int = 0,
    image_size: int = 64,
    *,
    min_objects: int = 1,
    max_objects: int = 3,
    holdout: Sequence[str] = (),
    mixture: Mapping[str, float] | None = None,
    captions_per_image: int = 5,
    jitter: bool = True,
    backgrounds: Sequence[str] | None = None,
    full_caption: bool = False,
    full_caption_order: str = "reading",
    count_only_captions: bool = False,
    progress_bar: bool | None = None,
) -> datasets.Dataset:
    """The captioned shapes as a :class:`datasets.Dataset`.

    Columns: ``image`` (:class:`datasets.Image`, RGB ``image_size`` squared, PNG-encoded), ``text``
    (one caption), ``captions`` (several different truthful captions; a loader may pick one per
    step) and ``scene`` (background, objects with shape/color/size/row/col/position, and the
    pairwise relations that hold; see :data:`FEATURES`).

    Args:
        num_samples: number of images.
        seed: sample ``i`` is a function of ``(seed, i)`` and the options, not of ``num_samples``.
        image_size: edge in pixels (>= 24).
        min_objects, max_objects: objects per image, within 1..3.
        holdout: attribute combinations never drawn, e.g. ``["purple triangle", "large blue"]``: no
            object matches every word of an entry (it is re-drawn). For measuring generalization to
            combinations never seen in training.
        mixture: weights of the scene kinds ``single`` (one object), ``count`` (2-3 identical
            objects), ``relation`` (two different objects), ``multi`` (three objects); default
            :data:`DEFAULT_MIXTURE`. Kinds impossible under min/max_objects are dropped.
        captions_per_image: captions in ``captions`` (fewer when a scene has fewer templates).
        jitter: shift objects randomly within their cells (never across a cell border).
        backgrounds: background names to draw from (default all of :data:`BACKGROUNDS`).
        full_caption: make each image's first caption its whole description (:func:`full_caption`).
        full_caption_order: the order in which that description names the objects: ``"reading"`` (top to
            bottom, left to right) or ``"random"`` (drawn per image, so that the order says nothing of the
            layout).
        count_only_captions: also write captions that name only the number of objects ("a shape", "two
            shapes"; :func:`caption_families`).
        progress_bar: show a progress bar (default: for 2,000 samples or more).
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(image_size, int) or image_size < 24:
        raise ValueError(f"image_size must be an integer >= 24, got {image_size!r}")
    options = ShapesOptions.create(
        min_objects=min_objects,
        max_objects=max_objects,
        holdout=holdout,
        mixture=mixture,
        captions_per_image=captions_per_image,
        jitter=jitter,
        backgrounds=backgrounds,
        full_caption=full_caption,
        full_caption_order=full_caption_order,
        count_only_captions=count_only_captions,
    )
    from tqdm.auto import tqdm

    columns: dict[str, list[Any]] = {"image": [], "text": [], "captions": [], "scene": []}
    show = num_samples >= 2000 if progress_bar is None else progress_bar
    for index in tqdm(range(num_samples), desc="shapes", disable=not show, leave=False):
        sample = make_shapes_sample(index, seed, image_size, options)
        columns["image"].append({"bytes": _png_bytes(sample["image"]), "path": None})
        for name in ("text", "captions", "scene"):
            columns[name].append(sample[name])
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def iter_shapes_samples(
    seed: int = 0, image_size: int = 64, start: int = 0, **options: Any
) -> Iterator[dict[str, Any]]:
    """Endless stream of samples ``start, start + 1, ...`` (PIL images), same options as :func:`make_shapes_dataset`."""
    checked = ShapesOptions.create(**options)
    for index in itertools.count(start):
        yield make_shapes_sample(index, seed, image_size, checked)


def save_as_imagefolder(dataset: datasets.Dataset, folder: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Write a captioned dataset as PNG files plus ``metadata.jsonl``, the layout that
    ``datasets.load_dataset("imagefolder", data_dir=folder)`` reads back.

    Each metadata line holds ``file_name``, ``text``, ``captions`` and, when the dataset has one,
    ``scene``. Refuses a folder that already holds files unless ``overwrite``.
    """
    missing = [column for column in ("image", "text") if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"dataset lacks column(s) {missing}; expected image and text (columns: {dataset.column_names})"
        )
    folder = os.fspath(folder)
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        raise FileExistsError(f"{folder} already exists and is not empty; choose a new folder or pass overwrite=True")
    os.makedirs(folder, exist_ok=True)
    from tqdm.auto import tqdm

    raw = dataset.cast_column("image", datasets.Image(decode=False))  # encoded bytes, no re-encoding
    digits = max(6, len(str(len(raw) - 1)))
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as metadata:
        for index, row in enumerate(tqdm(raw, desc="writing", disable=len(raw) < 2000, leave=False)):
            file_name = f"{index:0{digits}d}.png"
            image = row["image"]
            if image.get("bytes") is not None and image["bytes"][:8] == b"\x89PNG\r\n\x1a\n":
                with open(os.path.join(folder, file_name), "wb") as handle:
                    handle.write(image["bytes"])
            else:  # another format, or a file on disk: decode and write PNG
                source = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image["path"]
                with Image.open(source) as decoded:
                    decoded.convert("RGB").save(os.path.join(folder, file_name), format="PNG")
            record: dict[str, Any] = {"file_name": file_name, "text": row["text"]}
            if "captions" in row:
                record["captions"] = list(row["captions"])
            if "scene" in row:
                record["scene"] = row["scene"]
            metadata.write(json.dumps(record) + "\n")

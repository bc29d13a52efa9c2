"""The rule-based judge and the shapes prompt suite."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from latentdiff.data.shapes import (
    COLORS,
    POSITIONS,
    SHAPES,
    ShapesOptions,
    all_scene_captions,
    is_held_out,
    make_scene,
    make_shapes_sample,
    parse_holdout,
    render_scene,
)
from latentdiff.eval.judge import (
    RECONSTRUCTION_SEED,
    UNKNOWN,
    degrade,
    judge_agreement,
    judge_image,
    judge_render,
    reconstruction_agreement,
    scene_differences,
    shape_outcomes,
)
from latentdiff.eval.suite import (
    DEFAULT_HOLDOUT,
    SEEN_TASKS,
    TASKS,
    PromptSpec,
    check_prompt,
    evaluate_image,
    example_scene,
    failure_reason,
    has_right_count,
    shapes_suite,
    summarize,
)

# ---- the judge ----------------------------------------------------------------------------


def test_judge_agrees_with_ground_truth_on_2000_scenes():
    report = judge_agreement(2000, seed=5)
    assert report["num_scenes"] == 2000
    assert report["agreement"] >= 0.99, report["mismatches"][:5]


def test_judge_tolerates_blur_and_noise():
    report = judge_agreement(300, seed=6, blur_radius=0.7, noise_std=5.0)
    assert report["agreement"] >= 0.97, report["mismatches"][:5]


def test_reconstruction_agreement_judges_what_the_reconstruction_shows():
    options = ShapesOptions.create()
    for image_size in (32, 64):  # the tiny config's resolution and the presets'
        report = reconstruction_agreement(lambda images: images, num_scenes=64, image_size=image_size)
        objects = Counter(obj["size"] for i in range(64)
                          for obj in make_shapes_sample(i, RECONSTRUCTION_SEED, image_size, options)["scene"]["objects"])
        assert report == {"agreement": 1.0, "agreed": 64, "num_scenes": 64, "differences": {},
                          "shapes_by_size": {"large": {"same shape": objects["large"]}, "small": {"same shape": objects["small"]}}}
        assert min(objects.values()) > 20

    def blank(images):  # every pixel the color of the top-left corner (background): the objects are lost
        return np.broadcast_to(images[:, :1, :1], images.shape).copy()

    report = reconstruction_agreement(blank, num_scenes=20, batch_size=8)
    assert {key: report[key] for key in ("agreement", "agreed", "differences")} == {"agreement": 0.0, "agreed": 0, "differences": {"objects": 20}}
    assert all(set(outcomes) == {"missing"} for outcomes in report["shapes_by_size"].values())

    scenes = [make_shapes_sample(i, RECONSTRUCTION_SEED, 64, options)["scene"] for i in range(64)]

    def small_objects_as_squares(images):  # a decoder that renders every small object as a square
        squared = [{**scene, "objects": [{**obj, "shape": "square"} if obj["size"] == "small" else obj for obj in scene["objects"]]}
                   for scene in scenes]
        return np.stack([np.asarray(render_scene(scene, 64)) for scene in squared])

    small_shapes = Counter(obj["shape"] for scene in scenes for obj in scene["objects"] if obj["size"] == "small")
    large_objects = sum(obj["size"] == "large" for scene in scenes for obj in scene["objects"])
    report = reconstruction_agreement(small_objects_as_squares, num_scenes=64)
    assert report["shapes_by_size"] == {
        "large": {"same shape": large_objects},
        "small": {"same shape": small_shapes["square"], "another shape": small_shapes["circle"] + small_shapes["triangle"]}}
    assert report["differences"] == {"objects": sum(any(obj["size"] == "small" and obj["shape"] != "square" for obj in scene["objects"])
                                                    for scene in scenes)}

    def red_for_blue(images):  # a hue shift: the red and blue channels swapped
        return images[..., ::-1].copy()

    report = reconstruction_agreement(red_for_blue, num_scenes=64)
    assert report["agreement"] < 0.5 and report["differences"]["objects"] > 32
    with pytest.raises(ValueError, match=r"uint8 images shaped like its input \(4, 64, 64, 3\), got float32"):
        reconstruction_agreement(lambda images: images.astype(np.float32), num_scenes=4)


def test_shape_outcomes_compare_each_object_with_its_grid_cell():
    scene = make_scene([{"shape": "triangle", "color": "red", "size": "small", "position": "at the top left"},
                        {"shape": "square", "color": "blue", "size": "large", "position": "at the bottom right"}])
    assert shape_outcomes(judge_render(scene), scene) == [("small", "same shape"), ("large", "same shape")]
    circles = make_scene([{**obj, "shape": "circle"} for obj in scene["objects"]])
    assert shape_outcomes(judge_render(circles), scene) == [("small", "another shape"), ("large", "another shape")]
    only_the_square = make_scene([scene["objects"][1]])
    assert shape_outcomes(judge_render(only_the_square), scene) == [("small", "missing"), ("large", "same shape")]
    moved = make_scene([{**scene["objects"][0], "position": "at the bottom left"}, scene["objects"][1]])
    assert shape_outcomes(judge_render(moved), scene)[0] == ("small", "missing")  # read in another cell: not this object


def test_judge_reads_every_color_and_shape_in_every_size():
    for color in COLORS:
        for shape in SHAPES:
            for size, background in (("small", "white"), ("large", "black")):
                obj = {"shape": shape, "color": color, "size": size, "position": "in the center"}
                scene = make_scene([obj], background)
                judged = judge_render(scene)
                assert scene_differences(judged, scene) == []
                (seen,) = judged.objects
                assert seen.color_distance < 20 and seen.shape_iou > 0.8


def test_judge_counts_relations_and_report():
    scene = make_scene(
        [
            {"shape": "triangle", "color": "green", "size": "small", "position": "at the top left"},
            {"shape": "triangle", "color": "green", "size": "large", "position": "at the bottom right"},
            {"shape": "square", "color": "orange", "size": "large", "position": "on the right"},
        ],
        "gray",
    )
    judged = judge_render(scene)
    assert judged.background == "gray"
    assert judged.counts == {("green", "triangle"): 2, ("orange", "square"): 1}
    # objects come in reading order: green (0,0), orange (1,2), green (2,2)
    assert (0, "left of", 1) in judged.relations and (1, "above", 2) in judged.relations
    assert (1, "left of", 2) not in judged.relations  # same column: neither left nor right
    report = judged.to_dict()
    assert report["counts"] == {"green triangle": 2, "orange square": 1}
    assert [obj["position"] for obj in report["objects"]] == ["at the top left", "on the right", "at the bottom right"]


def test_judge_drops_specks_and_flags_unknown_colors_and_blobs():
    scene = make_scene([{"shape": "circle", "color": "blue", "size": "large", "position": "at the top"}])
    pixels = np.asarray(render_scene(scene, 64)).copy()
    pixels[50:52, 5:7] = COLORS["red"]  # a 4-pixel speck
    pixels[44:58, 40:54] = (120, 80, 40)  # a brown square: no palette color
    judged = judge_image(Image.fromarray(pixels))
    assert judged.specks == 1
    assert [(obj.color, obj.shape) for obj in judged.objects] == [("blue", "circle"), (UNKNOWN, "square")]

    elongated = np.full((64, 64, 3), 255, dtype=np.uint8)
    elongated[30:36, 4:60] = COLORS["green"]  # a bar: no shape of the data is this long
    (bar,) = judge_image(elongated).objects
    assert bar.color == "green" and bar.shape == UNKNOWN


def test_judge_accepts_arrays_and_rejects_other_input():
    scene = make_scene([{"shape": "square", "color": "yellow", "size": "small", "position": "at the bottom left"}], "gray")
    image = render_scene(scene, 64)
    as_float = np.asarray(image, dtype=np.float32) / 255.0
    assert scene_differences(judge_image(as_float), scene) == []
    with pytest.raises(TypeError, match="PIL image"):
        judge_image("image.png")


def test_degrade_changes_pixels_but_not_the_reading():
    scene = make_scene([{"shape": "triangle", "color": "purple", "size": "small", "position": "on the left"}])
    image = render_scene(scene, 64)
    blurred = degrade(image, blur_radius=1.0, noise_std=8.0, seed=1)
    assert not np.array_equal(np.asarray(blurred), np.asarray(image))
    assert scene_differences(judge_image(blurred), scene) == []


# ---- the prompt suite ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def suite() -> list[PromptSpec]:
    return shapes_suite()


def test_suite_is_fixed_and_covers_every_task(suite):
    assert suite == shapes_suite()
    sizes = Counter(spec.task for spec in suite)
    assert set(sizes) == set(TASKS)
    assert all(10 <= n <= 20 for n in sizes.values()), sizes
    seen_prompts = [spec.prompt for spec in suite if spec.task != "unseen"]
    assert len(set(seen_prompts)) == len(seen_prompts)


def test_only_unseen_prompts_name_held_out_combinations(suite):
    holdout = parse_holdout(DEFAULT_HOLDOUT)
    for spec in suite:
        held = any(is_held_out(dataclasses.asdict(query), holdout) for query in spec.objects)
        assert held == (spec.task == "unseen"), spec.prompt
    assert not any(spec.task == "unseen" for spec in shapes_suite(holdout=()))
    other = shapes_suite(holdout=["large blue"])
    assert all(("large blue" in spec.prompt) == (spec.task == "unseen") for spec in other)


def _violations(spec: PromptSpec, scene: dict) -> list[dict]:
    """Scenes close to the matching one that break the prompt."""
    objects = [dict(obj) for obj in scene["objects"]]

    def other(value: str, choices) -> str:
        return next(choice for choice in choices if choice != value)

    wrong: list[list[dict]] = []
    first = spec.objects[0]
    if spec.count is not None:
        extra = {**objects[0], "row": None, "col": None}
        taken = {(obj["row"], obj["col"]) for obj in objects}
        extra["row"], extra["col"] = next(cell for cell in POSITIONS.values() if cell not in taken)
        wrong.append(objects[:-1])  # one too few
        if len(objects) < 3:  # one too many (scenes hold at most three)
            wrong.append(objects + [extra])
    elif spec.relation is not None:
        a, b = objects
        wrong.append([{**a, "row": b["row"], "col": b["col"]}, {**b, "row": a["row"], "col": a["col"]}])
    elif spec.exclusive_colors:
        a, b = objects
        wrong.append([{**a, "color": b["color"]}, {**b, "color": a["color"]}])
    # change the object that the first query asks for (objects are in reading order, not prompt order)
    target = next(index for index, obj in enumerate(objects) if first.matches(obj))
    rest = objects[:target] + objects[target + 1 :]
    if first.color and spec.count is None:
        wrong.append([{**objects[target], "color": other(first.color, COLORS)}, *rest])
    elif first.shape and spec.count is None:
        wrong.append([{**objects[target], "shape": other(first.shape, SHAPES)}, *rest])
    if first.position:
        moved = other(first.position, POSITIONS)
        wrong.append([{**objects[target], "row": POSITIONS[moved][0], "col": POSITIONS[moved][1]}])
    if first.size:
        wrong.append([{**objects[target], "size": other(first.size, ("small", "large"))}, *rest])
    for objs in wrong:
        for obj in objs:
            obj.pop("position", None)
    scenes = [make_scene(objs, scene["background"]) for objs in wrong]
    if spec.background:
        scenes.append(make_scene(objects, other(spec.background, ("white", "gray", "black"))))
    return scenes


def test_every_prompt_is_met_by_a_matching_render_and_broken_by_a_wrong_one(suite):
    for spec in shapes_suite(holdout=DEFAULT_HOLDOUT + ("large blue",)) + suite:
        scene = example_scene(spec)
        # the prompt is one of the captions of its matching scene: same vocabulary and phrasing
        assert spec.prompt in all_scene_captions(scene), spec.prompt
        judged = judge_render(scene)
        assert failure_reason(spec, judged) is None, (spec.prompt, failure_reason(spec, judged))
        wrong_scenes = _violations(spec, scene)
        assert wrong_scenes, spec.prompt
        for wrong in wrong_scenes:
            reason = failure_reason(spec, judge_render(wrong))
            assert reason, (spec.prompt, wrong["objects"])
            assert not check_prompt(spec, wrong)


def test_failure_reasons_are_specific():
    count = next(spec for spec in shapes_suite() if spec.task == "counting" and spec.count == 2)
    three = example_scene(dataclasses.replace(count, count=3))
    assert "expected 2" in failure_reason(count, judge_render(three))
    binding = next(spec for spec in shapes_suite() if spec.task == "color_binding")
    scene = example_scene(binding)
    a, b = (dict(obj) for obj in scene["objects"])
    leaked = make_scene([a, b, {**a, "color": b["color"], "row": 2, "col": 2, "position": None}])
    assert "colors not bound" in failure_reason(binding, leaked)
    result = evaluate_image(binding, render_scene(scene))
    assert result["passed"] and result["reason"] is None and result["judged"]["objects"]


def test_summarize_averages_tasks_and_reports_unseen_apart():
    results = (
        [{"task": "single_object", "passed": True}] * 3
        + [{"task": "relation", "passed": False}, {"task": "relation", "passed": True}]
        + [{"task": "unseen", "passed": False}] * 4
    )
    summary = summarize(results)
    assert summary["tasks"]["single_object"]["accuracy"] == 1.0
    assert summary["tasks"]["relation"] == {"accuracy": 0.5, "correct": 1, "total": 2}
    assert summary["overall"] == pytest.approx(0.75)  # mean over tasks, not over images (4/5)
    assert summary["unseen"] == 0.0
    spec = shapes_suite()[0]
    assert summarize([(spec, True), (spec, False)])["overall"] == 0.5
    assert set(SEEN_TASKS) == set(TASKS) - {"unseen"}
    with pytest.raises(ValueError, match="unknown task"):
        summarize([{"task": "style", "passed": True}])
    assert summary["right_count"] is None and "right_count" not in summary["tasks"]["relation"]


def test_right_count_is_reported_beside_accuracy_and_sees_extra_objects():
    """"a red circle" is satisfied by two red circles; the right count says there are two."""
    single = next(spec for spec in shapes_suite() if spec.task == "single_object")
    scene = example_scene(single)
    (obj,) = scene["objects"]
    doubled = make_scene([obj, {**obj, "row": (obj["row"] + 2) % 3, "col": (obj["col"] + 2) % 3, "position": None}])
    assert check_prompt(single, scene) and has_right_count(single, scene)
    assert check_prompt(single, doubled) and not has_right_count(single, doubled)
    count = next(spec for spec in shapes_suite() if spec.task == "counting" and spec.count == 2)
    assert has_right_count(count, example_scene(count))
    relation = next(spec for spec in shapes_suite() if spec.task == "relation")
    assert has_right_count(relation, example_scene(relation))

    summary = summarize(
        [{"task": "single_object", "passed": True, "right_count": True},
         {"task": "single_object", "passed": True, "right_count": False},
         {"task": "relation", "passed": False, "right_count": True}]
    )
    assert summary["tasks"]["single_object"]["accuracy"] == 1.0
    assert summary["tasks"]["single_object"]["right_count"] == 0.5
    assert summary["right_count"] == pytest.approx((0.5 + 1.0) / 2)  # mean over tasks, like overall

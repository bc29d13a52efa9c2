#!/usr/bin/env python
"""Which words of a caption the trained U-Net reads, by noise level (docs/conditioning.md).

    python bench/attribute_sensitivity.py runs/shapes/pipeline [MORE_PIPELINES ...] [--scenes 32]

The caption gap (bench/caption_gap.py) says whether a model reads its caption at all; this says
*what* it reads. For ``--scenes`` fresh single-object scenes, the U-Net's ``x_0`` estimate is
computed from the same noisy latents (pure noise plus the scene's own latents at ``t``) with the
scene's full description, and with that description changed in one attribute only (the background,
the object's color, its shape or its place, each to another value drawn at random). The mean
absolute change of the estimate, per attribute and band of ``t``, is printed beside the change
the whole caption makes (full description against the empty caption). A model that reads an
attribute changes its estimate when that word changes; one that ignores it gives ~0.

The last row, ``binding``, is measured on as many fresh two-object scenes of two different colors: the
two objects' colors are swapped in the caption ("a red circle ... and a blue square ..." against "a blue
circle ... and a red square ..."), which keeps every word and changes only which object a color belongs
to. A model that reads its caption as a bag of words gives ~0 there however well it reads each word
(Yuksekgonul et al. 2023, "When and why vision-language models behave like bags-of-words"); the
suite's two-object and color-binding tasks need it to be clearly above 0.

The ``count`` row is measured on as many fresh scenes of two or three like objects, captioned as the suite's
counting prompts are ("two green triangles"), against the same caption with "two" and "three" exchanged.

The ``relation`` row uses the binding row's two-object scenes, captioned as the suite's relation prompts are
("a red circle to the left of a blue square", a relation that holds in the scene), against the same caption
with the relation flipped ("... to the right of ..."): the same objects, the other layout.

A U-Net built with ``addition_embed_type="text"`` reads the caption by two routes: its cross-attention
and an attention-pooled summary added to the timestep embedding (AdaGN). ``--route cross`` changes the
caption in the cross-attention only (the pooled route keeps the full description), ``--route pooled``
in the pooled route only; ``both`` (the default) changes it everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import numpy as np
import torch

ATTRIBUTES = ("background", "color", "shape", "position")
OBJECT_KEYS = ("shape", "color", "size", "position")


def _variant(scene: dict, attribute: str, rng: random.Random) -> dict:
    from latentdiff.data.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, make_scene

    obj = {key: scene["objects"][0][key] for key in OBJECT_KEYS}
    background = scene["background"]
    choices = {"background": list(BACKGROUNDS), "color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS)}
    current = background if attribute == "background" else obj[attribute]
    new = rng.choice([value for value in choices[attribute] if value != current])
    if attribute == "background":
        background = new
    else:
        obj[attribute] = new
    return make_scene([obj], background=background)


def _colors_swapped(scene: dict) -> dict:
    """The two-object ``scene`` with its objects' colors exchanged (same shapes, sizes and places)."""
    from latentdiff.data.shapes import make_scene

    first, second = ({key: obj[key] for key in OBJECT_KEYS} for obj in scene["objects"])
    first["color"], second["color"] = second["color"], first["color"]
    return make_scene([first, second], background=scene["background"])


def _two_color_scenes(count: int, seed: int) -> dict:
    """``count`` fresh two-object scenes whose objects differ in color (and so have a caption to swap)."""
    from latentdiff.data.shapes import make_shapes_dataset

    data = make_shapes_dataset(4 * count, seed=20_000 + seed, min_objects=2, max_objects=2, progress_bar=False)
    keep = [i for i, scene in enumerate(data["scene"]) if scene["objects"][0]["color"] != scene["objects"][1]["color"]]
    if len(keep) < count:  # pragma: no cover - about 6 in 7 random pairs differ in color
        raise RuntimeError(f"only {len(keep)} of {4 * count} two-object scenes have two colors")
    return data.select(keep[:count])


def _count_scenes(count: int, seed: int) -> tuple["datasets.Dataset", dict[str, list[str]]]:
    """``count`` fresh scenes of two or three like objects (a ``datasets.Dataset``), and their captions: the
    suite's counting caption for each and the same with the other count ("two green triangles" / "three green
    triangles")."""
    from latentdiff.data.shapes import make_shapes_dataset, noun_phrase

    data = make_shapes_dataset(count, seed=30_000 + seed, min_objects=2, max_objects=3, mixture={"count": 1.0},
                               progress_bar=False)
    true, changed = [], []
    for scene in data["scene"]:
        first, objects = scene["objects"][0], len(scene["objects"])
        true.append(noun_phrase(first["shape"], first["color"], count=objects))
        changed.append(noun_phrase(first["shape"], first["color"], count={2: 3, 3: 2}[objects]))
    return data, {"full": true, "count": changed}


def _relation_captions(scenes) -> dict[str, list[str]]:
    """Each two-object scene's first relation, as the suite words it ("a red circle to the left of a blue
    square"), and the same caption with that relation flipped ("... to the right of ...")."""
    from latentdiff.data.shapes import RELATION_PHRASES, hard_negative_captions, noun_phrase

    true = []
    for scene in scenes:
        relation = scene["relations"][0]  # objects in distinct cells: at least one relation holds
        subject, other = scene["objects"][relation["subject"]], scene["objects"][relation["object"]]
        a, b = noun_phrase(subject["shape"], subject["color"]), noun_phrase(other["shape"], other["color"])
        true.append(f"{a} {RELATION_PHRASES[relation['relation']]} {b}")
    # A caption with a relation and no place: its "place" hard negative is the relation flipped (no random draw).
    flipped = [hard_negative_captions(caption, random.Random(0))["place"] for caption in true]
    return {"full": true, "relation": flipped}


ROUTES = ("both", "cross", "pooled")


def _routed_prediction(unet, noisy, steps, changed, full, route: str) -> torch.Tensor:
    """The U-Net's output with the ``changed`` caption states in ``route`` and the ``full`` ones elsewhere."""
    if route == "both":
        return unet(noisy, steps, changed).sample
    cross, pooled = (changed, full) if route == "cross" else (full, changed)
    # Diffusers computes the pooled route as `unet.add_embedding(encoder_hidden_states)`; a pre-hook hands it
    # other states than the cross-attention's, which no argument of UNet2DConditionModel.forward can.
    handle = unet.add_embedding.register_forward_pre_hook(lambda module, args: (pooled,))
    try:
        return unet(noisy, steps, cross).sample
    finally:
        handle.remove()


def measure(model: str, scenes: int, seed: int, timesteps: tuple[int, ...], route: str = "both") -> dict[str, list[float]]:
    from diffusers import DDPMScheduler

    from latentdiff.data.shapes import full_caption, make_shapes_dataset
    from latentdiff.diffusion import predicted_clean_latents
    from latentdiff.pipelines import LatentPipeline
    from latentdiff.trainer.encoding import encode_images, tokenize

    with open(os.path.join(model, "model_index.json"), encoding="utf-8") as file:
        if json.load(file).get("text_encoder", [None])[0] == "oracle_text_encoder":  # bench/ablation.py --oracle
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import oracle_text_encoder  # noqa: F401
    pipeline = LatentPipeline.from_pretrained(model)
    if route != "both" and pipeline.unet.config.addition_embed_type != "text":
        raise SystemExit(f"--route {route}: {model}'s U-Net has no pooled text route (addition_embed_type "
                         f"{pipeline.unet.config.addition_embed_type!r}, not 'text'); use --route both")
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    data = make_shapes_dataset(scenes, seed=10_000 + seed, min_objects=1, max_objects=1, progress_bar=False)
    rng = random.Random(seed)
    captions = {"full": [full_caption(scene) for scene in data["scene"]], "empty": [""] * scenes}
    for attribute in ATTRIBUTES:
        captions[attribute] = [full_caption(_variant(scene, attribute, rng)) for scene in data["scene"]]
    pairs = _two_color_scenes(scenes, seed)
    pair_captions = {"full": [full_caption(scene) for scene in pairs["scene"]],
                     "binding": [full_caption(_colors_swapped(scene)) for scene in pairs["scene"]]}

    def encode(images) -> torch.Tensor:
        pixels = torch.from_numpy(np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images]))
        return encode_images(pipeline.vae, pixels.permute(0, 3, 1, 2) / 127.5 - 1, None, mean=True).float()

    def prepared(images, caption_sets) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The scenes' latents, their noise and every caption set's text states, computed once for all t."""
        latents = encode(images)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        states = {name: pipeline.text_encoder(tokenize(pipeline.tokenizer, texts))[0] for name, texts in caption_sets.items()}
        return latents, noise, states

    def x0_estimates(latents, noise, states, t) -> dict[str, torch.Tensor]:
        steps = torch.full((len(latents),), t, dtype=torch.long)
        noisy = scheduler.add_noise(latents, noise, steps)
        return {name: predicted_clean_latents(
                    scheduler, noisy, _routed_prediction(pipeline.unet, noisy, steps, state, states["full"], route), steps)
                for name, state in states.items()}

    counts, count_captions = _count_scenes(scenes, seed)

    with torch.no_grad():
        singles, two_colors = prepared(data["image"], captions), prepared(pairs["image"], pair_captions)
        like_objects = prepared(counts["image"], count_captions)
        related = prepared(pairs["image"], _relation_captions(pairs["scene"]))
        result = {name: [] for name in ("caption", *ATTRIBUTES, "binding", "count", "relation")}
        for t in timesteps:
            x0 = x0_estimates(*singles, t)
            result["caption"].append((x0["full"] - x0["empty"]).abs().mean().item())
            for attribute in ATTRIBUTES:
                result[attribute].append((x0["full"] - x0[attribute]).abs().mean().item())
            x0 = x0_estimates(*two_colors, t)
            result["binding"].append((x0["full"] - x0["binding"]).abs().mean().item())
            x0 = x0_estimates(*like_objects, t)
            result["count"].append((x0["full"] - x0["count"]).abs().mean().item())
            x0 = x0_estimates(*related, t)
            result["relation"].append((x0["full"] - x0["relation"]).abs().mean().item())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="pipeline folders")
    parser.add_argument("--scenes", type=int, default=32,
                        help="fresh scenes of each kind: single-object ones, and two-object ones for binding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timesteps", default="950,750,500,250", help="comma-separated t to measure at")
    parser.add_argument("--route", choices=ROUTES, default="both",
                        help="where the caption changes: everywhere, in the cross-attention only, or in the pooled "
                             "(AdaGN) route only (default %(default)s)")
    args = parser.parse_args()
    timesteps = tuple(int(t) for t in args.timesteps.split(","))
    header = " | ".join(f"t={t}" for t in timesteps)
    print(f"| model | changed | {header} |")
    print("|---|---|" + "---|" * len(timesteps))
    for model in args.models:
        result = measure(model, args.scenes, args.seed, timesteps, args.route)
        for name, values in result.items():
            label = {"caption": "whole caption (vs empty)", "binding": "binding (two objects' colors swapped)",
                     "count": "count (two <-> three like objects)",
                     "relation": "relation (flipped: left <-> right, above <-> below)"}.get(
                name, f"only the {name}")
            label += "" if args.route == "both" else f", {args.route} route"
            print(f"| {model} | {label} | " + " | ".join(f"{value:.4f}" for value in values) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())

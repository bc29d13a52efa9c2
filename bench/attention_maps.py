#!/usr/bin/env python
"""Where the two objects of a two-object prompt attend: the overlap of their nouns' cross-attention maps at the
high noise levels, per image of an eval, beside what the judge saw in it (docs/conditioning.md, forty-third round).

    python bench/attention_maps.py runs/shapes/pipeline [--results runs/shapes/pipeline/eval/results.json]

Regenerates the images of the three tasks with two different objects (two objects, relation, color binding)
exactly as ``latentdiff eval`` drew them (same prompts, seeds and sampling settings: those saved with the model),
and at each step whose next timestep is at least ``--min-timestep`` records, from one extra forward pass of the
denoiser on the conditional embeddings (:func:`latentdiff.pipelines.attention_binding.cross_attention_maps`,
every cross-attention layer brought to the finest grid and averaged):

* overlap: ``sum_p min(P_a(p), P_b(p))`` of the two nouns' maps, each normalized over the pixels (1: the same
  pixels, 0: apart), as the attention binding callback's separation term measures it;
* flatness: the overlap of a noun's map with the uniform map (1: it attends everywhere alike);
* weakest share: the smaller of the two objects' largest share of a pixel's attention (Attend-and-Excite's
  measure of a neglected object).

Printed as means by the judge's outcome (``bench/eval_breakdown.py``'s two-object outcomes) and by band of t. If
the failed images' nouns overlap no more than the passed images', attention-map guidance has nothing to act on.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from eval_breakdown import TWO_OBJECT_TASKS, two_object_outcome  # noqa: E402

BANDS = ((800, "t >= 800"), (600, "t 600-800"), (0, "t < 600"))


def band_of(timestep: float) -> str:
    return next(name for start, name in BANDS if timestep >= start)


def measure(pipeline, jobs, nouns, modifiers, min_timestep: float = 500, batch_size: int = 32,
            call: dict | None = None) -> list[list[tuple]]:
    """For each ``(prompt, seed)`` job, drawn with the pipeline call settings ``call``: ``[(timestep, overlap,
    flatness, weakest share), ...]`` over its steps with a next timestep >= ``min_timestep`` (empty for a prompt that
    names fewer than two objects)."""
    from latentdiff.pipelines.attention_binding import (
        AttentionBindingCallback,
        _on_finest_grid,
        cross_attention_maps,
    )

    records: list[list[tuple]] = [[] for _ in jobs]
    offset = 0

    class Recorder(AttentionBindingCallback):  # reads the maps, never moves the latents
        def callback_fn(self, pipe, step_index, timestep, kwargs):
            t = self.next_guided_timestep(pipe, step_index)
            if t is None:
                return kwargs
            latents, embeds = kwargs["latents"], kwargs["prompt_embeds"]
            batch = latents.shape[0]
            groups, lengths = self._prompt_groups(pipe, batch)
            with torch.no_grad(), cross_attention_maps(self.denoisers(pipe)) as recorded:
                pipe.unet(pipe.scheduler.scale_model_input(latents, t), t, encoder_hidden_states=embeds[-batch:])
            maps = _on_finest_grid(recorded)
            for i in range(batch):
                if len(groups[i]) < 2:
                    continue
                text = maps[i, 1 : lengths[i]]
                text = text / text.sum(0, keepdim=True).clamp_min(1e-8)
                (mods_a, a), (mods_b, b) = groups[i][:2]

                def row(positions):
                    return sum(text[p - 1] for p in positions)

                p_a, p_b = (row(n) / row(n).sum() for n in (a, b))
                uniform = torch.full_like(p_a, 1 / p_a.numel())
                flatness = (torch.minimum(p_a, uniform).sum() + torch.minimum(p_b, uniform).sum()) / 2
                share = min(row([*mods, *n]).max().item() for mods, n in ((mods_a, a), (mods_b, b)))
                records[offset + i].append((float(t), torch.minimum(p_a, p_b).sum().item(), flatness.item(), share))
            return kwargs

    recorder = Recorder(nouns=nouns, modifiers=modifiers, min_timestep=min_timestep)
    for start in range(0, len(jobs), batch_size):
        offset = start
        chunk = jobs[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in chunk]
        with torch.no_grad():
            pipeline([prompt for prompt, _ in chunk], generator=generators, callback_on_step_end=recorder,
                     output_type="latent", **(call or {}))
    return records


def summarize(images, records) -> dict[str, dict[str, list[float]]]:
    """``{outcome: {"<band> <measure>": [values]}}`` over the images' records."""
    table: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for image, steps in zip(images, records):
        outcome = "passed" if image["passed"] else two_object_outcome(image)
        table[outcome]["images"].append(1.0)
        for timestep, overlap, flatness, share in steps:
            band = band_of(timestep)
            table[outcome][f"{band} overlap"].append(overlap)
            table[outcome][f"{band} flatness"].append(flatness)
            table[outcome][f"{band} weakest share"].append(share)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a pipeline folder that `latentdiff eval` ran on")
    parser.add_argument("--results", default=None, help="its results.json (default MODEL/eval/results.json)")
    parser.add_argument("--min-timestep", type=float, default=500, help="record steps down to this t (default 500)")
    args = parser.parse_args(argv)

    from latentdiff import LatentPipeline
    from latentdiff.data.shapes import COLORS, SHAPES, SIZES
    from latentdiff.models.schedulers import scheduler_from_name

    results_path = args.results or os.path.join(args.model, "eval", "results.json")
    with open(results_path, encoding="utf-8") as file:
        results = json.load(file)
    images = [image for image in results["images"] if image["task"] in TWO_OBJECT_TASKS]
    pipeline = LatentPipeline.from_pretrained(args.model)
    sampler = results["sampler"]  # the eval's own settings, so that the images are the ones it judged
    pipeline.scheduler = scheduler_from_name(sampler["scheduler"], pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": sampler["steps"], "guidance_scale": sampler["guidance_scale"],
            "guidance_interval": sampler.get("guidance_interval"), "negative_prompt": sampler.get("negative_prompt") or "",
            "guidance_rescale": sampler.get("guidance_rescale", 0.0)}
    records = measure(pipeline, [(image["prompt"], image["seed"]) for image in images],
                      nouns=[*SHAPES, *(s + "s" for s in SHAPES)], modifiers=[*COLORS, *SIZES],
                      min_timestep=args.min_timestep, call=call)
    table = summarize(images, records)
    columns = [f"{band} {measure}" for _, band in BANDS for measure in ("overlap", "flatness", "weakest share")]
    columns = [c for c in columns if any(c in row for row in table.values())]
    print(f"{results_path}: {len(images)} images of {', '.join(TWO_OBJECT_TASKS)}")
    print("| outcome | images | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for outcome, row in sorted(table.items(), key=lambda item: -len(item[1]["images"])):
        cells = [f"{sum(row[c]) / len(row[c]):.3f}" if row.get(c) else "-" for c in columns]
        print(f"| {outcome} | {len(row['images'])} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

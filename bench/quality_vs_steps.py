#!/usr/bin/env python
"""Quality against sampling steps: prompt adherence and the shapes Frechet distance per sampler.

    python bench/quality_vs_steps.py runs/shapes/pipeline                     # the full table (hours on a CPU)
    python bench/quality_vs_steps.py runs/shapes/pipeline --images-per-prompt 1 --sfd-images 256
    python bench/quality_vs_steps.py runs/shapes/pipeline --samplers dpm:25,dpm:10 --record
    python bench/quality_vs_steps.py MODEL --quick                            # smoke test: few prompts and steps

For each sampler configuration (default: DDPM 1000 steps, DDIM 50 / 25 / 10, DPM-Solver++ 25 / 10),
with the same seeds and guidance for every configuration:

- **overall** / **unseen**: the shapes prompt suite generated and judged by
  :func:`latentdiff.eval.adherence.evaluate_adherence`: the mean of the per-task accuracies over
  the seen tasks (GenEval's overall score), and the accuracy on the combinations held out of training;
- **SFD**: the shapes Frechet distance (:func:`latentdiff.eval.metrics.shapes_frechet_distance`:
  features of the project's own shapes encoder, **not FID**) between ``--sfd-images`` renders of the
  shapes data (fixed seed, the model's holdout left out as in its training) and as many images
  generated from those renders' captions (as FID on COCO generates from the reference captions);
- **wall time** of generating (and judging) both sets, and seconds per generated image.

The last row, **ground truth**, needs no model: its adherence is the judge's reading of a render of
each suite prompt's example scene, its SFD that of a second, independent set of renders, the floor
that finite sets leave (SFD is biased upwards for small sets; compare rows of one run only).

Writes ``quality_vs_steps.json`` and ``quality_vs_steps.md`` into ``--out`` (default
``MODEL/eval/quality_vs_steps``); ``--record`` also appends the table to ``bench/RESULTS.md``.
Cost on a CPU: one configuration generates (prompts x images per prompt + SFD images) x steps
U-Net evaluations (doubled under guidance), so DDPM 1000 dominates; cut it with
``--images-per-prompt``, ``--max-prompts-per-task``, ``--sfd-images`` or ``--samplers``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DEFAULT_RESULTS_FILE, Report, command_line, git_commit, machine_info  # noqa: E402

#: (scheduler name, steps): the table of the issue.
CONFIGURATIONS: tuple[tuple[str, int], ...] = (
    ("ddpm", 1000),
    ("ddim", 50),
    ("ddim", 25),
    ("ddim", 10),
    ("dpm", 25),
    ("dpm", 10),
)
#: ``--quick``: the same samplers, few steps (a smoke test of the script, not a measurement).
QUICK_CONFIGURATIONS: tuple[tuple[str, int], ...] = (
    ("ddpm", 6),
    ("ddim", 4),
    ("ddim", 3),
    ("ddim", 2),
    ("dpm", 3),
    ("dpm", 2),
)
SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpm": "DPM-Solver++"}


def _configurations(text: str) -> tuple[tuple[str, int], ...]:
    """``"ddpm:1000,dpm:25"`` -> ``(("ddpm", 1000), ("dpm", 25))``."""
    configurations = []
    for item in text.split(","):
        name, _, steps = item.strip().partition(":")
        if name not in SAMPLER_NAMES or not steps.isdigit() or int(steps) < 1:
            raise argparse.ArgumentTypeError(
                f"--samplers expects NAME:STEPS items separated by commas, NAME one of {', '.join(SAMPLER_NAMES)} "
                f"(e.g. ddpm:1000,dpm:25); got {item!r}"
            )
        configurations.append((name, int(steps)))
    return tuple(configurations)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("model", help="pipeline folder (e.g. runs/shapes/pipeline)")
    parser.add_argument("--images-per-prompt", type=int, default=4,
                        help="suite images per prompt (default %(default)s)")
    parser.add_argument("--max-prompts-per-task", type=int, default=None, metavar="N",
                        help="only the first N prompts of each suite task (default all)")
    parser.add_argument("--sfd-images", type=int, default=500, metavar="N",
                        help="reference renders and generated images on each side of SFD (default %(default)s)")
    parser.add_argument("--samplers", type=_configurations, default=CONFIGURATIONS, metavar="NAME:STEPS,...",
                        help="sampler configurations (default ddpm:1000,ddim:50,ddim:25,ddim:10,dpm:25,dpm:10)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance scale (default: the model's own, else Diffusers')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="images per pipeline call (default %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (on a CPU shared with other work one thread is often faster)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: one prompt per task, one image each, 16 SFD images, a few steps per sampler")
    parser.add_argument("--out", default=None, help="output folder (default MODEL/eval/quality_vs_steps)")
    parser.add_argument("--record", nargs="?", const=DEFAULT_RESULTS_FILE, metavar="RESULTS_MD",
                        help="append the table to bench/RESULTS.md (or the file given)")
    parser.add_argument("--note", action="append", default=[], help="a note recorded with the table")
    args = parser.parse_args(argv)
    for name, minimum in (("images_per_prompt", 1), ("batch_size", 1), ("sfd_images", 2)):
        if getattr(args, name) < minimum:
            parser.error(f"--{name.replace('_', '-')} must be at least {minimum}")
    if args.max_prompts_per_task is not None and args.max_prompts_per_task < 1:
        parser.error("--max-prompts-per-task must be at least 1")
    if not os.path.isdir(args.model):
        parser.error(f"no pipeline folder at {args.model!r}")
    if args.quick:
        args.images_per_prompt, args.sfd_images, args.samplers = 1, 16, QUICK_CONFIGURATIONS
        args.max_prompts_per_task = args.max_prompts_per_task or 1
    return args


def ground_truth_row(
    suite: Sequence[Any], image_size: int, reference: Any, args: argparse.Namespace, holdout: Sequence[str]
) -> dict[str, Any]:
    """Figures without a model: the judge on renders of each prompt's example scene, and SFD between
    the reference and a second, independent set of renders of the data."""
    from latentdiff.data.shapes import render_scene
    from latentdiff.eval.judge import judge_image
    from latentdiff.eval.metrics import SFD_REFERENCE_SEED, shapes_frechet_distance, shapes_reference_set
    from latentdiff.eval.suite import example_scene, failure_reason, summarize

    readings = [judge_image(render_scene(example_scene(spec), image_size)) for spec in suite]
    summary = summarize({"task": spec.task, "passed": failure_reason(spec, judged) is None}
                        for spec, judged in zip(suite, readings))
    other_renders, _ = shapes_reference_set(args.sfd_images, SFD_REFERENCE_SEED + 1, image_size, holdout)
    return {
        "sampler": "ground truth",
        "scheduler": None,
        "steps": None,
        "overall": summary["overall"],
        "unseen": summary["unseen"],
        "tasks": {task: figures["accuracy"] for task, figures in summary["tasks"].items()},
        "sfd": shapes_frechet_distance(reference, other_renders),
        "wall_time_s": None,
        "seconds_per_image": None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    from latentdiff.eval.adherence import (
        evaluate_adherence,
        generate_images,
        model_holdout,
        select_prompts,
    )
    from latentdiff.eval.encoder import encode_images
    from latentdiff.eval.metrics import (
        SFD_REFERENCE_SEED,
        feature_statistics,
        shapes_frechet_distance,
        shapes_reference_set,
    )
    from latentdiff.eval.suite import SHAPES_SUITE_VERSION, shapes_suite
    from latentdiff.pipelines import LatentPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    holdout, holdout_source = model_holdout(args.model)
    suite = select_prompts(shapes_suite(holdout), max_prompts_per_task=args.max_prompts_per_task)
    out = args.out or os.path.join(args.model, "eval", "quality_vs_steps")
    machine = machine_info(device)

    pipeline = LatentPipeline.from_pretrained(args.model).to(device)
    guidance = float(pipeline.sampling_default("guidance_scale", args.guidance))
    image_size = pipeline.default_height_width()[0]
    reference_images, reference_captions = shapes_reference_set(
        args.sfd_images, SFD_REFERENCE_SEED, image_size, holdout
    )
    reference = feature_statistics(encode_images(reference_images))

    rows: list[dict[str, Any]] = []
    base_scheduler = pipeline.scheduler
    for scheduler, steps in args.samplers:
        label = f"{SAMPLER_NAMES[scheduler]} {steps}"
        # As many steps as training timesteps is the whole chain T-1 ... 0 (Ho et al. 2020, Algorithm 2):
        # steps_offset=0, since an SD-style offset of 1 would start at timestep T (diffusers issue #10003).
        full_chain = steps >= base_scheduler.config.num_train_timesteps
        pipeline.scheduler = base_scheduler.__class__.from_config(base_scheduler.config, steps_offset=0) if (
            full_chain) else base_scheduler
        print(f"{label}: {len(suite)} prompts x {args.images_per_prompt} images, then {args.sfd_images} for SFD",
              flush=True)
        started = time.perf_counter()
        sampling = {"steps": steps, "scheduler": scheduler, "guidance": guidance, "seed": args.seed,
                    "batch_size": args.batch_size}
        results = evaluate_adherence(pipeline, suite, images_per_prompt=args.images_per_prompt, **sampling)
        generated = generate_images(pipeline, reference_captions, desc=f"SFD {label}", **sampling)
        wall = time.perf_counter() - started
        row = {
            "sampler": SAMPLER_NAMES[scheduler],
            "scheduler": scheduler,
            "steps": steps,
            "overall": results.overall,
            "unseen": results.unseen,
            "tasks": {task: figures["accuracy"] for task, figures in results.summary["tasks"].items()},
            "sfd": shapes_frechet_distance(reference, generated),
            "wall_time_s": round(wall, 2),
            "seconds_per_image": round(wall / (len(results.images) + len(generated)), 4),
        }
        rows.append(row)
        print(f"  overall {_figure(row['overall'])}, unseen {_figure(row['unseen'])}, SFD {row['sfd']:.1f}, "
              f"{wall:.1f} s", flush=True)
    rows.append(ground_truth_row(suite, image_size, reference, args, holdout))

    report = Report(
        title=f"quality_vs_steps: {os.path.normpath(args.model)}" + (" (--quick)" if args.quick else ""),
        machine=machine,
        commit=git_commit(),
        command=command_line() if argv is None else shlex.join(["python", "bench/quality_vs_steps.py", *argv]),
        settings=[
            ("Suite", f"{SHAPES_SUITE_VERSION}, {len(suite)} prompts x {args.images_per_prompt} images "
                      f"(seed {args.seed}); holdout {list(holdout)} from {holdout_source}"),
            ("Guidance", f"{guidance:g}"),
            ("SFD", f"shapes Frechet distance (the project's shapes encoder, not FID) between {args.sfd_images} "
                    f"renders of the shapes data (seed {SFD_REFERENCE_SEED}, holdout left out) and {args.sfd_images} "
                    "images generated from their captions"),
            ("Ground truth", "adherence of renders of each prompt's example scene; SFD of a second set of "
                             f"{args.sfd_images} renders (seed {SFD_REFERENCE_SEED + 1}): the floor for this size"),
        ],
        header=["sampler", "steps", "overall", "unseen", "SFD", "wall time (s)", "s / image"],
        rows=[
            [
                row["sampler"],
                str(row["steps"]) if row["steps"] is not None else "-",
                _figure(row["overall"]),
                _figure(row["unseen"]),
                f"{row['sfd']:.1f}",
                f"{row['wall_time_s']:.1f}" if row["wall_time_s"] is not None else "-",
                f"{row['seconds_per_image']:.3f}" if row["seconds_per_image"] is not None else "-",
            ]
            for row in rows
        ],
        notes=list(args.note),
    )
    report.print()
    os.makedirs(out, exist_ok=True)
    result = {
        "suite": SHAPES_SUITE_VERSION,
        "model": os.path.abspath(args.model),
        "holdout": list(holdout),
        "holdout_source": holdout_source,
        "num_prompts": len(suite),
        "images_per_prompt": args.images_per_prompt,
        "guidance_scale": guidance,
        "seed": args.seed,
        "sfd": {"num_images": args.sfd_images, "reference_seed": SFD_REFERENCE_SEED, "image_size": image_size},
        "machine": machine,
        "commit": report.commit,
        "command": report.command,
        "rows": rows,
    }
    with open(os.path.join(out, "quality_vs_steps.json"), "w", encoding="utf-8") as file:
        json.dump(result, file, indent=1)
    with open(os.path.join(out, "quality_vs_steps.md"), "w", encoding="utf-8") as file:
        file.write(report.markdown())
    print(f"wrote {os.path.join(out, 'quality_vs_steps.json')} and quality_vs_steps.md")
    if args.record:
        report.append_to(args.record, part="Quality against sampling steps")
        print(f"appended to {args.record}")
    return result


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""`latentdiff eval` on the shapes suite with attention binding guidance at sampling (docs/conditioning.md,
forty-third round): every pipeline call of the eval gets an
:class:`~latentdiff.pipelines.attention_binding.AttentionBindingCallback` over the shapes vocabulary (the three shapes
and their plurals as nouns, the colors and sizes as modifiers); everything else is the eval's own.

    python bench/attention_binding_eval.py runs/shapes/pipeline --out runs/shapes/pipeline/eval_binding \\
        --step-size 0.05 --min-timestep 600 [--separation 1 --binding 1] [--images-per-prompt 4]

Writes ``results.json`` and ``grid.png`` to ``--out`` as ``latentdiff eval`` does, and prints the table.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--out", required=True, help="folder for results.json and grid.png")
    parser.add_argument("--step-size", type=float, default=0.05)
    parser.add_argument("--min-timestep", type=float, default=600)
    parser.add_argument("--separation", type=float, default=1.0, help="weight of the two nouns' overlap")
    parser.add_argument("--binding", type=float, default=1.0, help="weight of a modifier's distance from its noun")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--max-prompts-per-task", type=int, default=None, help="a smaller suite (default: all)")
    args = parser.parse_args(argv)

    from latentdiff.data.shapes import COLORS, SHAPES, SIZES
    from latentdiff.eval.adherence import evaluate_model, format_report
    from latentdiff.pipelines.attention_binding import AttentionBindingCallback

    binding = AttentionBindingCallback(
        nouns=[*SHAPES, *(shape + "s" for shape in SHAPES)], modifiers=[*COLORS, *SIZES], step_size=args.step_size,
        min_timestep=args.min_timestep, separation_weight=args.separation, binding_weight=args.binding,
    )
    results, paths = evaluate_model(args.model, out=args.out, images_per_prompt=args.images_per_prompt, steps=args.steps,
                                    scheduler="dpm", max_prompts_per_task=args.max_prompts_per_task,
                                    callback_on_step_end=binding)
    print(format_report(results))
    print(f"guided {binding.guided_steps} steps; wrote {paths['results']}")
    return binding.guided_steps


if __name__ == "__main__":
    main()

"""The ``latentdiff`` command.

    latentdiff generate MODEL "prompt" [-n N] [--steps S] [--scheduler dpm] [--guidance G] [--seed K]
                        [--size HxW] [--out DIR]
    latentdiff inpaint  MODEL IMAGE MASK "prompt" [--repaint-jumps J --repaint-samples R]
    latentdiff outpaint MODEL IMAGE "prompt" --left 32 --right 32
    latentdiff eval     MODEL --suite shapes [--images-per-prompt 4] [--steps 25] [--scheduler dpm]
    latentdiff push     MODEL REPO_ID
    latentdiff shapes   OUT_DIR [-n N]          (write the built-in data as an image folder)
    latentdiff config   [--config FILE ...] [key=value ...]   (print the resolved config)

Each subcommand's arguments are declared here; the work is done by the library.
"""

from __future__ import annotations

import argparse
import sys

from .models.schedulers import SCHEDULER_NAMES as SCHEDULER_CHOICES


def _size(text: str) -> tuple[int, int]:
    """Parse ``HxW`` (e.g. ``64x128``) or a single number for a square size."""
    try:
        if "x" in text.lower():
            height, width = text.lower().split("x")
            return int(height), int(width)
        return int(text), int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size expects HxW such as 64x64 or 64x128, got {text!r}") from None


def _add_sampling_arguments(parser: argparse.ArgumentParser, steps: int | None = None, scheduler: str | None = None) -> None:
    own = "the model's own: latentdiff.json, else Diffusers'"
    parser.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default: {steps or own})")
    parser.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default=scheduler,
                        help=f"sampler (default: {scheduler or 'the model folder' + chr(39) + 's'})")
    parser.add_argument("--guidance", type=float, default=None, help=f"classifier-free guidance scale (default: {own})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading .bin/.ckpt (pickle) weights")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentdiff", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="text-to-image: write images and a grid")
    generate.add_argument("model", help="pipeline folder or Hub id")
    generate.add_argument("prompt", nargs="+", help="one or more prompts")
    generate.add_argument("-n", "--num-images", type=int, default=4, help="images per prompt (default %(default)s)")
    generate.add_argument("--size", type=_size, default=None, help="HxW in pixels (default: the model's size)")
    generate.add_argument("--out", default="samples", help="output folder (default %(default)s)")
    _add_sampling_arguments(generate)

    inpaint = commands.add_parser("inpaint", help="repaint the white part of a mask")
    inpaint.add_argument("model")
    inpaint.add_argument("image")
    inpaint.add_argument("mask", help="mask image: white = repaint, black = keep")
    inpaint.add_argument("prompt")
    inpaint.add_argument("--repaint-jumps", type=int, default=1, help="RePaint jump length (1 = plain blending)")
    inpaint.add_argument("--repaint-samples", type=int, default=1, help="RePaint resamplings per jump (1 = off)")
    inpaint.add_argument("-n", "--num-images", type=int, default=1)
    inpaint.add_argument("--feather", type=int, default=0, help="feathered edge width in pixels (default 0)")
    inpaint.add_argument("--out", default="inpainted")
    _add_sampling_arguments(inpaint)

    outpaint = commands.add_parser("outpaint", help="extend the canvas and fill the new area")
    outpaint.add_argument("model")
    outpaint.add_argument("image")
    outpaint.add_argument("prompt")
    for side in ("left", "right", "top", "bottom"):
        outpaint.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side}")
    outpaint.add_argument("--fill", choices=("noise", "edge", "blur"), default="edge", help="initial fill of the new area")
    outpaint.add_argument(
        "--strength", type=float, default=1.0, help="in (0, 1]: below 1 the new area starts from the fill (default 1)"
    )
    outpaint.add_argument("--repaint-jumps", type=int, default=1, help="RePaint jump length (1 = plain blending)")
    outpaint.add_argument("--repaint-samples", type=int, default=1, help="RePaint resamplings per jump (1 = off)")
    outpaint.add_argument("-n", "--num-images", type=int, default=1)
    outpaint.add_argument("--out", default="outpainted")
    _add_sampling_arguments(outpaint)

    evaluate = commands.add_parser("eval", help="prompt-adherence evaluation on a prompt suite")
    evaluate.add_argument("model")
    evaluate.add_argument("--suite", choices=("shapes",), default="shapes")
    evaluate.add_argument("--images-per-prompt", type=int, default=4)
    evaluate.add_argument("--batch-size", type=int, default=32, help="images per pipeline call")
    evaluate.add_argument("--out", default=None, help="folder for results.json and the grid (default MODEL/eval)")
    evaluate.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="only these tasks (default all)")
    evaluate.add_argument("--max-prompts-per-task", type=int, default=None, metavar="N",
                          help="only the first N prompts of each task (a quick check; default all)")
    _add_sampling_arguments(evaluate, steps=25, scheduler="dpm")

    push = commands.add_parser("push", help="upload a pipeline folder to the Hub with a model card")
    push.add_argument("model", help="local pipeline folder")
    push.add_argument("repo_id", help="Hub repository id, e.g. user/shapes-ldm")
    push.add_argument("--private", action="store_true")
    push.add_argument("--commit-message", default="Upload latentdiff pipeline")
    push.add_argument("--dry-run", action="store_true", help="prepare the upload and list it; send nothing")

    shapes = commands.add_parser("shapes", help="write the built-in captioned shapes as an image folder")
    shapes.add_argument("out", help="output folder (images + metadata.jsonl)")
    shapes.add_argument("-n", "--num-samples", type=int, default=64)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--image-size", type=int, default=64)

    config = commands.add_parser("config", help="print the resolved training config")
    config.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    config.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = _HANDLERS[args.command]
    try:
        return handler(args) or 0
    except (ValueError, FileNotFoundError, OSError) as error:
        # Bad input gets one clear line, not a traceback.
        print(f"latentdiff {args.command}: error: {error}", file=sys.stderr)
        return 2


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from .config import config_to_dict, load_config

    print(yaml.safe_dump(config_to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0


def _cmd_shapes(args: argparse.Namespace) -> int:
    from .data.shapes import make_shapes_dataset, save_as_imagefolder

    dataset = make_shapes_dataset(args.num_samples, seed=args.seed, image_size=args.image_size)
    save_as_imagefolder(dataset, args.out)
    print(f"wrote {len(dataset)} captioned images to {args.out}")
    return 0


def _slug(text: str, max_length: int = 48) -> str:
    """A file-name-safe form of a prompt: lowercase words joined by dashes."""
    import re

    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_length].rstrip("-")
    return slug or "prompt"


def _cmd_generate(args: argparse.Namespace) -> int:
    """Write ``OUT/<index>-<slug>.png`` per image (image ``index`` drawn with seed ``--seed + index``, through
    :func:`latentdiff.sampling.generate`) and ``OUT/grid.png`` (one row per prompt)."""
    import os

    import torch
    from diffusers.utils import make_image_grid

    from .pipelines import LatentPipeline
    from .sampling import generate

    # Cheap checks first: loading the model is the slow part.
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    pipe = _use_scheduler(LatentPipeline.from_pretrained(args.model, allow_pickle=args.allow_pickle), args.scheduler)
    pipe = pipe.to(device)
    height, width = args.size if args.size else pipe.default_height_width()
    steps = pipe.sampling_default("num_inference_steps", args.steps)
    guidance = pipe.sampling_default("guidance_scale", args.guidance)
    settings = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                    negative_prompt=args.negative_prompt)
    jobs = [(prompt, args.seed + index) for index, prompt in enumerate(p for p in args.prompt for _ in range(args.num_images))]
    digits = max(3, len(str(len(jobs) - 1)))
    images = []
    for start, batch in generate(pipe, jobs, batch_size=args.num_images, **settings):
        os.makedirs(args.out, exist_ok=True)
        for index, ((prompt, seed), image) in enumerate(zip(jobs[start:], batch), start):
            path = os.path.join(args.out, f"{index:0{digits}d}-{_slug(prompt)}.png")
            image.save(path)
            print(f"{path}  (seed {seed})")
        images += batch
    grid_path = os.path.join(args.out, "grid.png")
    make_image_grid(images, rows=len(args.prompt), cols=args.num_images).save(grid_path)
    print(f"{grid_path}  ({len(args.prompt)} prompts x {args.num_images} images, guidance {guidance}, "
          f"{steps} {type(pipe.scheduler).__name__} steps)")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    """Upload a pipeline folder with its model card; ``--dry-run`` lists the files and sends nothing."""
    import os

    from .hub import push_folder_to_hub

    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"MODEL must be a local pipeline folder; no folder at {args.model!r}")
    result = push_folder_to_hub(
        args.model,
        args.repo_id,
        private=args.private,
        commit_message=args.commit_message,
        dry_run=args.dry_run,
    )
    if args.dry_run:
        print(f"dry run: would upload {len(result.files)} files to {args.repo_id}:")
        for name in result.files:
            print(f"  {name}")
        for path in result.left_out:
            print(f"  (left out: {path})")
    else:
        print(f"uploaded {args.model} to {result}")
    return 0


def _inpainting_pipeline(pipeline_class, args: argparse.Namespace):
    """Check the shared arguments, then load ``args.model`` as ``pipeline_class`` with the chosen sampler."""
    import torch

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
    pipe = _use_scheduler(pipeline_class.from_pretrained(args.model, allow_pickle=args.allow_pickle), args.scheduler)
    pipe.set_progress_bar_config(leave=False)
    return pipe.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _use_scheduler(pipe, name: str | None):
    """``--scheduler``, built from the model's schedule; ``None`` keeps the folder's own."""
    from .models.schedulers import scheduler_from_name

    if name is not None:
        pipe.scheduler = scheduler_from_name(name, pipe.scheduler.config)
    return pipe


def _open_image(path: str, what: str):
    import os

    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no image file at {path!r}")
    return Image.open(path)


def _save_images(images, out: str, prompt: str, seed: int) -> None:
    """``OUT/<index>-<slug>.png``, image ``index`` drawn with seed ``seed + index``."""
    import os

    os.makedirs(out, exist_ok=True)
    for index, image in enumerate(images):
        path = os.path.join(out, f"{index:03d}-{_slug(prompt)}.png")
        image.save(path)
        print(f"{path}  (seed {seed + index})")


def _cmd_inpaint(args: argparse.Namespace) -> int:
    """Repaint the white part of MASK in IMAGE (RePaint resampling with ``--repaint-samples`` > 1)."""
    import torch

    from .pipelines import LatentInpaintPipeline

    image = _open_image(args.image, "IMAGE").convert("RGB")
    mask = _open_image(args.mask, "MASK")
    pipe = _inpainting_pipeline(LatentInpaintPipeline, args)
    result = pipe(
        args.prompt,
        image=image,
        mask_image=mask,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        jump_length=args.repaint_jumps,
        jump_n_sample=args.repaint_samples,
        feather=args.feather,
        num_images_per_prompt=args.num_images,
        generator=[torch.Generator("cpu").manual_seed(args.seed + index) for index in range(args.num_images)],
    )
    _save_images(result.images, args.out, args.prompt, args.seed)
    return 0


def _cmd_outpaint(args: argparse.Namespace) -> int:
    """Extend IMAGE by ``--left/--right/--top/--bottom`` pixels and paint the new area."""
    import torch

    from .pipelines import LatentOutpaintPipeline

    for side in ("left", "right", "top", "bottom"):
        if getattr(args, side) < 0:
            raise ValueError(f"--{side} must be a non-negative number of pixels, got {getattr(args, side)}")
    if not any(getattr(args, side) for side in ("left", "right", "top", "bottom")):
        raise ValueError("nothing to outpaint: give --left, --right, --top or --bottom (pixels to add)")
    image = _open_image(args.image, "IMAGE").convert("RGB")
    pipe = _inpainting_pipeline(LatentOutpaintPipeline, args)
    result = pipe(
        args.prompt,
        image=image,
        left=args.left,
        right=args.right,
        top=args.top,
        bottom=args.bottom,
        fill=args.fill,
        strength=args.strength,
        jump_length=args.repaint_jumps,
        jump_n_sample=args.repaint_samples,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        generator=[torch.Generator("cpu").manual_seed(args.seed + index) for index in range(args.num_images)],
    )
    _save_images(result.images, args.out, args.prompt, args.seed)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """Run the shapes prompt suite on MODEL: print accuracy per task, write results.json and grid.png."""
    from .eval.adherence import evaluate_model, format_report

    results, paths = evaluate_model(
        args.model,
        args.out,
        images_per_prompt=args.images_per_prompt,
        steps=args.steps,
        scheduler=args.scheduler,
        guidance=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        negative_prompt=args.negative_prompt,
        tasks=args.tasks,
        max_prompts_per_task=args.max_prompts_per_task,
        device=args.device,
        allow_pickle=args.allow_pickle,
    )
    print(format_report(results))
    print(f"wrote {paths['results']} and {paths['grid']} ({results.wall_time_s:.0f} s)")
    return 0


_HANDLERS = {
    "generate": _cmd_generate,
    "inpaint": _cmd_inpaint,
    "outpaint": _cmd_outpaint,
    "eval": _cmd_eval,
    "push": _cmd_push,
    "shapes": _cmd_shapes,
    "config": _cmd_config,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

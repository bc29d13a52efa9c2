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

SCHEDULER_CHOICES = ("ddim", "dpm", "euler", "euler_a", "ddpm", "pndm")


def _size(text: str) -> tuple[int, int]:
    """Parse ``HxW`` (e.g. ``64x128``) or a single number for a square size."""
    try:
        if "x" in text.lower():
            height, width = text.lower().split("x")
            return int(height), int(width)
        return int(text), int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size expects HxW such as 64x64 or 64x128, got {text!r}") from None


def _add_sampling_arguments(parser: argparse.ArgumentParser, steps: int = 25) -> None:
    parser.add_argument("--steps", type=int, default=steps, help="denoising steps (default %(default)s)")
    parser.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default="dpm", help="sampler (default %(default)s)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
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
    outpaint.add_argument("-n", "--num-images", type=int, default=1)
    outpaint.add_argument("--out", default="outpainted")
    _add_sampling_arguments(outpaint)

    evaluate = commands.add_parser("eval", help="prompt-adherence evaluation on a prompt suite")
    evaluate.add_argument("model")
    evaluate.add_argument("--suite", choices=("shapes",), default="shapes")
    evaluate.add_argument("--images-per-prompt", type=int, default=4)
    evaluate.add_argument("--batch-size", type=int, default=32, help="images per pipeline call")
    evaluate.add_argument("--out", default=None, help="folder for results.json and the grid (default MODEL/eval)")
    _add_sampling_arguments(evaluate)

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


def _not_ready(args: argparse.Namespace) -> int:
    raise NotImplementedError(f"`latentdiff {args.command}` is not implemented yet")


_HANDLERS = {
    "generate": _not_ready,
    "inpaint": _not_ready,
    "outpaint": _not_ready,
    "eval": _not_ready,
    "push": _not_ready,
    "shapes": _cmd_shapes,
    "config": _cmd_config,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``latentdiff`` command: generate, edit and evaluate images with a trained latentdiff (or Stable
Diffusion) pipeline, serve it in a web demo, and publish it.

    latentdiff generate    MODEL "prompt" [-n N] [--steps S] [--scheduler dpm] [--guidance G] [--seed K]
    latentdiff img2img     MODEL IMAGE "prompt" [--strength 0.6]
    latentdiff inpaint     MODEL IMAGE MASK "prompt" [--repaint-jumps J --repaint-samples R]
    latentdiff outpaint    MODEL IMAGE "prompt" --left 32 --right 32
    latentdiff interpolate MODEL "prompt" --seeds 0 1 [--frames 8] [--out interpolation.gif]
    latentdiff demo        MODEL [--host 127.0.0.1] [--port 7860]
    latentdiff eval        MODEL --suite shapes [--images-per-prompt 4] [--steps 25] [--scheduler dpm]
    latentdiff push        MODEL REPO_ID
    latentdiff shapes      OUT_DIR [-n N]          (write the built-in data as an image folder)
    latentdiff config      [--config FILE ...] [key=value ...]   (print the resolved config)

Each subcommand's arguments are declared here; the work is done by the library.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .models.schedulers import SCHEDULER_NAMES as SCHEDULER_CHOICES

DESCRIPTION = (
    "Generate, edit and evaluate images with a latentdiff text-to-image diffusion model (a Diffusers pipeline "
    "folder or Hub id), try it in a web demo, and publish it to the Hugging Face Hub."
)
EPILOG = (
    "Models are trained with training/train_vae.py and training/train_ldm.py (see the README); "
    "'latentdiff COMMAND --help' describes each command."
)
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
MODEL_HELP = "pipeline folder (e.g. runs/shapes/pipeline) or Hugging Face Hub id"


def _size(text: str) -> tuple[int, int]:
    """Parse ``HxW`` (e.g. ``64x128``) or a single number for a square size."""
    try:
        if "x" in text.lower():
            height, width = text.lower().split("x")
            return int(height), int(width)
        return int(text), int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size expects HxW such as 64x64 or 64x128, got {text!r}") from None


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the pipeline runs and in which precision, and whether pickle weights may load."""
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="float32",
        help="weights and activations precision (default %(default)s; float16 or bfloat16 halve a GPU's memory use)",
    )
    parser.add_argument(
        "--allow-pickle", action="store_true",
        help="allow loading .bin/.ckpt (pickle) weights, which can run code: only for files you trust",
    )


def _add_sampling_arguments(
    parser: argparse.ArgumentParser,
    steps: int | None = None,
    scheduler: str | None = None,
    *,
    choose_scheduler: bool = True,
    seed: bool = True,
    interval: bool = True,
    rescale: bool = False,
    carry: bool = False,
) -> None:
    """The sampling arguments; a default left ``None`` is the model's own (the pipeline resolves it)."""
    own = "the model's own from latentdiff.json, else Diffusers'"
    parser.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default: {steps or own})")
    if choose_scheduler:
        parser.add_argument(
            "--scheduler", choices=SCHEDULER_CHOICES, default=scheduler,
            help=f"sampler (default: {scheduler or 'the one saved in the model folder'}; dpm is DPM-Solver++)",
        )
    parser.add_argument(
        "--guidance", type=float, default=None,
        help=f"classifier-free guidance scale; 1 turns guidance off (default: {own})",
    )
    if interval:
        parser.add_argument(
            "--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
            help="guidance only at timesteps LOW <= t <= HIGH, e.g. 0 600 (default: the model's own, else every step)",
        )
    if rescale:
        parser.add_argument(
            "--guidance-rescale", type=float, default=None, metavar="PHI",
            help="rescale the guided prediction toward the conditional one's standard deviation, 0-1 "
                 "(Lin et al. 2024 use 0.7 with a zero-terminal-SNR schedule; default 0: off)",
        )
    if seed:
        parser.add_argument(
            "--seed", type=int, default=0, help="random seed of the first image; image i uses seed + i (default %(default)s)"
        )
    parser.add_argument("--negative-prompt", default=None,
                        help="what guidance steers away from (default: the model's own, else none; \"\" for none)")
    if carry:
        parser.add_argument(
            "--negative-prompt-carry", default=None, metavar="REGEX",
            help="append each prompt's match of REGEX to the negative prompt, e.g. ' on an? \\w+ background$' "
                 "(default: the model's own, else none; \"\" for none)",
        )
    _add_model_arguments(parser)


def _add_repaint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repaint-jumps", type=int, default=1,
        help="RePaint jump length in steps (Lugmayr et al. 2022; default 1: plain blending)",
    )
    parser.add_argument(
        "--repaint-samples", type=int, default=1,
        help="RePaint resamplings per jump (default 1: off); more harmonise the new area with the kept one",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentdiff", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser(
        "generate", help="text-to-image: write images and a grid",
        description="Text-to-image: write OUT/<index>-<prompt>.png per image and OUT/grid.png (one row per prompt).",
    )
    generate.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    generate.add_argument("prompt", nargs="+", metavar="PROMPT", help="one or more prompts (quote each)")
    generate.add_argument("-n", "--num-images", type=int, default=4, help="images per prompt (default %(default)s)")
    generate.add_argument("--size", type=_size, default=None, help="HxW in pixels (default: the model's size)")
    generate.add_argument("--out", default="samples", help="output folder (default %(default)s)")
    _add_sampling_arguments(generate, rescale=True, carry=True)

    img2img = commands.add_parser(
        "img2img", help="image-to-image: redraw an image under a prompt",
        description="Image-to-image (SDEdit): noise IMAGE part of the way and denoise it under PROMPT.",
    )
    img2img.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    img2img.add_argument("image", metavar="IMAGE", help="starting image; its sides must be multiples of the autoencoder's factor")
    img2img.add_argument("prompt", metavar="PROMPT", help="what the result should show")
    img2img.add_argument(
        "--strength", type=float, default=0.6,
        help="in [0, 1]: how much to change; 0 keeps the image, 1 ignores it (default %(default)s)",
    )
    img2img.add_argument("-n", "--num-images", type=int, default=1, help="images to make (default %(default)s)")
    img2img.add_argument("--out", default="img2img", help="output folder (default %(default)s)")
    _add_sampling_arguments(img2img)

    inpaint = commands.add_parser(
        "inpaint", help="repaint the white part of a mask",
        description="Repaint the white part of MASK in IMAGE under PROMPT; the black part is kept exactly.",
    )
    inpaint.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    inpaint.add_argument("image", metavar="IMAGE", help="image to edit")
    inpaint.add_argument("mask", metavar="MASK", help="mask image of IMAGE's size: white = repaint, black = keep")
    inpaint.add_argument("prompt", metavar="PROMPT", help="what the repainted area should show")
    _add_repaint_arguments(inpaint)
    inpaint.add_argument("-n", "--num-images", type=int, default=1, help="images to make (default %(default)s)")
    inpaint.add_argument("--feather", type=int, default=0, help="feathered edge width in pixels (default 0)")
    inpaint.add_argument("--out", default="inpainted", help="output folder (default %(default)s)")
    _add_sampling_arguments(inpaint)

    outpaint = commands.add_parser(
        "outpaint", help="extend the canvas and fill the new area",
        description="Extend IMAGE by --left/--right/--top/--bottom pixels and paint the new area under PROMPT.",
    )
    outpaint.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    outpaint.add_argument("image", metavar="IMAGE", help="image to extend")
    outpaint.add_argument("prompt", metavar="PROMPT", help="what the whole extended image should show")
    for side in ("left", "right", "top", "bottom"):
        outpaint.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side} (default 0)")
    outpaint.add_argument(
        "--fill", choices=("noise", "edge", "blur"), default="edge",
        help="initial fill of the new area, used when --strength is below 1 (default %(default)s)",
    )
    outpaint.add_argument(
        "--strength", type=float, default=1.0, help="in (0, 1]: below 1 the new area starts from the fill (default 1)"
    )
    _add_repaint_arguments(outpaint)
    outpaint.add_argument("-n", "--num-images", type=int, default=1, help="images to make (default %(default)s)")
    outpaint.add_argument("--out", default="outpainted", help="output folder (default %(default)s)")
    _add_sampling_arguments(outpaint)

    interpolate = commands.add_parser(
        "interpolate", help="frames between the images of two or more seeds (a strip or a GIF)",
        description=(
            "Interpolate the initial noise between seeds (spherical interpolation, deterministic DDIM sampling) "
            "and write the frames as one strip image (.png) or an animated GIF (.gif)."
        ),
    )
    interpolate.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    interpolate.add_argument("prompt", metavar="PROMPT", help="the prompt of every frame")
    interpolate.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1], metavar="SEED",
        help="two or more seeds, visited in order (default: 0 1)",
    )
    interpolate.add_argument(
        "--frames", type=int, default=8, help="frames from one seed to the next, both ends included (default %(default)s)"
    )
    interpolate.add_argument(
        "--out", default="interpolation.png",
        help="output file: .png (or .jpg) for a strip, .gif for an animation (default %(default)s)",
    )
    interpolate.add_argument(
        "--frame-duration", type=int, default=120, help="milliseconds per GIF frame (default %(default)s)"
    )
    interpolate.add_argument("--size", type=_size, default=None, help="HxW in pixels (default: the model's size)")
    interpolate.add_argument("--batch-size", type=int, default=8, help="frames denoised per pipeline call (default %(default)s)")
    # Interpolation always samples with deterministic DDIM, from the noise of each of --seeds.
    _add_sampling_arguments(interpolate, choose_scheduler=False, seed=False, interval=False)

    demo = commands.add_parser(
        "demo", help="a web page to try the model: text-to-image, image-to-image, inpainting, outpainting",
        description="Serve MODEL in a Gradio web app (pip install 'latentdiff[demo]'); open the printed address.",
    )
    demo.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    demo.add_argument(
        "--host", default="127.0.0.1",
        help="address to listen on (default %(default)s: this machine only; 0.0.0.0 serves the local network)",
    )
    demo.add_argument("--port", type=int, default=7860, help="port to listen on (default %(default)s)")
    demo.add_argument(
        "--max-queue", type=int, default=16, help="requests that may wait their turn before new ones are refused (default %(default)s)"
    )
    _add_model_arguments(demo)

    evaluate = commands.add_parser(
        "eval", help="prompt-adherence evaluation on a prompt suite",
        description="Generate the prompt suite's images, judge each, and report accuracy per task.",
    )
    evaluate.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    evaluate.add_argument("--suite", choices=("shapes",), default="shapes", help="prompt suite (default %(default)s)")
    evaluate.add_argument("--images-per-prompt", type=int, default=4, help="images (seeds) per prompt (default %(default)s)")
    evaluate.add_argument("--batch-size", type=int, default=32, help="images per pipeline call (default %(default)s)")
    evaluate.add_argument("--out", default=None, help="folder for results.json and the grid (default MODEL/eval)")
    evaluate.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="only these tasks (default all)")
    evaluate.add_argument("--max-prompts-per-task", type=int, default=None, metavar="N",
                          help="only the first N prompts of each task (a quick check; default all)")
    _add_sampling_arguments(evaluate, steps=25, scheduler="dpm", rescale=True, carry=True)

    push = commands.add_parser(
        "push", help="upload a pipeline folder to the Hub with a model card",
        description="Upload a local pipeline folder to a Hugging Face Hub repository, with its model card.",
    )
    push.add_argument("model", metavar="MODEL", help="local pipeline folder")
    push.add_argument("repo_id", metavar="REPO_ID", help="Hub repository id, e.g. user/shapes-ldm")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--commit-message", default="Upload latentdiff pipeline", help="commit message (default: %(default)r)")
    push.add_argument("--dry-run", action="store_true", help="prepare the upload and list it; send nothing")

    shapes = commands.add_parser(
        "shapes", help="write the built-in captioned shapes as an image folder",
        description="Write the built-in captioned shapes as OUT/ images with a metadata.jsonl of captions.",
    )
    shapes.add_argument("out", metavar="OUT", help="output folder (images + metadata.jsonl)")
    shapes.add_argument("-n", "--num-samples", type=int, default=64, help="images to write (default %(default)s)")
    shapes.add_argument("--seed", type=int, default=0, help="data seed: the same seed writes the same images (default %(default)s)")
    shapes.add_argument("--image-size", type=int, default=64, help="side of the square images in pixels (default %(default)s)")

    config = commands.add_parser(
        "config", help="print the resolved training config",
        description="Print the configuration a training run would use: defaults, then each --config file, then overrides.",
    )
    config.add_argument("--config", action="append", default=[], help="YAML config file (repeatable, later ones win)")
    config.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=20")
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

    from diffusers.utils import make_image_grid

    from .pipelines import LatentPipeline
    from .sampling import generate

    pipe = _load_pipeline(LatentPipeline, args)
    height, width = args.size if args.size else pipe.default_height_width()
    steps = pipe.sampling_default("num_inference_steps", args.steps)
    guidance = pipe.sampling_default("guidance_scale", args.guidance)
    settings = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                    negative_prompt=args.negative_prompt, guidance_interval=args.guidance_interval,
                    guidance_rescale=args.guidance_rescale, negative_prompt_carry=args.negative_prompt_carry)
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


def _load_pipeline(pipeline_class, args: argparse.Namespace):
    """Check the shared arguments, then load ``args.model`` as ``pipeline_class`` in ``--dtype`` on
    ``--device``, with the chosen sampler (cheap checks first: loading the model is the slow part)."""
    import torch

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if getattr(args, "num_images", 1) < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
    pipe = pipeline_class.from_pretrained(
        args.model, allow_pickle=args.allow_pickle, torch_dtype=getattr(torch, DTYPES[args.dtype])
    )
    pipe = _use_scheduler(pipe, getattr(args, "scheduler", None))
    pipe.set_progress_bar_config(leave=False)
    return pipe.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _sampling_arguments(args: argparse.Namespace) -> dict:
    """The pipeline arguments every image command takes alike: negative prompt, steps, guidance and
    ``--num-images`` images, image ``index`` drawn with seed ``--seed + index``."""
    import torch

    return dict(
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        guidance_interval=args.guidance_interval,
        num_images_per_prompt=args.num_images,
        generator=[torch.Generator("cpu").manual_seed(args.seed + index) for index in range(args.num_images)],
    )


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
    from .pipelines import LatentInpaintPipeline

    image = _open_image(args.image, "IMAGE").convert("RGB")
    mask = _open_image(args.mask, "MASK")
    pipe = _load_pipeline(LatentInpaintPipeline, args)
    result = pipe(
        args.prompt,
        image=image,
        mask_image=mask,
        jump_length=args.repaint_jumps,
        jump_n_sample=args.repaint_samples,
        feather=args.feather,
        **_sampling_arguments(args),
    )
    _save_images(result.images, args.out, args.prompt, args.seed)
    return 0


def _cmd_outpaint(args: argparse.Namespace) -> int:
    """Extend IMAGE by ``--left/--right/--top/--bottom`` pixels and paint the new area."""
    from .pipelines import LatentOutpaintPipeline

    for side in ("left", "right", "top", "bottom"):
        if getattr(args, side) < 0:
            raise ValueError(f"--{side} must be a non-negative number of pixels, got {getattr(args, side)}")
    if not any(getattr(args, side) for side in ("left", "right", "top", "bottom")):
        raise ValueError("nothing to outpaint: give --left, --right, --top or --bottom (pixels to add)")
    image = _open_image(args.image, "IMAGE").convert("RGB")
    pipe = _load_pipeline(LatentOutpaintPipeline, args)
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
        **_sampling_arguments(args),
    )
    _save_images(result.images, args.out, args.prompt, args.seed)
    return 0


def _cmd_img2img(args: argparse.Namespace) -> int:
    """Redraw IMAGE under PROMPT (SDEdit: noise to ``--strength``, then denoise)."""
    from .pipelines import LatentImg2ImgPipeline

    if not 0.0 <= args.strength <= 1.0:
        raise ValueError(f"--strength must be in [0, 1] (0 keeps the image, 1 ignores it), got {args.strength}")
    image = _open_image(args.image, "IMAGE").convert("RGB")
    pipe = _load_pipeline(LatentImg2ImgPipeline, args)
    result = pipe(
        args.prompt,
        image=image,
        strength=args.strength,
        **_sampling_arguments(args),
    )
    _save_images(result.images, args.out, args.prompt, args.seed)
    return 0


def _cmd_interpolate(args: argparse.Namespace) -> int:
    """Frames between the images of ``--seeds`` (``LatentPipeline.interpolate``), as a strip or a GIF."""
    import os

    from diffusers.utils import make_image_grid

    from .pipelines import LatentPipeline

    if len(args.seeds) < 2:
        raise ValueError(f"--seeds needs at least two seeds to interpolate between, got {args.seeds}")
    if args.frames < 2:
        raise ValueError(f"--frames must be at least 2 (both ends included), got {args.frames}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.frame_duration < 1:
        raise ValueError(f"--frame-duration must be a positive number of milliseconds, got {args.frame_duration}")
    extension = os.path.splitext(args.out)[1].lower()
    if extension not in (".png", ".jpg", ".jpeg", ".webp", ".gif"):
        raise ValueError(f"--out must end in .png, .jpg or .webp (a strip) or .gif (an animation), got {args.out!r}")
    pipe = _load_pipeline(LatentPipeline, args)
    height, width = args.size if args.size else pipe.default_height_width()
    frames = []
    for seed_a, seed_b in zip(args.seeds, args.seeds[1:]):
        leg = pipe.interpolate(
            args.prompt,
            seed_a,
            seed_b,
            num_frames=args.frames,
            negative_prompt=args.negative_prompt,
            height=height,
            width=width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            batch_size=args.batch_size,
        )
        frames += leg if not frames else leg[1:]  # a leg starts where the previous one ended
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    if extension == ".gif":
        frames[0].save(args.out, save_all=True, append_images=frames[1:], duration=args.frame_duration, loop=0)
        print(f"{args.out}  ({len(frames)} frames, seeds {' -> '.join(map(str, args.seeds))})")
    else:
        make_image_grid(frames, rows=1, cols=len(frames)).save(args.out)
        print(f"{args.out}  (a strip of {len(frames)} frames, seeds {' -> '.join(map(str, args.seeds))})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Serve MODEL in the Gradio web demo until interrupted."""
    from .demo import launch_demo

    launch_demo(
        args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=DTYPES[args.dtype],
        allow_pickle=args.allow_pickle,
        max_queue=args.max_queue,
    )
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
        negative_prompt_carry=args.negative_prompt_carry,
        guidance_interval=args.guidance_interval,
        guidance_rescale=args.guidance_rescale,
        tasks=args.tasks,
        max_prompts_per_task=args.max_prompts_per_task,
        device=args.device,
        dtype=DTYPES[args.dtype],
        allow_pickle=args.allow_pickle,
    )
    print(format_report(results))
    print(f"wrote {paths['results']} and {paths['grid']} ({results.wall_time_s:.0f} s)")
    return 0


_HANDLERS = {
    "generate": _cmd_generate,
    "img2img": _cmd_img2img,
    "interpolate": _cmd_interpolate,
    "demo": _cmd_demo,
    "inpaint": _cmd_inpaint,
    "outpaint": _cmd_outpaint,
    "eval": _cmd_eval,
    "push": _cmd_push,
    "shapes": _cmd_shapes,
    "config": _cmd_config,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The web demo: ``latentdiff demo MODEL`` serves one loaded pipeline in a Gradio app.

Four tabs over the same weights (the image pipelines are made with Diffusers' ``from_pipe``, which
shares every module): text-to-image, image-to-image, inpainting (a mask painted on the image in the
page, or uploaded) and outpainting. The controls start at the model's own sampling defaults
(``latentdiff.json``), else Diffusers', as a pipeline call without them would. Every request goes
through Gradio's queue, one at a time on the model (the pipelines share one set of modules), with a
progress bar that follows the sampler's steps.

Inputs are checked by the pipelines themselves: a ``ValueError`` they raise (an empty prompt, a mask of
another size than the image, zero steps, ...) is shown in the page as that message, never as a stack
trace. Needs the ``demo`` extra: ``pip install 'latentdiff[demo]'``.
"""

from __future__ import annotations

import functools
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .models.schedulers import SCHEDULER_NAMES, scheduler_class, scheduler_from_name

__all__ = ["DemoPipelines", "build_demo", "launch_demo", "load_demo_pipelines"]

MAX_IMAGES = 8
"""Most images one request may ask for (the slider's end)."""
QUEUE_ID = "model"
"""Gradio concurrency group of every event that runs the model: one request at a time."""
SAMPLER_LABELS = {
    "dpm": "DPM-Solver++ (dpm)",
    "ddim": "DDIM (ddim)",
    "ddpm": "DDPM (ddpm)",
    "euler": "Euler (euler)",
    "euler_a": "Euler ancestral (euler_a)",
    "pndm": "PNDM (pndm)",
}


@dataclass
class DemoPipelines:
    """The pipelines of the demo, sharing one set of modules, and the model's sampling defaults."""

    text_to_image: Any
    image_to_image: Any
    inpaint: Any
    outpaint: Any
    name: str = "model"
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the images the model was trained on."""
        return self.text_to_image.default_height_width()

    @property
    def size_factor(self) -> int:
        """Image sides must be multiples of this (the autoencoder's downsampling factor)."""
        return self.text_to_image.vae_scale_factor

    @property
    def guidance_scale(self) -> float:
        """The model's own (``latentdiff.json``), else Diffusers' default: what a call without one uses."""
        return float(self.text_to_image.sampling_default("guidance_scale", None))

    @property
    def num_inference_steps(self) -> int:
        """The model's own, else Diffusers' default, as for :attr:`guidance_scale`."""
        return int(self.text_to_image.sampling_default("num_inference_steps", None))

    @property
    def sampler(self) -> str:
        """The model's own sampler (``latentdiff.json``), else the one its folder holds, else ``dpm``."""
        name = self.defaults.get("scheduler")
        if name in SCHEDULER_NAMES:
            return name
        own = type(self.text_to_image.scheduler).__name__
        return next((name for name in SCHEDULER_NAMES if scheduler_class(name).__name__ == own), "dpm")

    @property
    def example_prompt(self) -> str:
        return str(self.defaults.get("example_prompt", ""))

    @classmethod
    def from_pipeline(cls, pipeline, name: str = "model") -> DemoPipelines:
        """The four pipelines over ``pipeline``'s modules (a ``LatentPipeline``)."""
        from .pipelines import LatentImg2ImgPipeline, LatentInpaintPipeline, LatentOutpaintPipeline

        pipelines = [pipeline] + [
            kind.from_pipe(pipeline) for kind in (LatentImg2ImgPipeline, LatentInpaintPipeline, LatentOutpaintPipeline)
        ]
        for each in pipelines:
            each.set_progress_bar_config(leave=False)
        defaults = dict(getattr(pipeline, "sampling_defaults", None) or {})
        return cls(*pipelines, name=name, defaults=defaults)


def load_demo_pipelines(
    model: str, device: str | None = None, dtype: str = "float32", allow_pickle: bool = False
) -> DemoPipelines:
    """Load ``model`` (a pipeline folder or Hub id) once, in ``dtype`` on ``device``."""
    from .pipelines import LatentPipeline

    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    pipeline = LatentPipeline.from_pretrained(model, allow_pickle=allow_pickle, torch_dtype=getattr(torch, dtype))
    pipeline = pipeline.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return DemoPipelines.from_pipeline(pipeline, name=model)


# --------------------------------------------------------------------------------------------
# What each tab runs (plain functions: the Gradio events call them)
# --------------------------------------------------------------------------------------------


def _pipeline_errors_in_the_page(function):
    """Show a ``ValueError`` raised by a pipeline's input checks as its message in the page.

    ``gr.Error`` is Gradio's way to report a failure to the visitor: the page shows the message
    (no stack trace) and ``gradio_client`` raises it as ``AppError``.
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        import gradio as gr

        try:
            return function(*args, **kwargs)
        except ValueError as error:
            raise gr.Error(str(error), print_exception=False) from None

    return wrapper


def _seeds(seed, randomize: bool, count) -> tuple[int, list[torch.Generator], list[int]]:
    """The first seed (drawn when ``randomize``), one CPU generator per image, and the seeds used."""
    first = secrets.randbelow(2**31) if randomize or seed is None else int(seed)
    count = int(count) if count is not None else 1
    seeds = [first + index for index in range(max(count, 0))]
    return first, [torch.Generator("cpu").manual_seed(value) for value in seeds], seeds


def _prompt(text: str | None) -> str | None:
    """An empty text box is no prompt (``None``): the pipeline then says that a prompt is needed."""
    return text if text and text.strip() else None


def _sampler(pipeline, name: str) -> None:
    """Give ``pipeline`` the named sampler, built from its training noise schedule."""
    if name not in SCHEDULER_NAMES:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SCHEDULER_NAMES)}")
    # A new instance per request: multistep samplers (DPM-Solver++) keep state between steps.
    pipeline.scheduler = scheduler_from_name(name, pipeline.scheduler.config)


def _captioned(images: list[Image.Image], seeds: list[int]) -> list[tuple[Image.Image, str]]:
    return [(image, f"seed {seed}") for image, seed in zip(images, seeds)]


def _number(value, name: str):
    """A number field left empty is an error that names it (Gradio passes ``None``)."""
    if value is None:
        raise ValueError(f"`{name}` is empty; enter a number.")
    return int(value) if float(value).is_integer() else value


def _sample(pipe, sampler, seed, randomize_seed, prompt, negative_prompt, num_images, steps, guidance, **inputs):
    """Run ``pipe`` with the controls every tab shares plus its own ``inputs``: ``(gallery items, first
    seed used)``."""
    _sampler(pipe, sampler)
    first, generators, seeds = _seeds(seed, randomize_seed, num_images)
    images = pipe(
        _prompt(prompt),
        **inputs,
        # The box starts with the model's saved negative prompt; what it holds is what is used (empty: none).
        negative_prompt=negative_prompt.strip() if isinstance(negative_prompt, str) else "",
        num_inference_steps=_number(steps, "steps"),
        guidance_scale=float(guidance),
        num_images_per_prompt=_number(num_images, "images"),
        generator=generators,
    ).images
    return _captioned(images, seeds), first


def text_to_image(pipelines: DemoPipelines, prompt, negative_prompt, num_images, steps, guidance, sampler, seed,
                  randomize_seed, progress=None):
    """Images for a prompt: ``(gallery items, first seed used)``."""
    return _sample(pipelines.text_to_image, sampler, seed, randomize_seed, prompt, negative_prompt, num_images, steps,
                   guidance)


def image_to_image(pipelines: DemoPipelines, image, prompt, negative_prompt, strength, num_images, steps, guidance,
                   sampler, seed, randomize_seed, progress=None):
    """``image`` redrawn under the prompt (SDEdit): ``(gallery items, first seed used)``."""
    if image is None:
        raise ValueError("`image` is required: upload the image to redraw.")
    return _sample(pipelines.image_to_image, sampler, seed, randomize_seed, prompt, negative_prompt, num_images, steps,
                   guidance, image=image.convert("RGB"), strength=float(strength))


def editor_image_and_mask(editor_value, uploaded_mask=None) -> tuple[Image.Image | None, Image.Image | None]:
    """The image and the mask of the inpainting tab.

    ``editor_value`` is ``gr.ImageEditor``'s value (``background``, ``layers``, ``composite``): the
    image is the background and the mask is every pixel painted on a layer (alpha above 0), white on
    black. An ``uploaded_mask`` (white = repaint) takes the place of the painted one, as it is.
    """
    if not editor_value or editor_value.get("background") is None:
        return None, uploaded_mask
    background = editor_value["background"]
    image = background.convert("RGB")
    if uploaded_mask is not None:
        return image, uploaded_mask
    painted = np.zeros((image.height, image.width), dtype=bool)
    for layer in editor_value.get("layers") or []:
        if layer is None:
            continue
        alpha = np.asarray(layer.convert("RGBA"))[..., 3]
        if alpha.shape != painted.shape:  # the editor keeps layers at the background's size
            raise ValueError(
                f"a painted layer is {alpha.shape[0]}x{alpha.shape[1]} (HxW) but the image is "
                f"{image.height}x{image.width}; paint on the image itself."
            )
        painted |= alpha > 0
    return image, Image.fromarray(painted.astype(np.uint8) * 255, mode="L")


def inpaint(pipelines: DemoPipelines, editor_value, uploaded_mask, prompt, negative_prompt, jump_length,
            jump_n_sample, num_images, steps, guidance, sampler, seed, randomize_seed, progress=None):
    """Repaint the painted (or uploaded-mask) part of the image: ``(gallery items, first seed used)``."""
    image, mask = editor_image_and_mask(editor_value, uploaded_mask)
    if image is None:
        raise ValueError("`image` is required: upload the image to inpaint, then paint over the part to repaint.")
    if mask is not None and uploaded_mask is None and not np.asarray(mask).any():
        raise ValueError("nothing to repaint: paint over the part of the image to repaint, or upload a mask.")
    return _sample(pipelines.inpaint, sampler, seed, randomize_seed, prompt, negative_prompt, num_images, steps,
                   guidance, image=image, mask_image=mask, jump_length=_number(jump_length, "jump length"),
                   jump_n_sample=_number(jump_n_sample, "resamplings"))


def outpaint(pipelines: DemoPipelines, image, prompt, negative_prompt, left, right, top, bottom, jump_length,
             jump_n_sample, num_images, steps, guidance, sampler, seed, randomize_seed, progress=None):
    """Extend the image by the four margins and paint the new area: ``(gallery items, first seed used)``."""
    if image is None:
        raise ValueError("`image` is required: upload the image to extend.")
    return _sample(pipelines.outpaint, sampler, seed, randomize_seed, prompt, negative_prompt, num_images, steps,
                   guidance, image=image.convert("RGB"), left=_number(left, "left"), right=_number(right, "right"),
                   top=_number(top, "top"), bottom=_number(bottom, "bottom"),
                   jump_length=_number(jump_length, "jump length"), jump_n_sample=_number(jump_n_sample, "resamplings"))


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


def build_demo(pipelines: DemoPipelines, max_queue: int = 16):
    """The Gradio app (``gr.Blocks``) over ``pipelines``, with its queue set up; launch it with
    ``.launch()``. The events' API names: ``text_to_image``, ``image_to_image``, ``inpaint``, ``outpaint``."""
    import gradio as gr

    height, width = pipelines.size
    factor = pipelines.size_factor
    margin = max(factor, (width // 4) // factor * factor)
    sampler_choices = [(SAMPLER_LABELS.get(name, name), name) for name in SCHEDULER_NAMES]

    def sampling_controls(num_images_default: int, tab: str):
        """Images, steps, guidance, sampler, seed and 'random seed' (in this order)."""
        with gr.Row():
            num_images = gr.Slider(1, MAX_IMAGES, value=num_images_default, step=1, label="Images")
            steps = gr.Number(value=pipelines.num_inference_steps, precision=0, label="Steps")
            guidance = gr.Slider(1.0, 15.0, value=pipelines.guidance_scale, step=0.5, label="Guidance scale")
        with gr.Row():
            sampler = gr.Dropdown(sampler_choices, value=pipelines.sampler, label="Sampler")
            seed = gr.Number(value=0, precision=0, label="Seed (of the first image; image i uses seed + i)")
            randomize = gr.Checkbox(value=True, label="Random seed (the seed used is shown)",
                                    elem_id=f"{tab}-random-seed")
        return num_images, steps, guidance, sampler, seed, randomize

    def prompts(tab: str):
        prompt = gr.Textbox(label="Prompt", value=pipelines.example_prompt, placeholder="a red circle at the top left",
                            elem_id=f"{tab}-prompt")
        negative = gr.Textbox(label="Negative prompt", value=pipelines.defaults.get("negative_prompt", ""),
                              placeholder="what to steer away from (optional)", elem_id=f"{tab}-negative-prompt")
        return prompt, negative

    def repaint_controls():
        with gr.Row():
            jumps = gr.Number(value=1, precision=0, label="RePaint jump length (1: plain blending)")
            resamplings = gr.Number(value=1, precision=0, label="RePaint resamplings (1: off)")
        return jumps, resamplings

    def gallery(tab: str):
        return gr.Gallery(label="Images", columns=4, height="auto", format="png", object_fit="contain",
                          elem_id=f"{tab}-gallery")

    def event(function):
        """Bind ``function`` to these pipelines, with the page's error display and a progress bar."""

        @_pipeline_errors_in_the_page
        def run(*inputs, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (Gradio's progress idiom)
            return function(pipelines, *inputs)

        run.__name__ = function.__name__
        return run

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline
    with gr.Blocks(title=f"latentdiff: {pipelines.name}", analytics_enabled=False) as demo:
        gr.Markdown(
            f"## latentdiff: {pipelines.name}\n"
            f"Text-to-image diffusion model; it makes {height}x{width} images. Image inputs need sides that "
            f"are multiples of {factor} pixels. Default guidance {pipelines.guidance_scale:g}, "
            f"{pipelines.num_inference_steps} steps."
        )
        with gr.Tab("Text to image"):
            prompt, negative = prompts("text-to-image")
            controls = sampling_controls(4, "text-to-image")
            button = gr.Button("Generate", variant="primary", elem_id="text-to-image-run")
            output = gallery("text-to-image")
            button.click(event(text_to_image), [prompt, negative, *controls], [output, controls[4]],
                         api_name="text_to_image", concurrency_id=QUEUE_ID, concurrency_limit=1)

        with gr.Tab("Image to image"):
            with gr.Row():
                source = gr.Image(type="pil", label="Image", image_mode="RGB", format="png")
                output = gallery("image-to-image")
            prompt, negative = prompts("image-to-image")
            strength = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="Strength (0 keeps the image, 1 ignores it)")
            controls = sampling_controls(2, "image-to-image")
            button = gr.Button("Redraw", variant="primary", elem_id="image-to-image-run")
            button.click(event(image_to_image), [source, prompt, negative, strength, *controls],
                         [output, controls[4]], api_name="image_to_image", concurrency_id=QUEUE_ID,
                         concurrency_limit=1)

        with gr.Tab("Inpainting"):
            with gr.Row():
                editor = gr.ImageEditor(
                    type="pil", label="Image: paint over the part to repaint", format="png",
                    brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), layers=False,
                    transforms=(), sources=("upload", "clipboard"),
                )
                output = gallery("inpainting")
            mask = gr.Image(type="pil", label="Or upload a mask (white = repaint, black = keep)", image_mode="L",
                            format="png", height=160)
            prompt, negative = prompts("inpainting")
            repaint = repaint_controls()
            controls = sampling_controls(2, "inpainting")
            button = gr.Button("Inpaint", variant="primary", elem_id="inpainting-run")
            button.click(event(inpaint), [editor, mask, prompt, negative, *repaint, *controls],
                         [output, controls[4]], api_name="inpaint", concurrency_id=QUEUE_ID, concurrency_limit=1)

        with gr.Tab("Outpainting"):
            with gr.Row():
                source = gr.Image(type="pil", label="Image", image_mode="RGB", format="png")
                output = gallery("outpainting")
            prompt, negative = prompts("outpainting")
            with gr.Row():
                margins = [
                    gr.Number(value=margin if side in ("left", "right") else 0, precision=0,
                              label=f"{side.capitalize()} (pixels to add)")
                    for side in ("left", "right", "top", "bottom")
                ]
            repaint = repaint_controls()
            controls = sampling_controls(2, "outpainting")
            button = gr.Button("Outpaint", variant="primary", elem_id="outpainting-run")
            button.click(event(outpaint), [source, prompt, negative, *margins, *repaint, *controls],
                         [output, controls[4]], api_name="outpaint", concurrency_id=QUEUE_ID, concurrency_limit=1)

    demo.queue(max_size=max_queue, default_concurrency_limit=1)
    demo.latentdiff_theme = theme  # Gradio 6 takes the theme at launch
    return demo


def launch_demo(
    model: str,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str | None = None,
    dtype: str = "float32",
    allow_pickle: bool = False,
    max_queue: int = 16,
    block: bool = True,
):
    """Load ``model`` and serve the demo on ``http://host:port`` (blocks until interrupted unless
    ``block=False``, which returns the running app)."""
    try:
        import gradio  # noqa: F401
    except ImportError as error:
        raise ImportError("the web demo needs Gradio: pip install 'latentdiff[demo]'") from error
    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    if max_queue < 1:
        raise ValueError(f"--max-queue must be at least 1, got {max_queue}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    demo = build_demo(load_demo_pipelines(model, device=device, dtype=dtype, allow_pickle=allow_pickle), max_queue)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, theme=demo.latentdiff_theme)
    return demo

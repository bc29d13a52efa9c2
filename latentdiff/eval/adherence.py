"""Prompt adherence of a text-to-image pipeline on the shapes suite (GenEval-style), and ``latentdiff eval``.

:func:`evaluate_adherence` generates ``images_per_prompt`` images for every prompt of a
:func:`~latentdiff.eval.suite.shapes_suite` (many prompts per pipeline call), reads each with the
rule-based judge (:func:`~latentdiff.eval.judge.judge_image`) and checks it against the prompt
(:func:`~latentdiff.eval.suite.failure_reason`). Scores follow GenEval (Ghosh et al. 2023): accuracy
per task, and overall as the mean of the per-task accuracies over the seen tasks; the ``unseen``
task (combinations held out of training) is reported on its own.

Image ``j`` of a prompt is drawn with its own CPU generator seeded by :func:`image_seed` from
``(seed, prompt, j)``, so every image is reproducible whatever the batch size, the other prompts in
its batch, or the subset of the suite that is run; the seed is recorded with each image, and
``latentdiff generate MODEL "PROMPT" -n 1 --seed SEED`` (same sampler, steps and guidance) redraws it.

:func:`evaluate_model` is the whole ``latentdiff eval`` command: it loads a pipeline folder, takes
the suite's holdout from the model's training config and the guidance from its sampling defaults,
runs the suite and writes ``results.json`` and ``grid.png``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..sampling import generate

from .suite import (
    DEFAULT_HOLDOUT,
    SHAPES_SUITE_VERSION,
    TASKS,
    PromptSpec,
    failure_reason,
    has_right_count,
    shapes_suite,
    summarize,
)

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "AdherenceResults",
    "adherence_grid",
    "evaluate_adherence",
    "evaluate_model",
    "format_report",
    "format_table",
    "generate_images",
    "image_seed",
    "model_holdout",
    "select_prompts",
]

#: Guidance when neither the caller nor the model's sampling defaults (``latentdiff.json``) name one.
from ..config import DEFAULT_GUIDANCE_SCALE  # noqa: E402  (re-exported)
RESULTS_FILE = "results.json"
GRID_FILE = "grid.png"


# --------------------------------------------------------------------------------------------
# The suite and the seeds
# --------------------------------------------------------------------------------------------


def select_prompts(
    suite: Sequence[PromptSpec], tasks: Sequence[str] | None = None, max_prompts_per_task: int | None = None
) -> list[PromptSpec]:
    """The prompts of ``suite`` in the given ``tasks`` (default all), the first ``max_prompts_per_task``
    of each task (default all), in suite order."""
    if tasks is not None:
        unknown = [task for task in tasks if task not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; the shapes suite's tasks are {', '.join(TASKS)}")
    if max_prompts_per_task is not None and (not isinstance(max_prompts_per_task, int) or max_prompts_per_task < 1):
        raise ValueError(f"max_prompts_per_task must be a positive integer, got {max_prompts_per_task!r}")
    chosen: list[PromptSpec] = []
    taken: dict[str, int] = {}
    for spec in suite:
        if tasks is not None and spec.task not in tasks:
            continue
        if max_prompts_per_task is not None and taken.get(spec.task, 0) >= max_prompts_per_task:
            continue
        taken[spec.task] = taken.get(spec.task, 0) + 1
        chosen.append(spec)
    if not chosen:
        raise ValueError(
            f"no prompts selected (tasks {list(tasks) if tasks is not None else 'all'}); note that the unseen task "
            "is empty when the model was trained without a holdout"
        )
    return chosen


def image_seed(seed: int, prompt: str, image_index: int) -> int:
    """The generator seed of image ``image_index`` of ``prompt``: a stable hash of the three (31 bits).

    Independent noise per prompt (as GenEval draws it), yet a function of the prompt text alone, so a
    subset of the suite draws the same images as the full suite.
    """
    digest = hashlib.sha256(f"latentdiff-eval/{seed}/{image_index}/{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------
# Generating and judging
# --------------------------------------------------------------------------------------------


@dataclass
class AdherenceResults:
    """What :func:`evaluate_adherence` produced: one record and one image per generated image."""

    records: list[dict[str, Any]]
    """Per image: ``index``, ``prompt``, ``task``, ``image_index``, ``seed``, ``passed``, ``reason``
    (``None`` when passed) and ``judged`` (background, objects and specks the judge saw)."""
    images: list[Image.Image]
    settings: dict[str, Any]
    """Sampler settings: scheduler, steps, guidance_scale, seed, images_per_prompt, negative_prompt, batch_size."""
    summary: dict[str, Any]
    """:func:`~latentdiff.eval.suite.summarize` of the records: ``tasks``, ``overall``, ``unseen``."""
    wall_time_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything the caller adds to the JSON (model path, holdout and its source, ...)."""

    @property
    def num_prompts(self) -> int:
        return len({record["prompt"] for record in self.records})

    @property
    def overall(self) -> float | None:
        return self.summary["overall"]

    @property
    def unseen(self) -> float | None:
        return self.summary["unseen"]

    def to_json(self) -> dict[str, Any]:
        """The ``results.json`` layout."""
        return {
            "suite": SHAPES_SUITE_VERSION,
            **self.extra,
            "sampler": self.settings,
            "num_prompts": self.num_prompts,
            "num_images": len(self.records),
            "overall": self.summary["overall"],
            "unseen": self.summary["unseen"],
            "right_count": self.summary.get("right_count"),
            "tasks": self.summary["tasks"],
            "wall_time_s": round(self.wall_time_s, 2),
            "images": self.records,
        }


def _judged_summary(judged: Any) -> dict[str, Any]:
    return {
        "background": judged.background,
        "objects": [
            {"color": obj.color, "shape": obj.shape, "size": obj.size, "position": obj.position}
            for obj in judged.objects
        ],
        "specks": judged.specks,
    }


def _check_sampling(steps: int, guidance: float, batch_size: int) -> None:
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(guidance, (int, float)) or guidance < 0:
        raise ValueError(f"guidance must be a non-negative number, got {guidance!r}")


def _model_setting(pipeline: Any, name: str, value: Any) -> Any:
    """``value`` if given, else the pipeline's own default for ``name`` (``sampling_default``: the model's saved
    one, then Diffusers'); a pipeline without sampling defaults gets ``value`` back."""
    resolve = getattr(pipeline, "sampling_default", None)
    return resolve(name, value) if resolve is not None else value


def _model_guidance(pipeline: Any, guidance: float | None) -> float:
    """``guidance`` if given, else the pipeline's own default, else :data:`DEFAULT_GUIDANCE_SCALE`."""
    if guidance is not None:
        return guidance
    resolved = _model_setting(pipeline, "guidance_scale", None)
    return float(resolved) if resolved is not None else DEFAULT_GUIDANCE_SCALE


def _model_guidance_interval(pipeline: Any, interval: Sequence[float] | None) -> list[float] | None:
    """``interval`` if given, else the pipeline's saved one (``None``: guidance at every step)."""
    interval = _model_setting(pipeline, "guidance_interval", interval)
    return [float(value) for value in interval] if interval is not None else None


def _model_negative_prompt(pipeline: Any, negative_prompt: str | None) -> str | None:
    """``negative_prompt`` if given, else the pipeline's saved one (``None``: the empty caption)."""
    return _model_setting(pipeline, "negative_prompt", negative_prompt) or None


def _call_settings(
    steps: int | None, guidance: float | None, negative_prompt: str | None, guidance_interval: Sequence[float] | None = None,
    guidance_rescale: float | None = None, negative_prompt_carry: str | None = None,
) -> dict[str, Any]:
    return {"num_inference_steps": steps, "guidance_scale": guidance, "negative_prompt": negative_prompt,
            "guidance_interval": guidance_interval, "guidance_rescale": guidance_rescale,
            "negative_prompt_carry": negative_prompt_carry}


@contextlib.contextmanager
def _sampler(pipeline: Any, scheduler: str | None) -> Iterator[None]:
    """Swap in the scheduler called ``scheduler`` (built from the pipeline's own config) and silence the
    pipeline's progress bar; the original scheduler is put back afterwards."""
    original = pipeline.scheduler
    if scheduler is not None:
        from ..models.schedulers import scheduler_from_name

        pipeline.scheduler = scheduler_from_name(scheduler, original.config)
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipeline.scheduler = original


def generate_images(
    pipeline: Any,
    prompts: Sequence[str],
    steps: int = 25,
    scheduler: str | None = "dpm",
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    *,
    negative_prompt: str | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[Image.Image]:
    """One image per entry of ``prompts`` (repeats allowed), in batches; entry ``i`` is drawn with
    :func:`image_seed` ``(seed, prompt, i)``, so repeated prompts get different images."""
    from tqdm.auto import tqdm

    guidance = _model_guidance(pipeline, guidance)
    _check_sampling(steps, guidance, batch_size)
    jobs = [(prompt, image_seed(seed, prompt, index)) for index, prompt in enumerate(prompts)]
    images: list[Image.Image] = []
    with _sampler(pipeline, scheduler), tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress) as bar:
        for _, batch in generate(pipeline, jobs, batch_size, **_call_settings(steps, guidance, negative_prompt)):
            images += batch
            bar.update(len(batch))
    return images


def evaluate_adherence(
    pipeline: Any,
    suite: Sequence[PromptSpec],
    images_per_prompt: int = 4,
    steps: int = 25,
    scheduler: str | None = "dpm",
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    *,
    negative_prompt: str | None = None,
    guidance_interval: Sequence[float] | None = None,
    guidance_rescale: float | None = None,
    negative_prompt_carry: str | None = None,
    callback_on_step_end: Any = None,
    progress: bool = True,
) -> AdherenceResults:
    """Generate and judge ``images_per_prompt`` images for every prompt of ``suite``.

    Args:
        pipeline: a :class:`~latentdiff.pipelines.LatentPipeline` (or anything called like one, with a
            ``scheduler`` attribute); its scheduler is replaced by ``scheduler`` for the run and restored after.
        suite: the prompts (:func:`~latentdiff.eval.suite.shapes_suite`, or :func:`select_prompts` of it).
        scheduler: a name of :mod:`latentdiff.models.schedulers` (``dpm``, ``ddim``, ``ddpm``, ...); ``None``
            keeps the pipeline's own.
        guidance: classifier-free guidance scale; ``None``: the model's own (then Diffusers' default).
        guidance_interval: ``(low, high)``: guidance only at timesteps ``low <= t <= high``; ``None``: the model's
            own (``pipeline.sampling_defaults``), else every step.
        guidance_rescale: the guided prediction's rescale toward the conditional one's standard deviation, in [0, 1]
            (Lin et al. 2024, Sec. 3.4; the pipeline's ``guidance_rescale``); ``None``: the pipeline's default, 0.
        negative_prompt_carry: a regular expression whose match in each prompt is appended to the negative prompt
            (the pipeline's ``negative_prompt_carry``); ``None``: the model's own, ``""``: none.
        seed: base seed; image ``j`` of a prompt uses :func:`image_seed` ``(seed, prompt, j)``.
        batch_size: images per pipeline call (prompts are mixed freely; images do not depend on it).
        callback_on_step_end: passed to every pipeline call (a Diffusers ``PipelineCallback``, e.g.
            :class:`~latentdiff.pipelines.attention_binding.AttentionBindingCallback`); ``None``: none.
    """
    from tqdm.auto import tqdm

    from .judge import judge_image

    if not suite:
        raise ValueError("the suite is empty")
    if not isinstance(images_per_prompt, int) or isinstance(images_per_prompt, bool) or images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be a positive integer, got {images_per_prompt!r}")
    guidance = _model_guidance(pipeline, guidance)
    _check_sampling(steps, guidance, batch_size)

    specs = [(spec, j) for spec in suite for j in range(images_per_prompt)]
    jobs = [(spec.prompt, image_seed(seed, spec.prompt, j)) for spec, j in specs]
    records: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    started = time.perf_counter()
    bar = tqdm(total=len(jobs), desc=f"eval {SHAPES_SUITE_VERSION}", unit="img", disable=not progress)
    with _sampler(pipeline, scheduler), bar:
        settings = _call_settings(steps, guidance, negative_prompt, guidance_interval, guidance_rescale,
                                  negative_prompt_carry)
        settings["callback_on_step_end"] = callback_on_step_end
        for start, batch in generate(pipeline, jobs, batch_size, **settings):
            for (spec, image_index), (_, job_seed), image in zip(specs[start:], jobs[start:], batch):
                judged = judge_image(image)
                reason = failure_reason(spec, judged)
                records.append(
                    {
                        "index": len(records),
                        "prompt": spec.prompt,
                        "task": spec.task,
                        "image_index": image_index,
                        "seed": job_seed,
                        "passed": reason is None,
                        "reason": reason,
                        "right_count": has_right_count(spec, judged),
                        "judged": _judged_summary(judged),
                    }
                )
                images.append(image)
            bar.update(len(batch))
            bar.set_postfix(passed=f"{sum(r['passed'] for r in records) / len(records):.2f}", refresh=False)
    settings = {
        "scheduler": scheduler if scheduler is not None else type(pipeline.scheduler).__name__,
        "steps": steps,
        "guidance_scale": float(guidance),
        "guidance_interval": _model_guidance_interval(pipeline, guidance_interval),
        "seed": seed,
        "images_per_prompt": images_per_prompt,
        "negative_prompt": _model_negative_prompt(pipeline, negative_prompt),
        "negative_prompt_carry": _model_setting(pipeline, "negative_prompt_carry", negative_prompt_carry) or None,
        "guidance_rescale": float(guidance_rescale or 0.0),
        "batch_size": batch_size,
    }
    if callback_on_step_end is not None:
        settings["callback_on_step_end"] = type(callback_on_step_end).__name__
    return AdherenceResults(records, images, settings, summarize(records), time.perf_counter() - started)


# --------------------------------------------------------------------------------------------
# Reporting: the table and the grid
# --------------------------------------------------------------------------------------------


def format_table(summary: Mapping[str, Any]) -> str:
    """Per-task accuracy (task, images, accuracy, and the right object count where known), then overall (mean
    over the seen tasks) and unseen."""
    counted = summary.get("right_count") is not None
    width = 45 if counted else 32
    lines = [f"{'task':<16}{'n':>6}{'accuracy':>10}" + (f"{'right count':>13}" if counted else ""), "-" * width]
    tasks = summary["tasks"]

    def row(name: str, n: int, accuracy: float, right_count: float | None) -> str:
        return f"{name:<16}{n:>6}{accuracy:>10.3f}" + (f"{right_count:>13.3f}" if counted else "")

    seen = [task for task in TASKS if task in tasks and task != "unseen"]
    for task in seen:
        lines.append(row(task, tasks[task]["total"], tasks[task]["accuracy"], tasks[task].get("right_count")))
    lines.append("-" * width)
    if summary["overall"] is not None:
        n_seen = sum(tasks[task]["total"] for task in seen)
        lines.append(row("overall", n_seen, summary["overall"], summary.get("right_count"))
                     + f"   (mean over {len(seen)} seen tasks)")
    if "unseen" in tasks:
        lines.append(row("unseen", tasks["unseen"]["total"], tasks["unseen"]["accuracy"], tasks["unseen"].get("right_count"))
                     + "   (held-out combinations, not in overall)")
    if counted:
        lines.append("right count: images with exactly as many objects as the prompt names (not part of accuracy)")
    return "\n".join(lines)


def format_report(results: AdherenceResults) -> str:
    """What ``latentdiff eval`` prints: the run's settings, then :func:`format_table`."""
    settings, extra = results.settings, results.extra
    header = (
        f"{SHAPES_SUITE_VERSION}: {results.num_prompts} prompts x {settings['images_per_prompt']} images, "
        f"{settings['steps']} {settings['scheduler']} steps, guidance {settings['guidance_scale']:g}"
        + (f" ({settings['guidance_source']})" if "guidance_source" in settings else "")
        + (f" at timesteps {interval[0]:g}-{interval[1]:g}" if (interval := settings.get("guidance_interval")) else "")
        + (f", negative prompt {negative!r}" if (negative := settings.get("negative_prompt")) else "")
        + (f" with the prompt's match of {carry!r} appended" if (carry := settings.get("negative_prompt_carry")) else "")
        + (f", guidance rescale {rescale:g}" if (rescale := settings.get("guidance_rescale")) else "")
        + (f"\nholdout {extra['holdout']} from {extra['holdout_source']}" if "holdout" in extra else "")
    )
    return f"{header}\n{format_table(results.summary)}"


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _wrap(text: str, font: ImageFont.ImageFont, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; an overlong last line ends in an ellipsis."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and measure.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and measure.textlength(last + "...", font=font) > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def _short_reason(reason: str | None) -> str:
    """The clause of a failure reason before what the judge saw: ``"no purple triangle"``."""
    return "ok" if reason is None else reason.split(";")[0]


_PASS_COLOR = (30, 160, 60)
_FAIL_COLOR = (210, 30, 30)


def adherence_grid(
    records: Sequence[Mapping[str, Any]],
    images: Sequence[Image.Image],
    images_per_prompt: int,
    title: str = "",
    tile_size: int = 96,
) -> Image.Image:
    """One panel per prompt, in suite order: ``[task] prompt`` above its images, each framed green
    (passed) or red (failed) and labelled with the failure reason's first clause (or ``ok``).

    Images are upscaled by an integer factor with nearest-neighbour to at least ``tile_size``
    pixels, so the grid shows the pixels the judge read. Panels flow left to right in as many
    columns as keep the grid roughly 4:3.
    """
    if len(records) != len(images) or len(records) % images_per_prompt:
        raise ValueError(
            f"{len(records)} records and {len(images)} images do not form prompts of {images_per_prompt} images"
        )
    width, height = images[0].size
    scale = max(1, math.ceil(tile_size / max(width, height)))
    tile_w, tile_h = width * scale, height * scale
    border, gap, pad = 3, 4, 8
    label_font, header_font, title_font = _font(11), _font(12), _font(16)
    label_lines, header_lines = 2, 2
    label_h = label_lines * 13 + 2
    header_h = header_lines * 14 + 4
    cell_w = tile_w + 2 * border
    panel_w = images_per_prompt * cell_w + (images_per_prompt - 1) * gap
    panel_h = header_h + tile_h + 2 * border + label_h
    num_panels = len(records) // images_per_prompt
    columns = max(1, min(num_panels, round(math.sqrt(num_panels * (panel_h + pad) / (panel_w + pad) * 4 / 3))))
    rows = math.ceil(num_panels / columns)
    title_h = 28 if title else 0
    grid = Image.new(
        "RGB", (pad + columns * (panel_w + pad) + pad, title_h + pad + rows * (panel_h + pad)), (250, 250, 250)
    )
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, 6), title, fill="black", font=title_font)
    for panel in range(num_panels):
        left = pad + (panel % columns) * (panel_w + pad)
        top = title_h + pad + (panel // columns) * (panel_h + pad)
        first = records[panel * images_per_prompt]
        header = _wrap(f"[{first['task']}] {first['prompt']}", header_font, panel_w, header_lines)
        for line_index, line in enumerate(header):
            draw.text((left, top + line_index * 14), line, fill="black", font=header_font)
        for column in range(images_per_prompt):
            index = panel * images_per_prompt + column
            record, image = records[index], images[index]
            x = left + column * (cell_w + gap)
            y = top + header_h
            color = _PASS_COLOR if record["passed"] else _FAIL_COLOR
            draw.rectangle((x, y, x + cell_w - 1, y + tile_h + 2 * border - 1), fill=color)
            grid.paste(image.convert("RGB").resize((tile_w, tile_h), Image.NEAREST), (x + border, y + border))
            label = _wrap(_short_reason(record["reason"]), label_font, cell_w, label_lines)
            for line_index, line in enumerate(label):
                draw.text((x, y + tile_h + 2 * border + 1 + line_index * 13), line, fill=color, font=label_font)
    return grid


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def model_holdout(model_path: str) -> tuple[tuple[str, ...], str]:
    """The combinations held out of the model's training, and where that came from.

    From ``data.shapes.holdout`` of the training run's ``config.yaml`` in the pipeline folder or its
    parent (the run's ``output_dir``); else the suite's :data:`~latentdiff.eval.suite.DEFAULT_HOLDOUT`.
    """
    from ..hub import TRAINING_CONFIG_FILE, find_run_files

    run_files = find_run_files(model_path, sample_grid=None) if os.path.isdir(model_path) else {}
    config_path = run_files.get(TRAINING_CONFIG_FILE)
    if config_path is None:
        return tuple(DEFAULT_HOLDOUT), "default (no config.yaml next to the model)"
    import yaml

    with open(config_path, encoding="utf-8") as file:
        config = yaml.safe_load(file) or {}
    data = (config.get("data") or {}) if isinstance(config, dict) else {}
    if data.get("source", "shapes") != "shapes":
        return tuple(DEFAULT_HOLDOUT), f"default ({config_path} trains on {data.get('source')!r} data, not shapes)"
    holdout = (data.get("shapes") or {}).get("holdout", [])
    if not isinstance(holdout, list) or not all(isinstance(entry, str) for entry in holdout):
        raise ValueError(f"{config_path}: data.shapes.holdout must be a list of strings, got {holdout!r}")
    return tuple(holdout), f"{config_path} (data.shapes.holdout)"


def evaluate_model(
    model: str,
    out: str | None = None,
    *,
    images_per_prompt: int = 4,
    steps: int = 25,
    scheduler: str = "dpm",
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    negative_prompt: str | None = None,
    negative_prompt_carry: str | None = None,
    guidance_interval: Sequence[float] | None = None,
    guidance_rescale: float | None = None,
    tasks: Sequence[str] | None = None,
    max_prompts_per_task: int | None = None,
    device: str | None = None,
    dtype: str = "float32",
    allow_pickle: bool = False,
    callback_on_step_end: Any = None,
    progress: bool = True,
) -> tuple[AdherenceResults, dict[str, str]]:
    """``latentdiff eval``: run the shapes suite on a pipeline folder and write ``results.json`` and ``grid.png``.

    The suite's holdout comes from :func:`model_holdout`; ``guidance=None`` takes the model's own
    ``guidance_scale`` (``latentdiff.json``, or the ``sample`` section of its ``config.yaml``), else
    Diffusers' default. ``out`` defaults to ``MODEL/eval``. Returns the results and the paths written
    (``{"results": ..., "grid": ...}``). ``dtype``: the torch dtype name the pipeline runs in (``float32``,
    ``float16``, ``bfloat16``). ``callback_on_step_end``: passed to every pipeline call (:func:`evaluate_adherence`).
    """
    import torch

    from ..pipelines import LatentPipeline
    from ..models.schedulers import SCHEDULER_NAMES

    # Everything cheap is checked before the model is loaded.
    for name, value in (("images_per_prompt", images_per_prompt), ("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if scheduler not in SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULER_NAMES)}")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    from ..pipelines.pipeline_latent import check_guidance_interval, check_negative_prompt_carry, check_unit_interval

    check_guidance_interval(guidance_interval)
    check_negative_prompt_carry(negative_prompt_carry)
    if guidance_rescale is not None:
        check_unit_interval("guidance_rescale", guidance_rescale)
    holdout, holdout_source = model_holdout(model)
    suite = select_prompts(shapes_suite(holdout), tasks, max_prompts_per_task)
    out = out if out is not None else os.path.join(model, "eval") if os.path.isdir(model) else "eval"

    pipeline = LatentPipeline.from_pretrained(model, allow_pickle=allow_pickle, torch_dtype=getattr(torch, dtype))
    pipeline = pipeline.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if guidance is not None:
        guidance_source = "given"
    elif "guidance_scale" in pipeline.sampling_defaults:
        guidance_source = "the model's sampling defaults"
    else:
        guidance_source = "Diffusers' default"
    guidance = float(pipeline.sampling_default("guidance_scale", guidance))
    results = evaluate_adherence(
        pipeline,
        suite,
        images_per_prompt=images_per_prompt,
        steps=steps,
        scheduler=scheduler,
        guidance=guidance,
        seed=seed,
        batch_size=batch_size,
        negative_prompt=negative_prompt,
        negative_prompt_carry=negative_prompt_carry,
        guidance_interval=guidance_interval,
        guidance_rescale=guidance_rescale,
        callback_on_step_end=callback_on_step_end,
        progress=progress,
    )
    results.settings["guidance_source"] = guidance_source
    width, height = results.images[0].size
    results.settings.update(height=height, width=width)
    results.extra.update(
        model=os.path.abspath(model) if os.path.isdir(model) else model,
        holdout=list(holdout),
        holdout_source=holdout_source,
        selection={"tasks": list(tasks) if tasks is not None else None, "max_prompts_per_task": max_prompts_per_task},
    )

    os.makedirs(out, exist_ok=True)
    paths = {"results": os.path.join(out, RESULTS_FILE), "grid": os.path.join(out, GRID_FILE)}
    with open(paths["results"], "w", encoding="utf-8") as file:
        json.dump(results.to_json(), file, indent=1)
    unseen = f", unseen {results.unseen:.2f}" if results.unseen is not None else ""
    overall = f"overall {results.overall:.2f}" if results.overall is not None else "no seen tasks"
    title = (
        f"{SHAPES_SUITE_VERSION}: {overall}{unseen} | {steps} {scheduler} steps, guidance {guidance:g}, "
        f"seed {seed} | {os.path.basename(os.path.normpath(model))}"
    )
    adherence_grid(results.records, results.images, images_per_prompt, title).save(paths["grid"])
    return results, paths

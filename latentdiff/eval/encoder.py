"""The shapes feature encoder: a small CNN trained on the built-in shapes, for the shapes Frechet distance.

FID measures distances in the feature space of an ImageNet Inception network, whose weights cannot be
downloaded on an offline machine and which knows nothing of this domain. For the shapes data the
project trains its own feature extractor instead, and the Frechet distance on its features is the
**shapes Frechet distance (SFD)** (:func:`latentdiff.eval.metrics.shapes_frechet_distance`). SFD is
not FID and its numbers are not comparable with FID's: it only ranks models and samplers of this
domain against each other.

The network reads a 64 px render and predicts, for each cell of the 3x3 grid, the color (or none),
shape (or none) and size (or none) of the object there, and the background. Its penultimate layer
(:data:`FEATURE_DIM` numbers, taken before the ReLU) is the feature vector. A network that can tell
every attribute in every cell from these features has to encode what the images are made of, as
Inception's pool features encode ImageNet content.

The weights ship in the package (``shapes_encoder.safetensors``, next to this file, 0.8 MB) and are
made, deterministically (one CPU thread) in about two minutes, by::

    python -m latentdiff.eval.encoder --out latentdiff/eval/shapes_encoder.safetensors

The file's metadata records the command, the training settings and the held-out attribute accuracy
(shipped file, 1,000 held-out scenes: color 0.999, shape 0.9995 and size 0.9995 of the objects,
background 1.0, every attribute of every cell right in 99.7% of the images).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.shapes import BACKGROUNDS, COLORS, GRID, SHAPES, SIZES, ShapesOptions, make_shapes_sample

__all__ = [
    "DEFAULT_ENCODER_PATH",
    "ENCODER_IMAGE_SIZE",
    "FEATURE_DIM",
    "EncoderTrainingConfig",
    "ShapesEncoder",
    "attribute_accuracy",
    "encode_images",
    "images_to_tensor",
    "load_shapes_encoder",
    "save_shapes_encoder",
    "train_shapes_encoder",
]

#: The shipped weights.
DEFAULT_ENCODER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_encoder.safetensors")
#: Every image is resized to this edge before encoding (the data's default size).
ENCODER_IMAGE_SIZE = 64
#: Length of the feature vector.
FEATURE_DIM = 128
_FORMAT = "latentdiff-shapes-encoder-v1"

# Per-cell classes: index 0 is "no object in this cell".
_COLOR_CLASSES = ("none",) + tuple(COLORS)
_SHAPE_CLASSES = ("none",) + tuple(SHAPES)
_SIZE_CLASSES = ("none",) + tuple(SIZES)
_BACKGROUND_CLASSES = tuple(BACKGROUNDS)
_CELLS = GRID * GRID
# The attribute heads, in the order of the output logits: name -> (classes, one per cell?)
_HEADS: dict[str, tuple[tuple[str, ...], bool]] = {
    "color": (_COLOR_CLASSES, True),
    "shape": (_SHAPE_CLASSES, True),
    "size": (_SIZE_CLASSES, True),
    "background": (_BACKGROUND_CLASSES, False),
}


def _head_sizes() -> dict[str, int]:
    return {name: len(classes) * (_CELLS if per_cell else 1) for name, (classes, per_cell) in _HEADS.items()}


class ShapesEncoder(nn.Module):
    """Four conv blocks (a 4x4 stride-2 conv, then three of 3x3 conv and 2x2 max pool; each with batch
    norm and ReLU: 64 -> 4 px), a linear feature layer and linear attribute heads.

    ``forward`` returns the logits of every head; :meth:`features` the penultimate activations.
    """

    def __init__(self, width: int = 16, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.width = width
        self.feature_dim = feature_dim
        channels = [3, width, 2 * width, 4 * width, 4 * width]
        # the first block downsamples by its stride (cheaper than a full-resolution conv and a pool)
        blocks: list[nn.Module] = [
            nn.Conv2d(3, width, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        for in_channels, out_channels in zip(channels[1:-1], channels[2:]):
            blocks += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.body = nn.Sequential(*blocks)
        spatial = ENCODER_IMAGE_SIZE // 2**4
        self.feature_layer = nn.Linear(channels[-1] * spatial * spatial, feature_dim)
        self.head = nn.Linear(feature_dim, sum(_head_sizes().values()))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Penultimate features (before the ReLU) of images in [0, 1], ``B x 3 x 64 x 64`` -> ``B x feature_dim``."""
        return self.feature_layer(self.body(pixels - 0.5).flatten(1))

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head: ``color``/``shape``/``size`` as ``B x 9 x classes``, ``background`` as ``B x 3``."""
        logits = self.head(torch.relu(self.features(pixels)))
        outputs: dict[str, torch.Tensor] = {}
        start = 0
        for name, size in _head_sizes().items():
            classes, per_cell = _HEADS[name]
            chunk = logits[:, start : start + size]
            outputs[name] = chunk.reshape(-1, _CELLS, len(classes)) if per_cell else chunk
            start += size
        return outputs


# --------------------------------------------------------------------------------------------
# Images in, features out
# --------------------------------------------------------------------------------------------


def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3:
        if image.dtype == np.uint8:
            return Image.fromarray(image)
        if image.dtype.kind == "f":
            return Image.fromarray((np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8))
    if isinstance(image, np.ndarray):
        got = f"an array of shape {image.shape} and dtype {image.dtype}"
    else:
        got = type(image).__name__
    raise TypeError(f"expected PIL images or HxWx3 arrays (uint8, or floats in 0..1), got {got}")


def images_to_tensor(images: Sequence[Any]) -> torch.Tensor:
    """PIL images or HxWx3 arrays -> ``B x 3 x 64 x 64`` floats in [0, 1] (bilinear resize where needed)."""
    arrays = []
    for image in images:
        pil = _to_pil(image)
        if pil.size != (ENCODER_IMAGE_SIZE, ENCODER_IMAGE_SIZE):
            pil = pil.resize((ENCODER_IMAGE_SIZE, ENCODER_IMAGE_SIZE), Image.BILINEAR)
        arrays.append(np.asarray(pil, dtype=np.uint8))
    if not arrays:
        raise ValueError("no images to encode")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def encode_images(
    images: Sequence[Any], encoder: ShapesEncoder | None = None, batch_size: int = 256
) -> np.ndarray:
    """Features (``N x FEATURE_DIM``, float64) of images of the shapes domain (any size; resized to 64 px).

    ``encoder`` defaults to the shipped one (:func:`load_shapes_encoder`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    encoder = encoder if encoder is not None else load_shapes_encoder()
    encoder.eval()
    device = next(encoder.parameters()).device
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = images_to_tensor(images[start : start + batch_size]).to(device)
        chunks.append(encoder.features(pixels).double().cpu().numpy())
    if not chunks:
        raise ValueError("no images to encode")
    return np.concatenate(chunks)


# --------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------


def _training_command(path: str) -> str:
    return f"python -m latentdiff.eval.encoder --out {shlex.quote(path)}"


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime: float) -> ShapesEncoder:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as file:
        metadata = file.metadata() or {}
    if metadata.get("format") != _FORMAT:
        raise ValueError(
            f"{path} is not a shapes encoder file (metadata format {metadata.get('format')!r}, expected "
            f"{_FORMAT!r}); make one with `{_training_command(path)}`"
        )
    encoder = ShapesEncoder(width=int(metadata["width"]), feature_dim=int(metadata["feature_dim"]))
    encoder.load_state_dict(load_file(path))
    encoder.eval()
    encoder.metadata = metadata  # type: ignore[assignment]
    return encoder


def load_shapes_encoder(path: str | os.PathLike[str] | None = None) -> ShapesEncoder:
    """The trained encoder from a safetensors file (default: the one shipped in the package), in eval mode.

    Its metadata (training command, settings, held-out accuracy) is in ``encoder.metadata``. Loaded
    once per file and process; treat the returned module as read-only.
    """
    path = os.fspath(path) if path is not None else DEFAULT_ENCODER_PATH
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no shapes encoder weights at {path}; make them (about a minute on a CPU) with "
            f"`{_training_command(path)}`"
        )
    return _load_cached(os.path.abspath(path), os.path.getmtime(path))


def save_shapes_encoder(encoder: ShapesEncoder, path: str, metadata: dict[str, str]) -> None:
    """Write the weights (float32) with string metadata (the format tag and architecture are added)."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous().cpu() for name, tensor in encoder.state_dict().items()}
    state = {name: tensor for name, tensor in state.items() if not name.endswith("num_batches_tracked")}
    full = {"format": _FORMAT, "width": str(encoder.width), "feature_dim": str(encoder.feature_dim), **metadata}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(state, path, metadata=full)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderTrainingConfig:
    """Everything that determines the trained weights."""

    num_train: int = 8000
    """Training scenes per epoch; every epoch draws new ones (samples ``epoch * num_train ...``)."""
    num_heldout: int = 1000
    train_seed: int = 1000
    """Data seed of the training scenes (:func:`~latentdiff.data.shapes.make_shapes_sample`)."""
    heldout_seed: int = 1001
    """Data seed of the held-out scenes used to report accuracy."""
    init_seed: int = 0
    """Seed of the initial weights and the batch order."""
    epochs: int = 8
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    width: int = 16
    feature_dim: int = FEATURE_DIM


def _targets(scene: dict[str, Any]) -> dict[str, np.ndarray]:
    """Class indices per cell (0 = empty) and the background index of one scene."""
    color = np.zeros(_CELLS, dtype=np.int64)
    shape = np.zeros(_CELLS, dtype=np.int64)
    size = np.zeros(_CELLS, dtype=np.int64)
    for obj in scene["objects"]:
        cell = obj["row"] * GRID + obj["col"]
        color[cell] = _COLOR_CLASSES.index(obj["color"])
        shape[cell] = _SHAPE_CLASSES.index(obj["shape"])
        size[cell] = _SIZE_CLASSES.index(obj["size"])
    background = np.int64(_BACKGROUND_CLASSES.index(scene["background"]))
    return {"color": color, "shape": shape, "size": size, "background": background}


def _make_split(num_samples: int, seed: int, start: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """64 px renders of samples ``start .. start + num_samples - 1`` of the shapes data (every
    combination, no holdout: the encoder must describe held-out combinations too) and their targets."""
    options = ShapesOptions.create()
    images, targets = [], []
    for index in range(start, start + num_samples):
        sample = make_shapes_sample(index, seed, ENCODER_IMAGE_SIZE, options)
        images.append(sample["image"])
        targets.append(_targets(sample["scene"]))
    stacked = {name: torch.from_numpy(np.stack([target[name] for target in targets])) for name in _HEADS}
    return images_to_tensor(images), stacked


def _loss(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over heads of the mean cross-entropy (per cell for the cell heads)."""
    total = torch.zeros(())
    for name, logits in outputs.items():
        total = total + nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[name].reshape(-1))
    return total


@torch.no_grad()
def attribute_accuracy(
    encoder: ShapesEncoder, pixels: torch.Tensor, targets: dict[str, torch.Tensor], batch_size: int = 500
) -> dict[str, float]:
    """Accuracy per head (per cell for color / shape / size, counting empty cells), on cells holding an
    object (``*_on_objects``), and the fraction of images with every attribute of every cell right."""
    encoder.eval()
    predictions: dict[str, list[torch.Tensor]] = {name: [] for name in _HEADS}
    for start in range(0, len(pixels), batch_size):
        for name, logits in encoder(pixels[start : start + batch_size]).items():
            predictions[name].append(logits.argmax(-1))
    predicted = {name: torch.cat(chunks) for name, chunks in predictions.items()}
    occupied = targets["shape"] > 0
    report: dict[str, float] = {}
    all_right = torch.ones(len(pixels), dtype=torch.bool)
    for name in _HEADS:
        right = predicted[name] == targets[name]
        report[name] = right.float().mean().item()
        if _HEADS[name][1]:
            report[f"{name}_on_objects"] = right[occupied].float().mean().item()
            all_right &= right.all(dim=1)
        else:
            all_right &= right
    report["whole_scene"] = all_right.float().mean().item()
    return report


def train_shapes_encoder(
    config: EncoderTrainingConfig = EncoderTrainingConfig(), progress: bool = True
) -> tuple[ShapesEncoder, dict[str, float]]:
    """Train the encoder on rendered shapes (deterministic) and report its held-out attribute accuracy.

    AdamW with a one-cycle learning rate (Smith & Topin 2019) from ``init_seed``; fresh scenes every
    epoch in a seeded order; deterministic torch algorithms on one CPU thread. The same config gives
    the same weights on the same torch build and CPU kernels.
    """
    from tqdm.auto import tqdm

    heldout_pixels, heldout_targets = _make_split(config.num_heldout, config.heldout_seed)

    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    # One thread: float reductions then do not depend on the machine's core count (the same weights on
    # any machine with the same kernels), and on a CPU shared with other work a second OpenMP thread
    # mostly waits for a busy core.
    torch.set_num_threads(1)
    try:
        torch.manual_seed(config.init_seed)
        encoder = ShapesEncoder(width=config.width, feature_dim=config.feature_dim)
        optimizer = torch.optim.AdamW(encoder.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        steps_per_epoch = -(-config.num_train // config.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.learning_rate, total_steps=config.epochs * steps_per_epoch
        )
        order_generator = torch.Generator().manual_seed(config.init_seed)
        bar = tqdm(total=config.epochs * steps_per_epoch, desc="shapes encoder", disable=not progress)
        for epoch in range(config.epochs):
            # fresh scenes every epoch (rendering is cheap): more variety than repeating one set
            train_pixels, train_targets = _make_split(config.num_train, config.train_seed, epoch * config.num_train)
            encoder.train()
            order = torch.randperm(config.num_train, generator=order_generator)
            for start in range(0, config.num_train, config.batch_size):
                batch = order[start : start + config.batch_size]
                loss = _loss(encoder(train_pixels[batch]), {name: t[batch] for name, t in train_targets.items()})
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    encoder.eval()
    return encoder, attribute_accuracy(encoder, heldout_pixels, heldout_targets)


def main(argv: list[str] | None = None) -> int:
    """``python -m latentdiff.eval.encoder --out PATH``: train the encoder and write its weights."""
    defaults = EncoderTrainingConfig()
    parser = argparse.ArgumentParser(
        prog="python -m latentdiff.eval.encoder",
        description="Train the shapes feature encoder (for the shapes Frechet distance, SFD) and save it.",
    )
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--num-train", type=int, default=defaults.num_train,
                        help="training scenes per epoch (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs (default %(default)s)")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        parser.error(f"--out must name a .safetensors file, got {args.out!r}")
    if args.num_train < defaults.batch_size or args.epochs < 1:
        parser.error(f"--num-train must be at least {defaults.batch_size} and --epochs at least 1")

    config = EncoderTrainingConfig(num_train=args.num_train, epochs=args.epochs)
    started = time.perf_counter()
    encoder, accuracy = train_shapes_encoder(config)
    seconds = time.perf_counter() - started
    argv_text = " ".join(shlex.quote(arg) for arg in (sys.argv[1:] if argv is None else argv))
    save_shapes_encoder(
        encoder,
        args.out,
        {
            "command": f"python -m latentdiff.eval.encoder {argv_text}",
            "training_config": json.dumps(asdict(config)),
            "heldout_accuracy": json.dumps({name: round(value, 4) for name, value in accuracy.items()}),
            "torch_version": torch.__version__,
        },
    )
    print(f"trained in {seconds:.0f} s; held-out attribute accuracy ({config.num_heldout} scenes, data seed "
          f"{config.heldout_seed}):")
    for name, value in accuracy.items():
        print(f"  {name:22s} {value:.4f}")
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Image preprocessing for training: resize, crop, optional flip, scale to [-1, 1].

The same recipe as Diffusers' ``examples/text_to_image/train_text_to_image.py`` (``Resize`` on the
short side, ``CenterCrop`` or ``RandomCrop``, ``RandomHorizontalFlip``, ``ToTensor``,
``Normalize([0.5], [0.5])``), built on ``torchvision.transforms.v2.functional`` with one change: the
random choices are drawn from an explicit ``numpy.random.Generator`` passed in by the caller instead
of torch's global RNG. The training data path derives that generator from ``(seed, epoch, index)``,
so an item is a pure function of those three numbers and a resumed run sees the same crops and flips
(torchvision's random transforms read hidden global state, which no checkpoint captures).
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = ["ImageTransform"]


class ImageTransform:
    """Turn a PIL image into a ``(3, resolution, resolution)`` float tensor in [-1, 1].

    Steps: convert to RGB; resize so the short side is ``resolution`` (bilinear, antialiased);
    crop a ``resolution`` square (centered, or at a random offset); flip horizontally with
    probability 1/2 if ``random_flip``; scale ``uint8`` values to ``x / 127.5 - 1``.

    Args:
        resolution: Side of the square output, in pixels.
        center_crop: Crop the center; ``False`` crops at a random offset drawn from ``rng``.
        random_flip: Flip left-right with probability 1/2 (drawn from ``rng``).

    Call with ``transform(image, rng)``. ``rng`` is needed only when the transform is random
    (``center_crop=False`` or ``random_flip=True``); it is a ``numpy.random.Generator``, and the
    draws are taken in a fixed order (crop offset, then flip), so equal generators give equal output.
    """

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = False) -> None:
        if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution <= 0:
            raise ValueError(f"resolution must be a positive integer (pixels), got {resolution!r}")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    @property
    def is_random(self) -> bool:
        """Whether the output depends on the generator passed to :meth:`__call__`."""
        return not self.center_crop or self.random_flip

    def __call__(self, image: PIL.Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Preprocess one image; see the class docstring. Returns a float32 ``(3, H, W)`` tensor."""
        if self.is_random and rng is None:
            raise ValueError(
                "ImageTransform with center_crop=False or random_flip=True needs a numpy Generator: "
                "call transform(image, rng=np.random.default_rng(...))"
            )
        image = image.convert("RGB")
        image = TF.resize(image, self.resolution, interpolation=InterpolationMode.BILINEAR, antialias=True)
        width, height = image.size
        size = self.resolution
        if self.center_crop:
            image = TF.center_crop(image, [size, size])
        else:
            top = int(rng.integers(0, height - size + 1))
            left = int(rng.integers(0, width - size + 1))
            image = TF.crop(image, top, left, size, size)
        if self.random_flip and rng.random() < 0.5:
            image = TF.horizontal_flip(image)
        pixels = TF.pil_to_tensor(image)  # uint8, (3, H, W)
        return pixels.to(torch.float32) / 127.5 - 1.0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(resolution={self.resolution}, center_crop={self.center_crop}, "
            f"random_flip={self.random_flip})"
        )

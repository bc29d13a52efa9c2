"""Seam measures for inpainting: how visible the border between kept and repainted pixels is.

An inpainted image whose repainted part does not agree with the kept part shows a seam: a step in
colour or brightness along the mask's border. :func:`border_gradient` measures the mean gradient
magnitude on the pixels along the border; :func:`seam_score` divides it by the same measure, along
the same kind of borders, in real images, so that 1 means "no more edge along the border than real
images have there" and larger values mean visible seams (compare plain blending with RePaint
resampling on the same masks and seeds, as ``bench/inpaint_quality.py`` does).

Images are PIL images, ``(H, W, 3)`` / ``(N, H, W, 3)`` arrays (uint8, or floats in [0, 1]); masks
are PIL images or ``(H, W)`` / ``(N, H, W)`` arrays, white / true / >= 0.5 where repainted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["border_gradient", "gradient_magnitude", "mask_border", "seam_score"]


def _images_array(images: Any) -> np.ndarray:
    """`(N, H, W, 3)` float64 in [0, 1]."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    arrays = []
    for item in items:
        if isinstance(item, Image.Image):
            item = np.asarray(item.convert("RGB"))
        array = np.asarray(item)
        if array.ndim == 4:
            arrays.extend(array)
            continue
        arrays.append(array)
    stacked = []
    for array in arrays:
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"images have to be RGB, (H, W, 3); got shape {array.shape}")
        stacked.append(array.astype(np.float64) / 255.0 if array.dtype == np.uint8 else array.astype(np.float64))
    return np.stack(stacked)


def _masks_array(masks: Any) -> np.ndarray:
    """`(N, H, W)` bool, true where repainted."""
    items = list(masks) if isinstance(masks, (list, tuple)) else [masks]
    arrays = []
    for item in items:
        if isinstance(item, Image.Image):
            item = np.asarray(item.convert("L")) >= 128
        array = np.asarray(item)
        if array.ndim == 3:
            arrays.extend(array)
            continue
        arrays.append(array)
    stacked = []
    for array in arrays:
        if array.ndim != 2:
            raise ValueError(f"masks have to be single-channel, (H, W); got shape {array.shape}")
        if array.dtype == np.uint8:
            array = array >= 128
        stacked.append(np.asarray(array, dtype=np.float64) >= 0.5)
    return np.stack(stacked)


def gradient_magnitude(images: Any) -> np.ndarray:
    r"""Per-pixel gradient magnitude `(N, H, W)` of RGB images in [0, 1]: central differences (one-sided at the image
    edges, ``np.gradient``) per channel, combined as :math:`\sqrt{\sum_c (\partial_x I_c)^2 + (\partial_y I_c)^2}`."""
    pixels = _images_array(images)
    gradient_y, gradient_x = np.gradient(pixels, axis=(1, 2))
    return np.sqrt((gradient_x**2 + gradient_y**2).sum(axis=-1))


def mask_border(masks: Any, width: int = 1) -> np.ndarray:
    """The pixels within `width` pixels (4-neighbour steps) of the border between the mask and the rest, on both
    sides, `(N, H, W)` bool. The image's own edges are not a border."""
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width has to be a positive integer, got {width!r}")
    borders = []
    for mask in _masks_array(masks):
        grown = ndimage.binary_dilation(mask, iterations=width)
        shrunk = ndimage.binary_erosion(mask, iterations=width, border_value=1)
        borders.append(grown & ~shrunk)
    return np.stack(borders)


def border_gradient(images: Any, masks: Any, width: int = 1) -> float:
    """The mean gradient magnitude (:func:`gradient_magnitude`) over the border pixels (:func:`mask_border`) of all
    images together; one mask for every image, or one per image.

    Raises:
        ValueError: images and masks of different sizes or counts, or masks without any border.
    """
    magnitudes = gradient_magnitude(images)
    borders = mask_border(masks, width)
    if borders.shape[0] == 1 and magnitudes.shape[0] > 1:
        borders = np.repeat(borders, magnitudes.shape[0], axis=0)
    if borders.shape != magnitudes.shape:
        raise ValueError(
            f"{magnitudes.shape[0]} images of {magnitudes.shape[1:]} and {borders.shape[0]} masks of"
            f" {borders.shape[1:]}: pass one mask per image (or one for all), of the images' size"
        )
    if not borders.any():
        raise ValueError("the masks have no border (each is empty or covers its whole image)")
    return float(magnitudes[borders].mean())


def seam_score(
    images: Any,
    masks: Any,
    real_images: Any,
    real_masks: Any | None = None,
    width: int = 1,
) -> float:
    """How visible the seams are: `border_gradient(images, masks) / border_gradient(real_images, real_masks)`.

    The reference is the same measure in real images: along `real_masks` (default: `masks`, image for image), which
    should be borders of the same kind placed on real content. 1 means the inpainted borders carry no more edges than
    real images do along such borders; a seam makes it larger.

    Raises:
        ValueError: as :func:`border_gradient`, or when the real images are flat along every border (the ratio has no
            reference then: place the real borders across some content).
    """
    reference = border_gradient(real_images, masks if real_masks is None else real_masks, width)
    if reference <= 0:
        raise ValueError(
            "the real images have no gradient along the given borders, so there is no reference for the ratio; "
            "use borders that cross real content (report border_gradient alone otherwise)"
        )
    return border_gradient(images, masks, width) / reference

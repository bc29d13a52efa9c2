"""Outpainting with any latent (or pixel-space) text-to-image model: :class:`LatentOutpaintPipeline`.

The canvas is extended by given amounts of pixels on each side (or to a target size, the image centred), the
new area is given a starting content (``fill``: noise, the image's edge pixels stretched outwards, or a blur of
them), and then it is inpainted by :class:`~latentdiff.pipelines.LatentInpaintPipeline`, with the new area as
the mask: blending with optional RePaint resampling (``jump_length``, ``jump_n_sample``) for any text-to-image
U-Net, mask conditioning for an inpainting U-Net. The decoded canvas is pasted onto the extended input, so its
middle equals the input image pixel for pixel (``feather`` widens the pasted edge into the image). The fill shapes
the result when ``strength < 1`` (SDEdit) and through what the encoder sees near the border.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.image_processor import PipelineImageInput

from .pipeline_latent import LatentPipelineOutput
from .pipeline_latent_img2img import check_image_input
from .pipeline_latent_inpaint import LatentInpaintPipeline

#: The starting contents of the new area (see `LatentOutpaintPipeline.extend_canvas`).
FILL_MODES = ("noise", "edge", "blur")


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of `(N, C, H, W)` images, standard deviation `sigma` pixels, borders replicated.

    Written here because torchvision's `gaussian_blur` pads by reflection, which needs the kernel's radius to be
    smaller than the image, and the blur fill is as wide as the new area.
    """
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    images = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), horizontal, groups=channels)
    return F.conv2d(F.pad(images, (0, 0, radius, radius), mode="replicate"), vertical, groups=channels)


class LatentOutpaintPipeline(LatentInpaintPipeline):
    r"""Text-guided outpainting: extend the canvas and inpaint the new area (see [`LatentInpaintPipeline`]).

    Examples:
        ```py
        >>> from PIL import Image
        >>> from latentdiff import LatentOutpaintPipeline

        >>> pipe = LatentOutpaintPipeline.from_pretrained("runs/shapes/pipeline")
        >>> image = Image.open("scene.png").convert("RGB")  # 64 x 64
        >>> wide = pipe("two blue squares", image=image, left=32, right=32).images[0]  # 128 x 64
        ```
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput = None,
        left: int = 0,
        right: int = 0,
        top: int = 0,
        bottom: int = 0,
        height: int | None = None,
        width: int | None = None,
        fill: str = "edge",
        **kwargs,
    ) -> LatentPipelineOutput | tuple:
        r"""Extend `image` by `left` / `right` / `top` / `bottom` pixels (or to `height` x `width`) and paint the new
        area under a prompt (describing the whole extended image); the output's middle equals `image`.

        Args:
            left, right, top, bottom (`int`, *optional*, default to 0):
                Pixels to add on each side: multiples of `vae_scale_factor`, at least one of them positive.
            height, width (`int`, *optional*):
                Instead of the sides: the size of the extended image (multiples of `vae_scale_factor`, at least the
                image's), with the image centred (see `canvas_padding`).
            fill (`str`, *optional*, defaults to `"edge"`):
                The new area's starting content: `"edge"`, `"blur"` or `"noise"` (see `extend_canvas`). It shapes
                the result when `strength < 1`.
            kwargs: the arguments of `LatentInpaintPipeline.__call__` but `mask_image` and `mask_threshold`.
        """
        for name in ("mask_image", "mask_threshold"):
            if name in kwargs:
                raise ValueError(f"`{name}`: outpainting makes its own mask, the new area; pass `left`, `right`, ...")
        self._canvas = (left, right, top, bottom, height, width, fill)
        return super().__call__(prompt, image=image, **kwargs)

    def check_image_and_mask(self, image, mask_image, mask_threshold, batch_size: int) -> tuple[int, int]:
        """Check the image(s), the canvas and the fill; return the height and width of the extended canvas."""
        image_height, image_width, _ = check_image_input(self, image, batch_size)
        left, right, top, bottom = self.canvas_padding(image_height, image_width, *self._canvas[:6])
        if self._canvas[6] not in FILL_MODES:
            raise ValueError(f"`fill` has to be one of {FILL_MODES} but is {self._canvas[6]!r}.")
        return image_height + top + bottom, image_width + left + right

    def preprocess_image_and_mask(self, image, mask_image, mask_threshold, generator=None):
        """The extended canvas and the mask of its new area (see :meth:`extend_canvas`)."""
        pixels = self.pixel_processor.preprocess(image).to(torch.float32)
        padding = self.canvas_padding(pixels.shape[-2], pixels.shape[-1], *self._canvas[:6])
        return self.extend_canvas(pixels, *padding, fill=self._canvas[6], generator=generator)

    def canvas_padding(
        self,
        image_height: int,
        image_width: int,
        left: int = 0,
        right: int = 0,
        top: int = 0,
        bottom: int = 0,
        height: int | None = None,
        width: int | None = None,
    ) -> tuple[int, int, int, int]:
        """The pixels to add `(left, right, top, bottom)`: as given, or, for a target `height` / `width`, the difference
        split between the two sides (the image centred; the odd latent cell, if any, goes right / bottom).

        Raises:
            ValueError: an amount that is negative or not a multiple of `vae_scale_factor` (the new area has to cover
                whole latent cells), a target smaller than the image or not a multiple of it, both amounts and a
                target, or nothing to add.
        """
        factor = self.vae_scale_factor
        sides = {"left": left, "right": right, "top": top, "bottom": bottom}
        for name, value in sides.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` has to be a non-negative integer (pixels to add) but is {value!r}.")
        if height is not None or width is not None:
            if any(sides.values()):
                raise ValueError(
                    "Pass either the pixels to add (`left`, `right`, `top`, `bottom`) or a target size (`height`,"
                    " `width`), not both."
                )
            for name, target, size in (("height", height, image_height), ("width", width, image_width)):
                if target is None:
                    continue
                if isinstance(target, bool) or not isinstance(target, int) or target < size or target % factor:
                    raise ValueError(
                        f"`{name}` has to be an integer multiple of {factor} (the autoencoder's factor) of at least"
                        f" the image's {name} {size}, but is {target!r}."
                    )
            extra_height = (height if height is not None else image_height) - image_height
            extra_width = (width if width is not None else image_width) - image_width
            top = extra_height // 2 // factor * factor
            left = extra_width // 2 // factor * factor
            sides = {"left": left, "right": extra_width - left, "top": top, "bottom": extra_height - top}
        for name, value in sides.items():
            if value % factor:
                raise ValueError(
                    f"`{name}`={value} is not a multiple of {factor} (the autoencoder's downsampling factor); the new"
                    " area has to cover whole latent cells."
                )
        if not any(sides.values()):
            raise ValueError(
                "Nothing to outpaint: give `left`, `right`, `top` or `bottom` > 0, or a `height` / `width` larger than"
                " the image."
            )
        return sides["left"], sides["right"], sides["top"], sides["bottom"]

    def extend_canvas(
        self,
        pixels: torch.Tensor,
        left: int,
        right: int,
        top: int,
        bottom: int,
        fill: str = "edge",
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The extended canvas `(n, 3, H + top + bottom, W + left + right)` in [0, 1], with the image `pixels`
        (`(n, 3, H, W)`) unchanged in it, and the mask of the new area `(n, 1, ...)` (1 = new).

        The new area's starting content (`fill`):

        * `"edge"`: the image's border pixels stretched outwards (replicate padding);
        * `"blur"`: the same, blurred with a Gaussian of standard deviation a quarter of the widest side added (at
          least 1 pixel), so that only the edge colours carry over;
        * `"noise"`: uniform noise in [0, 1], drawn from `generator` (the first one of a list).
        """
        padding = (left, right, top, bottom)
        stretched = F.pad(pixels, padding, mode="replicate")
        if fill == "edge":
            canvas = stretched
        elif fill == "blur":
            canvas = gaussian_blur(stretched, sigma=max(1.0, max(padding) / 4))
        elif fill == "noise":
            fill_generator = generator[0] if isinstance(generator, list) else generator
            noise_device = fill_generator.device if fill_generator is not None else pixels.device
            canvas = torch.rand(stretched.shape, generator=fill_generator, device=noise_device).to(stretched)
        else:
            raise ValueError(f"`fill` has to be one of {FILL_MODES} but is {fill!r}.")
        mask = torch.ones_like(stretched[:, :1])
        mask[:, :, top : top + pixels.shape[-2], left : left + pixels.shape[-1]] = 0
        canvas = torch.where(mask.bool(), canvas, stretched)  # the image itself, exactly, in the middle
        return canvas, mask

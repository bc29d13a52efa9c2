"""latentdiff: train and run latent text-to-image diffusion models on Diffusers and Accelerate.

The public entry points are imported lazily, so ``import latentdiff.config`` stays light::

    from latentdiff import LatentPipeline
    pipe = LatentPipeline.from_pretrained("runs/shapes/pipeline")
    pipe("a red circle at the top left").images[0]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "LatentPipeline": "latentdiff.pipelines",
    "LatentImg2ImgPipeline": "latentdiff.pipelines",
    "LatentInpaintPipeline": "latentdiff.pipelines",
    "LatentOutpaintPipeline": "latentdiff.pipelines",
    "OpenCLIPTextModel": "latentdiff.text_encoders",
    "Config": "latentdiff.config",
    "load_config": "latentdiff.config",
    "clip_tokenizer": "latentdiff.tokenizer",
    "make_shapes_dataset": "latentdiff.data.shapes",
}

__all__ = sorted(_LAZY) + ["__version__"]

# Not public API: pipeline folders record custom components under their public path, e.g.
# ["latentdiff", "OpenCLIPTextModel"] in model_index.json, and Diffusers' loader then looks up the base
# classes it knows (``ModelMixin``) in this module to decide how to load them.
_FOR_DIFFUSERS_LOADER = {"ModelMixin": "diffusers"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name) or _FOR_DIFFUSERS_LOADER.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'latentdiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from .config import Config, load_config
    from .data.shapes import make_shapes_dataset
    from .pipelines import (
        LatentImg2ImgPipeline,
        LatentInpaintPipeline,
        LatentOutpaintPipeline,
        LatentPipeline,
    )
    from .text_encoders import OpenCLIPTextModel
    from .tokenizer import clip_tokenizer

"""latentdiff: train and run latent text-to-image diffusion models on Diffusers and Accelerate.

The public entry points are imported lazily, so ``import latentdiff.config`` stays light::

    from latentdiff import LatentPipeline
    pipe = LatentPipeline.from_pretrained("runs/shapes/pipeline")
    pipe("a red circle at the top left").images[0]
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "LatentPipeline": "latentdiff.pipelines",
    "LatentImg2ImgPipeline": "latentdiff.pipelines",
    "LatentInpaintPipeline": "latentdiff.pipelines",
    "LatentOutpaintPipeline": "latentdiff.pipelines",
    "OpenCLIPTextModel": "latentdiff.models.text_encoders",
    "CLIPTextModelWithWordEmbeddings": "latentdiff.models.word_context",
    "BidirectionalCLIPTextModel": "latentdiff.models.bidirectional",
    "PositionalUNet2DConditionModel": "latentdiff.models.unet",
    "Config": "latentdiff.config",
    "load_config": "latentdiff.config",
    "clip_tokenizer": "latentdiff.models.tokenizer",
    "make_shapes_dataset": "latentdiff.data.shapes",
}

__all__ = sorted(_LAZY) + ["__version__"]

# Not public API: pipeline folders record custom components under their public path, e.g.
# ["latentdiff", "OpenCLIPTextModel"] in model_index.json, and Diffusers' loader then looks up the base
# classes it knows (``ModelMixin``, ``PreTrainedModel``) in this module to decide how to load them.
_FOR_DIFFUSERS_LOADER = {"ModelMixin": "diffusers", "PreTrainedModel": "transformers"}


# Modules that moved when the library was laid out by concern: the old import path still works
# (it is the same module object) and warns once with the new one.
_MOVED_MODULES = {
    "latentdiff.autoencoder": "latentdiff.trainer.autoencoder",
    "latentdiff.checkpointing": "latentdiff.trainer.checkpointing",
    "latentdiff.inpaint_metrics": "latentdiff.eval.inpaint_metrics",
    "latentdiff.latent_cache": "latentdiff.trainer.latent_cache",
    "latentdiff.schedulers": "latentdiff.models.schedulers",
    "latentdiff.text_encoders": "latentdiff.models.text_encoders",
    "latentdiff.tokenizer": "latentdiff.models.tokenizer",
}
# Modules that were split: importing the old path is an error naming where the parts went.
_SPLIT_MODULES = {
    "latentdiff.train_utils": "latentdiff.trainer.loop (accelerator, data loader, logging), latentdiff.trainer.rng "
    "(TrainingRNG, drop_captions, random_crop) and latentdiff.trainer.encoding (tokenize, encode_images)",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path of :data:`_MOVED_MODULES` to the module at its new path, and names the new
    places of a split one."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in _SPLIT_MODULES:
            raise ModuleNotFoundError(f"{fullname} was split into {_SPLIT_MODULES[fullname]}", name=fullname)
        if fullname not in _MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None  # a placeholder module; exec_module puts the real one in its place

    def exec_module(self, module):
        import warnings

        new_name = _MOVED_MODULES[module.__name__]
        warnings.warn(f"{module.__name__} moved to {new_name}; import it from there", FutureWarning, stacklevel=2)
        sys.modules[module.__name__] = importlib.import_module(new_name)


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())


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
    from .models.text_encoders import OpenCLIPTextModel
    from .models.word_context import CLIPTextModelWithWordEmbeddings
    from .models.bidirectional import BidirectionalCLIPTextModel
    from .models.tokenizer import clip_tokenizer

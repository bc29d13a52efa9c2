"""Diffusers pipelines of latentdiff, built on Diffusers' own Stable Diffusion pipelines; installed as
``latentdiff.pipelines``. A pipeline module is imported on first use of its name, so importing this stays light."""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module of this package that defines it; add a pipeline with one line here.
_PIPELINES = {
    "LatentPipeline": "pipeline_latent",
    "LatentPipelineOutput": "pipeline_latent",
    "LatentImg2ImgPipeline": "pipeline_latent_img2img",
    "LatentInpaintPipeline": "pipeline_latent_inpaint",
    "LatentOutpaintPipeline": "pipeline_latent_outpaint",
}
__all__ = sorted(_PIPELINES)


def __getattr__(name: str) -> Any:
    if name in _PIPELINES:
        value = getattr(importlib.import_module(f".{_PIPELINES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

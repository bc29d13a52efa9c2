"""The model's components: builders from config (:mod:`.builders`), named architectures (:mod:`.presets`),
the OpenCLIP text tower (:mod:`.text_encoders`), the offline CLIP tokenizer (:mod:`.tokenizer`) and schedulers by
name (:mod:`.schedulers`). Names are imported on first use, so that the presets load without Diffusers."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "MODEL_PRESETS": "presets",
    "build_components": "builders",
    "build_text_encoder": "builders",
    "build_tokenizer": "builders",
    "build_unet": "builders",
    "build_vae": "builders",
    "vae_scale_factor": "builders",
    "ModelMixin": "builders",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

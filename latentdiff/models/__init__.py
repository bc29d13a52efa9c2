"""The model's components: builders from config (:mod:`.builders`), named architectures (:mod:`.presets`),
the OpenCLIP text tower (:mod:`.text_encoders`), the offline CLIP tokenizer (:mod:`.tokenizer`) and schedulers by
name (:mod:`.schedulers`). Names are imported on first use, so that the presets load without Diffusers."""

from .._lazy import lazy_exports

_EXPORTS = {
    "MODEL_PRESETS": ".presets",
    "build_components": ".builders",
    "build_text_encoder": ".builders",
    "build_tokenizer": ".builders",
    "build_unet": ".builders",
    "build_vae": ".builders",
    "vae_scale_factor": ".builders",
    "ModelMixin": ".builders",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

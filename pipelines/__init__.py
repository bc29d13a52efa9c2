"""Diffusers pipelines of latentdiff, built on Diffusers' own Stable Diffusion pipelines; installed as
``latentdiff.pipelines``. A pipeline module is imported on first use of its name, so importing this stays light."""

from latentdiff._lazy import lazy_exports

# public name -> module of this package that defines it; add a pipeline with one line here.
_PIPELINES = {
    "LatentPipeline": ".pipeline_latent",
    "LatentPipelineOutput": ".pipeline_latent",
    "LatentImg2ImgPipeline": ".pipeline_latent_img2img",
    "LatentInpaintPipeline": ".pipeline_latent_inpaint",
    "LatentOutpaintPipeline": ".pipeline_latent_outpaint",
}
__all__ = sorted(_PIPELINES)
__getattr__, __dir__ = lazy_exports(__name__, _PIPELINES)

#!/usr/bin/env python
"""The low-noise expert stage, after stage 2: fine-tune a copy of stage 2's U-Net on the timesteps below
``low_noise_expert.boundary`` only, and make the pipeline denoise those with it.

    accelerate launch training/train_low_noise_expert.py --config configs/shapes.yaml [key=value ...]

Below the boundary the caption no longer decides the image (the caption gap is near zero there): what is left
is rendering what the noisy latents already show. One U-Net shared by every noise level rounds small shapes off
there, and every way of giving those levels more of stage 2's steps cost the steps that learn places
(docs/conditioning.md, twenty-eighth to thirty-fourth rounds). A separate expert takes none (Balaji et al. 2022,
"eDiff-I: Text-to-Image Diffusion Models with an Ensemble of Expert Denoisers").

Reads ``output_dir/pipeline`` (stage 2's; after this stage has run once, its ``unet_high_noise``), trains in
``output_dir/low_noise_expert`` (``training/train_ldm.py`` with stage 2's U-Net, text encoder and autoencoder
loaded, only the U-Net trained, ``train``'s optimizer, batch and EMA, ``low_noise_expert.max_steps`` steps drawn
from ``[0, boundary)``, stage 2's latent cache read rather than built again), and replaces ``output_dir/pipeline``
with a pipeline of both U-Nets: ``unet`` (the expert, ``t < boundary``) and ``unet_high_noise`` (stage 2's,
unchanged) with ``boundary_ratio``. A stock Stable Diffusion pipeline loads ``unet`` alone.

Written here because Diffusers' training examples train one U-Net for every noise level.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys

from accelerate import PartialState

from latentdiff.config import Config, ConfigError, parse_args
from latentdiff.files import folder_written_in_place
from latentdiff.sampling import PIPELINE_DIR
from latentdiff.trainer.latent_cache import latent_cache_dir
from latentdiff.trainer.loop import run_training_script

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_ldm  # noqa: E402  (the stage-2 script, run with the expert's settings)

logger = logging.getLogger("latentdiff.train_low_noise_expert")

EXPERT_DIR = "low_noise_expert"


def stage2_unet_subfolder(pipeline: str) -> str:
    """Where stage 2's U-Net is in ``pipeline``: ``unet``, or ``unet_high_noise`` once this stage has replaced it."""
    return "unet_high_noise" if os.path.isdir(os.path.join(pipeline, "unet_high_noise")) else "unet"


def expert_overrides(config: Config) -> list[str]:
    """The ``key=value`` settings that turn ``config``'s stage 2 into the expert's run."""
    pipeline = os.path.join(config.output_dir, PIPELINE_DIR)
    unet = stage2_unet_subfolder(pipeline)
    boundary = config.low_noise_expert.boundary
    overrides = [
        f"output_dir={os.path.join(config.output_dir, EXPERT_DIR)}",
        f"model.unet.pretrained={pipeline}", f"model.unet.subfolder={unet}",
        f"model.high_noise_pretrained={pipeline}", f"model.high_noise_subfolder={unet}",
        f"model.high_noise_boundary={boundary}",
        f"model.text_encoder.pretrained={pipeline}", "model.text_encoder.subfolder=text_encoder",
        "model.text_encoder.train=false", "model.text_encoder.contrastive_pretraining=false",
        # stage 2's encoder is loaded as saved: the settings that build one from scratch do not apply
        "model.text_encoder.zero_init_residual=false", "model.text_encoder.token_mixing_width=0",
        "model.text_encoder.token_mixing_depthwise=false", "model.text_encoder.token_mixing_gated=false",
        "train.token_mixing_from_step=0",
        f"train.max_steps={config.low_noise_expert.max_steps}", "train.band_boundary=null",
        "diffusion.timestep_sampling=uniform", f"diffusion.timestep_range=[0,{boundary}]",
        "diffusion.timestep_high_band_start=null", "diffusion.timestep_low_band_end=null",
        "diffusion.timestep_low_band_start_step=0", "diffusion.timestep_low_band_end_step=null",
        "low_noise_expert.max_steps=0",
        # stage 2's latent cache: the same data and autoencoder (read from the pipeline folder), so the same file
        f"train.cache_dir={latent_cache_dir(config)}",
    ]
    if not config.model.pixel_space:
        overrides += [f"model.vae.pretrained={pipeline}", "model.vae.subfolder=vae"]
    return overrides


def replace_pipeline(source: str, target: str) -> None:
    """Copy the pipeline folder ``source`` over ``target``: written beside it, then renamed into place."""
    with folder_written_in_place(target) as partial:
        shutil.copytree(source, partial, dirs_exist_ok=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    config = parse_args(argv, description=__doc__.split("\n\n")[0])
    if not config.low_noise_expert.max_steps:
        raise ConfigError("low_noise_expert.max_steps is 0: nothing to train; set it to the expert's steps (e.g. 400)")
    pipeline = os.path.join(config.output_dir, PIPELINE_DIR)
    if not os.path.isfile(os.path.join(pipeline, "model_index.json")):
        raise ConfigError(
            f"no stage-2 pipeline at {pipeline!r}: run training/train_ldm.py with the same config first"
        )
    train_ldm.main([*argv, *expert_overrides(config)])
    state = PartialState()
    if state.is_main_process:
        replace_pipeline(os.path.join(config.output_dir, EXPERT_DIR, PIPELINE_DIR), pipeline)
        logger.info(
            "pipeline with the low-noise expert (t < %d) saved to %s", config.low_noise_expert.boundary, pipeline
        )
    state.wait_for_everyone()


if __name__ == "__main__":
    run_training_script(main, "train_low_noise_expert.py")

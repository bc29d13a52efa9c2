"""Tiny random components for tests and examples (as Diffusers' own pipeline tests build them)."""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

import torch

from .config import load_config


def tiny_components(
    seed: int = 0, resolution: int = 32, text_encoder_kind: str = "clip", overrides: dict[str, object] | None = None
) -> dict[str, object]:
    """A complete set of untrained Stable-Diffusion-layout components, seeded.

    ``vae``, ``unet``, ``text_encoder``, ``tokenizer`` (CLIP, offline) and ``scheduler`` (DDIM,
    Stable Diffusion's schedule); every forward pass takes milliseconds on a CPU. The VAE
    downsamples by 2, so ``resolution`` 32 gives 16x16x4 latents. ``overrides`` are further
    config keys, e.g. ``{"model.text_encoder.word_embeddings_in_context": True}``.
    """
    from diffusers import DDIMScheduler

    from .models import build_components

    config = load_config(overrides={"model.preset": "tiny", "model.text_encoder.kind": text_encoder_kind, **(overrides or {})})
    torch.manual_seed(seed)
    components = build_components(config.model, resolution)
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    components["scheduler"] = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return components


def tensorboard_records(logdir: str | os.PathLike) -> tuple[dict, dict, dict]:
    """``(hyperparameters, images, scalars)`` read back from every event file under ``logdir``:
    hyperparameters by name; images by tag as a list of ``(step, width, height)``; scalars by tag as a
    list of ``(step, value)``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    hyperparameters, images, scalars = {}, {}, {}
    folders = {os.path.dirname(path) for path in glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)}
    for folder in sorted(folders):
        events = EventAccumulator(folder, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
        events.Reload()
        try:
            hparams = events.PluginTagToContent("hparams")  # in the sub-folder torch's add_hparams writes
        except KeyError:
            hparams = {}
        for content in hparams.values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                for name, value in data.session_start_info.hparams.items():
                    hyperparameters[name] = getattr(value, value.WhichOneof("kind"))
        tags = events.Tags()
        for tag in tags["images"]:
            images[tag] = [(image.step, image.width, image.height) for image in events.Images(tag)]
        for tag in tags["scalars"]:
            scalars[tag] = [(scalar.step, scalar.value) for scalar in events.Scalars(tag)]
    return hyperparameters, images, scalars


def load_repository_script(folder: str, name: str):
    """A script of the repository's ``folder`` (``bench`` or ``training``: folders of scripts, not packages)
    as a module, registered as ``{folder}_{name}``; the folder is on ``sys.path`` while it is imported, for
    the scripts that import their neighbours (bench/common.py)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), folder)
    sys.path.insert(0, path)
    try:
        spec = importlib.util.spec_from_file_location(f"{folder}_{name}", os.path.join(path, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(path)


def load_bench_script(name: str):
    """A script of the repository's bench/ folder as a module (bench/ is a folder of scripts, not a package)."""
    return load_repository_script("bench", name)
